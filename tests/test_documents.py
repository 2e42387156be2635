"""engine/ingest.py: every supported format parsed, every bad file reported, walks sorted."""

from __future__ import annotations

import json
import random

import pytest

from engine.errors import InvalidInput
from engine.documents import Document, Failure, check_jsonl_fields, html_to_text, iter_documents, parse_bytes
from pdf_maker import make_pdf


def docs_and_failures(paths, **kw):
    items = list(iter_documents(paths, **kw))
    return ([i for i in items if isinstance(i, Document)], [i for i in items if isinstance(i, Failure)])


def test_html_drops_script_style_head():
    html = ("<html><head><title>T  itle</title><style>p {color: red}</style></head><body>"
            "<script>var secret = 1;</script><h1>Heading</h1><p>First &amp; para.</p>"
            "<p>Second<br>line</p><pre>a  b\n  c</pre><noscript>nojs</noscript></body></html>")
    text, title = html_to_text(html)
    assert title == "T itle"
    assert "secret" not in text and "color" not in text and "nojs" not in text
    assert text == "Heading\n\nFirst & para.\n\nSecond\nline\n\na  b\n  c"


def test_pdf_pages_and_title():
    data = make_pdf(["The first page mentions lighthouses.", "Page two is about (tea)."], title="Handbook")
    (doc,) = parse_bytes(data, "application/pdf", "hand.pdf")
    assert "lighthouses" in doc.text and "(tea)" in doc.text
    assert doc.text.index("lighthouses") < doc.text.index("tea")
    assert doc.metadata == {"pages": 2, "title": "Handbook"}


def test_jsonl_records(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join([
        json.dumps({"id": "x1", "text": "alpha text", "lang": "en", "n": 3}),
        "",
        "{not json",
        json.dumps({"text": "no id here"}),
        json.dumps({"id": "x3", "body": "wrong field"}),
        json.dumps([1, 2]),
    ]))
    docs, failures = docs_and_failures([p])
    assert [(d.doc_id, d.text, d.metadata) for d in docs] == [
        (f"{p.resolve()}#x1", "alpha text", {"id": "x1", "lang": "en", "n": 3}),
        (f"{p.resolve()}#4", "no id here", {}),
    ]
    assert [f.source.rsplit(":", 1)[1] for f in failures] == ["3", "5", "6"]
    assert "not valid JSON" in failures[0].reason and "'text'" in failures[1].reason
    docs, _ = docs_and_failures([p], text_field="body")
    assert [d.text for d in docs] == ["wrong field"]


def test_jsonl_id_field(tmp_path):
    """--id-field: the record field that names a document (kept in its metadata); a record
    without it is named by its line; a value that cannot name one fails that record alone."""
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"doc": "a-1", "id": "ignored", "text": "first"},
        {"doc": 7, "text": "second"},
        {"text": "third, without one"},
        {"doc": True, "text": "a boolean"},
        {"doc": {"x": 1}, "text": "an object"},
        {"doc": "  ", "text": "blank"},
        {"doc": None, "text": "null"},
    ]))
    docs, failures = docs_and_failures([p], id_field="doc")
    root = p.resolve()
    assert [(d.doc_id, d.metadata) for d in docs] == [
        (f"{root}#a-1", {"doc": "a-1", "id": "ignored"}), (f"{root}#7", {"doc": 7}), (f"{root}#3", {})]
    assert [f.source.rsplit(":", 1)[1] for f in failures] == ["4", "5", "6", "7"]
    assert all("field 'doc' must be a non-empty string or a number" in f.reason for f in failures)
    assert 'got {"x": 1}' in failures[1].reason
    # the same rule for the default field
    (d,) = parse_bytes(json.dumps({"id": 1.5, "text": "t"}).encode(), "application/jsonl", "s.jsonl")
    assert d.doc_id == "s.jsonl#1.5"
    (f,) = parse_bytes(json.dumps({"id": [1], "text": "t"}).encode(), "application/jsonl", "s.jsonl")
    assert f.source == "s.jsonl:1" and "field 'id' must be" in f.reason
    for text_field, id_field in (("text", "text"), ("text", ""), ("", "id")):
        with pytest.raises(InvalidInput):
            check_jsonl_fields(text_field, id_field)


def test_jsonl_is_streamed_a_line_at_a_time(tmp_path, monkeypatch):
    """A JSONL file is read a line at a time: no size limit for the file (only for one
    record), a bad line (not UTF-8, too long) fails alone, records keep raw U+2028 / U+0085
    in their strings (JSON allows them; they split nothing), CRLF and a BOM are read."""
    from engine import documents
    p = tmp_path / "big.jsonl"
    good = [json.dumps({"id": f"r{i}", "text": f"record {i}\u2028with a line separator\x85inside"}, ensure_ascii=False)
            for i in range(4)]
    p.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(good[:2]).encode() + b"\r\n" + b'{"id": "bad", "text": "caf\xe9"}\n'
                  + b'{"id": "long", "text": "' + b"x" * 300 + b'"}\n' + "\n".join(good[2:]).encode())
    monkeypatch.setattr(documents, "MAX_FILE_BYTES", 200)  # one record's limit; the file is bigger
    docs, failures = docs_and_failures([p], max_bytes=10)
    assert [d.doc_id.rsplit("#", 1)[1] for d in docs] == ["r0", "r1", "r2", "r3"]
    assert docs[0].text == "record 0\u2028with a line separator\x85inside" and docs[2].source.endswith(":5")
    assert [(f.source.rsplit(":", 1)[1], f.reason.split(";")[0]) for f in failures] == [
        ("3", "not valid UTF-8 at byte 26 of the line"), ("4", "line is over the 200-byte limit for one record")]
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b'{"text": "a"}\n\x00\x01')
    assert [f.reason for f in docs_and_failures([binary])[1]] == ["looks binary (NUL bytes); expected UTF-8 text"]


def test_jsonl_parts_read_what_the_whole_file_reads(tmp_path):
    """Read part by part (jsonl_parts' split points, as Ray tasks read a big file), a JSONL
    file gives the same documents and failures, in order, with the same line numbers."""
    from engine.documents import jsonl_parts, parse_bytes, read_file
    rng = random.Random(5)
    for trial in range(120):
        lines = []
        for i in range(rng.randint(0, 30)):
            r = rng.random()
            if r < 0.1:
                lines.append("")
            elif r < 0.15:
                lines.append("{not json")
            else:
                rec = {"text": "w" * rng.randint(0, 40) + rng.choice(["", "\u2028x"]), "i": i}
                if rng.random() < 0.5:
                    rec["id"] = f"r{i}"
                lines.append(json.dumps(rec, ensure_ascii=False))
        sep = rng.choice(["\n", "\r\n"])
        data = (sep.join(lines) + rng.choice(["", sep])).encode()
        p = tmp_path / f"t{trial}.jsonl"
        p.write_bytes(data)
        view = lambda items: [(type(x).__name__, x.source, getattr(x, "doc_id", None), getattr(x, "text", None),
                               getattr(x, "metadata", None), getattr(x, "reason", None)) for x in items]
        whole = view(read_file(p))
        assert whole == view(parse_bytes(data, "application/jsonl", str(p.resolve())))  # as IngestStream reads it
        for part_bytes in (1, 9, 60, 10_000):
            parts = jsonl_parts(p, part_bytes)
            assert parts[0][0] == 0 and parts[-1][1] is None
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert [x for part in parts for x in view(read_file(p, part=part))] == whole


def test_reading_a_big_jsonl_holds_one_line_at_a_time(tmp_path):
    """Memory: streaming a ~24 MB JSONL file allocates a small fraction of it at any time."""
    import tracemalloc

    from engine.documents import read_file
    p = tmp_path / "big.jsonl"
    line = json.dumps({"text": "lorem ipsum dolor sit amet " * 40, "kind": "filler"}) + "\n"
    with p.open("w") as f:
        for i in range(24 * 1024 * 1024 // len(line)):
            f.write(line)
    tracemalloc.start()
    n = sum(1 for _ in read_file(p))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 24 * 1024 * 1024 // len(line) and peak < 1024 * 1024, f"peak {peak} bytes"


def test_directory_walk_reports_bad_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "a.txt").write_text("plain text file")
    (tmp_path / "sub" / "b.md").write_text("# Markdown\n\nbody")
    (tmp_path / "sub" / "c.html").write_text("<p>web page</p>")
    (tmp_path / "sub" / "d.pdf").write_bytes(make_pdf(["pdf text here"]))
    (tmp_path / ".hidden" / "x.txt").write_text("skipped: hidden folder")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n")  # unsupported suffix inside a tree: ignored
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "binary.txt").write_bytes(b"abc\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
    docs, failures = docs_and_failures([tmp_path, tmp_path / "missing.txt", tmp_path / "image.png"])
    names = [d.source.rsplit("/", 1)[1] for d in docs]
    assert names == ["a.txt", "b.md", "c.html", "d.pdf"]
    reasons = {f.source.rsplit("/", 1)[1]: f.reason for f in failures}
    assert set(reasons) == {"binary.txt", "broken.pdf", "empty.txt", "latin1.txt", "missing.txt", "image.png"}
    assert "binary" in reasons["binary.txt"]
    assert "UTF-8" in reasons["latin1.txt"]
    assert "no text" in reasons["empty.txt"]
    assert "PDF" in reasons["broken.pdf"]
    assert "no such file" in reasons["missing.txt"]
    assert "unsupported" in reasons["image.png"]
    assert all(d.doc_id == d.source for d in docs)


def test_utf8_bom_and_size_limit(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_bytes("\ufeffhello".encode("utf-8"))
    (doc,), _ = docs_and_failures([p])
    assert doc.text == "hello"
    _, (fail,) = docs_and_failures([p], max_bytes=3)
    assert "limit" in fail.reason


def test_parse_bytes_errors():
    with pytest.raises(InvalidInput, match="unsupported media type"):
        list(parse_bytes(b"x", "image/png", "x"))
    with pytest.raises(InvalidInput, match="no text"):
        list(parse_bytes(b"<script>only()</script>", "text/html", "x.html"))


def test_content_hash_tracks_text_and_metadata():
    a = Document("d", "text", "s", {"k": 1})
    assert a.content_hash == Document("d", "text", "other source", {"k": 1}).content_hash
    assert a.content_hash != Document("d", "text!", "s", {"k": 1}).content_hash
    assert a.content_hash != Document("d", "text", "s", {"k": 2}).content_hash
