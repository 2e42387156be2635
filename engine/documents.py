"""Files -> documents: walk paths, parse .txt/.md/.html/.pdf/.jsonl, report what fails.

Parsing never touches the store; a file that cannot be read, is binary, is not UTF-8 or has
no text becomes a `Failure` that the caller reports, and the walk goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import BinaryIO

from .errors import InvalidInput

TEXT_SUFFIXES = {".txt": "text/plain", ".text": "text/plain", ".rst": "text/plain", ".md": "text/markdown",
                 ".markdown": "text/markdown", ".html": "text/html", ".htm": "text/html",
                 ".pdf": "application/pdf", ".jsonl": "application/jsonl"}
MEDIA_TYPES = sorted(set(TEXT_SUFFIXES.values()))
DEFAULT_TEXT_FIELD = "text"
DEFAULT_ID_FIELD = "id"
# Largest file read from disk, and longest JSONL record (a JSONL file is streamed, whatever
# its size; each gRPC document has its own, smaller limit: Config.max_document_bytes).
MAX_FILE_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class Document:
    """One text to index. `doc_id` is the upsert key; `source` is what results show."""

    doc_id: str
    text: str
    source: str
    metadata: dict = dataclasses.field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(self.text.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
        h.update(json.dumps(self.metadata, sort_keys=True, ensure_ascii=False).encode())
        return h.hexdigest()


# rebuild_text tries these for the characters no chunk covers (chunking drops whitespace at
# the ends of a document and, with no overlap, between its chunks), hashing at most this
# many characters in all (every filling of a small document's gaps; fewer of a large one's).
GAP_FILLS = (" ", "\n")
GUESS_BUDGET_CHARS = 1 << 25


def rebuild_text(doc_id: str, chunks: Sequence, n_chars: int, metadata: dict, content_hash: str) -> tuple[str, bool]:
    """A document's text from its chunks (each text[start:end] of it, in order) and its size:
    the characters no chunk covers filled with spaces or newlines, the first filling whose
    content hash is the stored one taken; (text, True) then, else (text with spaces, False)."""
    pieces: list[str | int] = []  # text, or the length of a gap
    pos = 0
    for c in chunks:
        if c.start > pos:
            pieces.append(c.start - pos)
            pos = c.start
        if c.end > pos:
            pieces.append(c.text[pos - c.start:])
            pos = c.end
    if n_chars > pos:
        pieces.append(n_chars - pos)

    def join(fill: dict) -> str:
        return "".join(fill[i] * p if isinstance(p, int) else p for i, p in enumerate(pieces))

    def same(text: str) -> bool:
        return Document(doc_id, text, "", metadata).content_hash == content_hash

    gaps = [i for i, p in enumerate(pieces) if isinstance(p, int)]
    budget = max(1, GUESS_BUDGET_CHARS // max(n_chars, 1))
    tries = itertools.islice(itertools.product(GAP_FILLS, repeat=len(gaps)), budget)
    for fill in tries:
        if same(text := join(dict(zip(gaps, fill)))):
            return text, True
    return join(dict.fromkeys(gaps, " ")), False


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    """A file (or JSONL line) that was skipped, and why."""

    source: str
    reason: str
    doc_id: str | None = None  # the document's id, when the failure is one document's own


def check_document(doc: Document) -> None:
    """Raise InvalidInput if `doc` cannot be indexed (the same rules for files and API calls)."""
    if not isinstance(doc.doc_id, str) or not doc.doc_id.strip():
        raise InvalidInput("document id is empty; give every document a non-empty id")
    if not isinstance(doc.text, str):
        raise InvalidInput(f"document {doc.doc_id!r}: text must be a string")
    if not doc.text.strip():
        raise InvalidInput(f"document {doc.doc_id!r} has no text (empty or whitespace only)")
    if "\x00" in doc.text:
        raise InvalidInput(f"document {doc.doc_id!r} contains NUL characters; binary data is not text")
    if not isinstance(doc.metadata, dict):
        raise InvalidInput(f"document {doc.doc_id!r}: metadata must be a JSON object")


def check_document_size(doc_id: str, content: str | bytes, limit: int) -> None:
    """Raise InvalidInput if `content` (text as UTF-8, or file bytes) is over `limit` bytes.

    Meant to run before any parsing, so an oversized document costs no work.
    """
    n = len(content)
    # A character takes 1 to 4 UTF-8 bytes: encode only when the bounds do not decide.
    if isinstance(content, str) and n <= limit < 4 * n:
        n = len(content.encode("utf-8", "surrogatepass"))
    if n > limit:
        raise InvalidInput(f"document {doc_id!r} is {n} bytes, over the {limit}-byte limit "
                           "(max_document_bytes); split it into smaller documents")


def decode_text(data: bytes, source: str) -> str:
    """Strict UTF-8 (BOM allowed); binary or other encodings are refused with a clear reason."""
    if b"\x00" in data[:8192]:
        raise InvalidInput(f"{source}: looks binary (NUL bytes); expected UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{source}: not valid UTF-8 at byte {e.start}; convert it to UTF-8 first") from None


# ---------------------------------------------------------------------- HTML
_BLOCK_TAGS = {"p", "div", "section", "article", "header", "footer", "main", "aside", "nav", "h1", "h2",
               "h3", "h4", "h5", "h6", "ul", "ol", "li", "table", "tr", "blockquote", "pre", "dl", "dt",
               "dd", "figure", "figcaption", "form", "hr", "address", "details", "summary"}
_DROP_TAGS = {"script", "style", "noscript", "template", "svg", "head", "iframe", "object"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[tuple[str, bool]] = []  # (text, verbatim)
        self.title: list[str] = []
        self._drop = 0
        self._in_title = False
        self._pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in _DROP_TAGS:
            self._drop += 1
        elif tag == "title":
            self._in_title = True
        elif tag == "br":
            self.parts.append(("\n", False))
        elif tag in _BLOCK_TAGS:
            self.parts.append(("\n\n", False))
            if tag == "pre":
                self._pre += 1

    def handle_startendtag(self, tag, attrs):
        if tag == "br":
            self.parts.append(("\n", False))

    def handle_endtag(self, tag):
        if tag in _DROP_TAGS:
            self._drop = max(0, self._drop - 1)
        elif tag == "title":
            self._in_title = False
        elif tag in _BLOCK_TAGS:
            self.parts.append(("\n\n", False))
            if tag == "pre":
                self._pre = max(0, self._pre - 1)

    def handle_data(self, data):
        if self._in_title:
            self.title.append(data)
        elif not self._drop:
            self.parts.append((data, True) if self._pre else (re.sub(r"\s+", " ", data), False))


def _extract(html: str) -> "_TextExtractor":
    p = _TextExtractor()
    p.feed(html)
    p.close()
    return p


def html_to_text(html: str) -> tuple[str, str]:
    """(text, title) of an HTML page; scripts, styles and <head> are dropped."""
    try:
        p = _extract(html)
    except AssertionError:
        # CPython before 3.13 raises AssertionError on a malformed "<![" or "<!" section
        # (found by tests/fuzz_atheris.py); browsers show such markup as text, and so do we.
        try:
            p = _extract(re.sub(r"<!\[(?!CDATA\[)", "&lt;![", html))
        except AssertionError:
            p = _extract(html.replace("<!", "&lt;!"))
    out: list[str] = []
    for part, verbatim in p.parts:
        if verbatim:
            out.append(part)
        elif part.startswith("\n"):  # a block break: no spaces before it, at most one blank line
            if out:
                out[-1] = out[-1].rstrip(" ")
            tail = "".join(out[-2:])
            have = len(tail) - len(tail.rstrip("\n"))
            out.append("\n" * max(0, len(part) - have) if out else "")
        else:
            out.append(part.lstrip(" ") if not out or out[-1].endswith("\n") else part)
    return "".join(out).strip(), " ".join("".join(p.title).split())


# ---------------------------------------------------------------------- PDF
def pdf_to_text(data: bytes, source: str) -> tuple[str, dict]:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise InvalidInput(f"{source}: reading PDF needs pypdf; pip install '.[pdf]'") from None
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise InvalidInput(f"{source}: PDF is encrypted; decrypt it first")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
    except InvalidInput:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed PDF can fail anywhere inside pypdf
        # (fuzzing found PdfReadError, LimitReachedError, KeyError, TypeError, ...); all of
        # them mean the same thing to the user.
        raise InvalidInput(f"{source}: unreadable PDF ({type(e).__name__}: {str(e)[:200]})") from None
    meta = {"pages": len(pages)}
    title = getattr(reader.metadata, "title", None) if reader.metadata else None
    if title:
        meta["title"] = str(title)
    return "\n\n".join(p for p in pages if p), meta


# ---------------------------------------------------------------------- JSONL
# JSON Lines: records separated by "\n" ("\r\n" too); a record may hold U+2028, U+0085 and
# the like raw in its strings, so those never split one. A file is read a line at a time, so
# its size is not limited (one record is: at most MAX_FILE_BYTES).
def jsonl_record(line: str, line_no: int, source: str, text_field: str,
                 id_field: str = DEFAULT_ID_FIELD) -> Document | Failure | None:
    """One JSONL line (without its line break) -> a Document, a Failure saying why not, or
    None for a blank line. The document's id is the file's and the record's `id_field` (a
    string or a number; the record keeps it in its metadata), or `line_no` (from 1) for a
    record without one."""
    if not line.strip():
        return None
    where = f"{source}:{line_no}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return Failure(where, f"not valid JSON ({e.msg})")
    if not isinstance(rec, dict):
        return Failure(where, "a JSONL line must be a JSON object")
    body = rec.pop(text_field, None)
    if not isinstance(body, str) or not body.strip():
        return Failure(where, f"no non-empty string field {text_field!r}")
    rid = rec.get(id_field, line_no)
    if isinstance(rid, bool) or not isinstance(rid, (str, int, float)) or not str(rid).strip():
        return Failure(where, f"field {id_field!r} must be a non-empty string or a number to name the "
                              f"document, got {json.dumps(rid, ensure_ascii=False)[:80]}")
    return Document(doc_id=f"{source}#{rid}", text=body, source=where, metadata=rec)


def check_jsonl_fields(text_field: str, id_field: str) -> None:
    """Raise InvalidInput unless JSONL records' text and id fields are two named fields."""
    for flag, name in (("text", text_field), ("id", id_field)):
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"the JSONL {flag} field must be a non-empty name, got {name!r}")
    if text_field == id_field:
        raise InvalidInput(f"the JSONL text and id fields are both {text_field!r}; name two fields")


def jsonl_documents(text: str, source: str, text_field: str,
                    id_field: str = DEFAULT_ID_FIELD) -> Iterator[Document | Failure]:
    """The records of a JSONL text held in memory (an IngestStream document's data)."""
    for line_no, line in enumerate(text.split("\n"), 1):
        if (item := jsonl_record(line.removesuffix("\r"), line_no, source, text_field, id_field)) is not None:
            yield item


def read_jsonl(f: str | Path | BinaryIO, source: str, text_field: str, *, start: int = 0, end: int | None = None,
               first_line: int = 1, id_field: str = DEFAULT_ID_FIELD) -> Iterator[Document | Failure]:
    """The records of a JSONL file (or of a binary stream that can peek, such as stdin's
    buffer), read a line at a time; or of a file's part [start, end) (byte offsets at line
    starts, `first_line` the number of the line at `start`: jsonl_parts). A line that is not
    UTF-8 or longer than MAX_FILE_BYTES is a Failure of its own; input that looks binary
    (NUL bytes in its first 8 KiB) is one Failure."""
    with (open(f, "rb") if isinstance(f, (str, Path)) else contextlib.nullcontext(f)) as fh:
        if start == 0 and b"\x00" in fh.peek(8192)[:8192]:
            yield Failure(source, "looks binary (NUL bytes); expected UTF-8 text")
            return
        if start:
            fh.seek(start)
        pos, line_no = start, first_line
        while end is None or pos < end:
            raw = fh.readline(MAX_FILE_BYTES + 1)
            if not raw:
                return
            pos += len(raw)
            if len(raw) > MAX_FILE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # the rest of the line, never held whole
                    raw = fh.readline(1 << 20)
                    pos += len(raw)
                yield Failure(f"{source}:{line_no}", f"line is over the {MAX_FILE_BYTES}-byte limit for one record")
            else:
                if pos == len(raw) and raw.startswith(b"\xef\xbb\xbf"):  # a BOM opens the file
                    raw = raw[3:]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield Failure(f"{source}:{line_no}", f"not valid UTF-8 at byte {e.start} of the line; "
                                                         "convert the file to UTF-8 first")
                else:
                    item = jsonl_record(line.removesuffix("\n").removesuffix("\r"), line_no, source, text_field,
                                        id_field)
                    if item is not None:
                        yield item
            line_no += 1


def jsonl_parts(f: str | Path, part_bytes: int) -> list[tuple[int, int | None, int]]:
    """Split points of a JSONL file into parts of about `part_bytes` whole lines each, for
    readers working side by side (read_jsonl's start, end, first_line); one scan counting
    line breaks, a block at a time."""
    parts, start, first_line, lines, pos, target = [], 0, 1, 0, 0, part_bytes
    with open(f, "rb") as fh:
        while block := fh.read(1 << 20):
            i = 0  # block[:i] is counted
            while pos + len(block) > target:
                j = block.find(b"\n", max(target - pos, i))
                if j < 0:
                    break
                lines += block.count(b"\n", i, j + 1)
                i = j + 1
                parts.append((start, pos + i, first_line))
                start, first_line, target = pos + i, lines + 1, pos + i + part_bytes
            lines += block.count(b"\n", i)
            pos += len(block)
    if start < pos or not parts:
        parts.append((start, None, first_line))
    else:  # the last split fell on the end of the file
        parts[-1] = (*parts[-1][:1], None, parts[-1][2])
    return parts


# ---------------------------------------------------------------------- dispatch
def parse_bytes(data: bytes, media_type: str, source: str, *, doc_id: str | None = None,
                metadata: dict | None = None, text_field: str = DEFAULT_TEXT_FIELD,
                id_field: str = DEFAULT_ID_FIELD) -> Iterator[Document | Failure]:
    """Documents in one file's bytes. Single-document types raise InvalidInput on failure."""
    doc_id = doc_id or source
    meta = dict(metadata or {})
    if media_type == "application/jsonl":
        yield from jsonl_documents(decode_text(data, source), source, text_field, id_field)
        return
    if media_type == "application/pdf":
        text, extra = pdf_to_text(data, source)
        meta = {**extra, **meta}
    elif media_type == "text/html":
        text, title = html_to_text(decode_text(data, source))
        if title:
            meta.setdefault("title", title)
    elif media_type in ("text/plain", "text/markdown"):
        text = decode_text(data, source)
    else:
        raise InvalidInput(f"{source}: unsupported media type {media_type!r}; use one of {MEDIA_TYPES}")
    doc = Document(doc_id=doc_id, text=text, source=source, metadata=meta)
    check_document(doc)
    yield doc


def iter_files(paths: Iterable[str | Path]) -> Iterator[Path | Failure]:
    """Files under `paths` (sorted, hidden entries skipped) with a supported suffix."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    f = Path(root) / name
                    if not name.startswith(".") and f.suffix.lower() in TEXT_SUFFIXES:
                        yield f
        elif p.is_file():
            if p.suffix.lower() in TEXT_SUFFIXES:
                yield p
            else:
                yield Failure(str(p), f"unsupported file type {p.suffix!r}; supported: "
                                      f"{' '.join(sorted(TEXT_SUFFIXES))}")
        else:
            yield Failure(str(p), "no such file or directory")


def iter_documents(paths: Iterable[str | Path], *, text_field: str = DEFAULT_TEXT_FIELD,
                   id_field: str = DEFAULT_ID_FIELD, max_bytes: int = MAX_FILE_BYTES
                   ) -> Iterator[Document | Failure]:
    """Documents from files and directory trees, one file in memory at a time."""
    for f in iter_files(paths):
        if isinstance(f, Failure):
            yield f
        else:
            yield from read_file(f, text_field=text_field, id_field=id_field, max_bytes=max_bytes)


def read_stream(fh: BinaryIO, media_type: str, source: str, *, text_field: str = DEFAULT_TEXT_FIELD,
                id_field: str = DEFAULT_ID_FIELD, max_bytes: int = MAX_FILE_BYTES) -> Iterator[Document | Failure]:
    """The documents of a binary stream that is not a file (`rag ingest -`: stdin), named
    `source`: JSONL a line at a time, whatever its length; any other type read whole, up to
    `max_bytes`, and parsed as a file of that type would be."""
    if media_type not in MEDIA_TYPES:
        raise InvalidInput(f"unsupported media type {media_type!r}; use one of {MEDIA_TYPES}")
    if media_type == "application/jsonl":
        yield from read_jsonl(fh, source, text_field, id_field=id_field)
        return
    data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        yield Failure(source, f"input is over the {max_bytes}-byte limit")
        return
    try:
        yield from parse_bytes(data, media_type, source, text_field=text_field, id_field=id_field)
    except InvalidInput as e:
        yield Failure(source, str(e).removeprefix(source + ": "))


def read_file(f: str | Path, *, text_field: str = DEFAULT_TEXT_FIELD, id_field: str = DEFAULT_ID_FIELD,
              max_bytes: int = MAX_FILE_BYTES, part: tuple[int, int | None, int] | None = None
              ) -> Iterator[Document | Failure]:
    """The documents of one file that `iter_files` listed (or the Failure why there are none).
    A JSONL file is streamed a line at a time, whatever its size (`part`: only that part of
    it, as jsonl_parts splits it); any other file is read whole, up to `max_bytes`."""
    f = Path(f)
    source = str(f.resolve())
    media_type = TEXT_SUFFIXES[f.suffix.lower()]
    try:
        if media_type == "application/jsonl":
            start, end, first_line = part or (0, None, 1)
            yield from read_jsonl(f, source, text_field, start=start, end=end, first_line=first_line,
                                  id_field=id_field)
            return
        size = f.stat().st_size
        if size > max_bytes:
            yield Failure(source, f"file is {size} bytes, over the {max_bytes}-byte limit")
            return
        data = f.read_bytes()
    except OSError as e:
        yield Failure(source, f"cannot read ({e.strerror})")
        return
    try:
        yield from parse_bytes(data, media_type, source, text_field=text_field)
    except InvalidInput as e:
        yield Failure(source, str(e).removeprefix(source + ": "))
