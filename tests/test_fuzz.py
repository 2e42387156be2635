"""Fuzzing the document parsers and the chunker: any input gives documents, a reported
failure or InvalidInput; never a crash or a hang; chunk spans stay inside the text."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.chunk import Chunker
from engine.errors import InvalidInput
from engine.documents import MEDIA_TYPES, Document, Failure, html_to_text, parse_bytes
from pdf_maker import make_pdf

FAST = settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def parse(data: bytes, media_type: str) -> list:
    try:
        return list(parse_bytes(data, media_type, "fuzz"))
    except InvalidInput as e:
        assert str(e), "errors say what is wrong"
        return []


@given(st.binary(max_size=4096), st.sampled_from(MEDIA_TYPES))
@FAST
def test_parsers_survive_random_bytes(data, media_type):
    for item in parse(data, media_type):
        assert isinstance(item, (Document, Failure))
        if isinstance(item, Document):
            assert item.text.strip() and "\x00" not in item.text


@given(st.text(alphabet=st.sampled_from(list("<>/=\"' abcdiv p script style pre br&;#x\n")), max_size=600))
@FAST
def test_html_survives_tag_soup(html):
    text, title = html_to_text(html)
    assert isinstance(text, str) and isinstance(title, str)


@given(st.binary(min_size=1, max_size=64), st.integers(0, 2000))
@FAST
def test_pdf_with_corrupted_bytes(noise, at):
    data = bytearray(make_pdf(["fuzzing a pdf page"]))
    at = at % len(data)
    data[at:at + len(noise)] = noise
    parse(bytes(data), "application/pdf")


@given(st.text(max_size=3000), st.integers(1, 300), st.data())
@FAST
def test_chunker_spans_inside_text(embedder, text, target, data):
    overlap = data.draw(st.integers(0, target - 1))
    chunks = Chunker(embedder.raw_tokenizer, target=target, overlap=overlap).chunk("f", text)
    for c in chunks:
        assert 0 <= c.start < c.end <= len(text) and c.text == text[c.start:c.end]


@given(st.integers(0, 4), st.binary(max_size=600), st.integers(0, 10_000))
@FAST
def test_wal_open_survives_any_tail(tmp_path_factory, n_good, tail, cut):
    """Whatever a crash or a bad disk leaves after the last whole record, opening the log
    keeps exactly the whole records before it, cuts the rest, and accepts new appends."""
    import numpy as np

    from engine.chunk import Chunk
    from engine.store import DocumentRecord
    from engine.wal import WAL_FILE, WriteAheadLog, encode

    path = tmp_path_factory.mktemp("wal") / WAL_FILE
    wal = WriteAheadLog(path)
    for i in range(n_good):
        rec = DocumentRecord(f"d{i}", "s", "h", {}, 3, [Chunk(f"d{i}", 0, 0, 3, 1, "abc")],
                             np.full((1, 4), i, np.float32))
        wal.append(encode(i, [rec], [], 4))
    good = wal.size_bytes()
    wal.close()
    data = path.read_bytes()
    # a torn copy of a real record, then arbitrary bytes
    path.write_bytes(data + data[len(data) - (cut % max(1, good - 8)):][:cut % 97] + tail)
    wal = WriteAheadLog(path)
    assert wal.last_seq == n_good
    assert [r.seq for r in wal.records()] == list(range(1, n_good + 1))
    assert path.stat().st_size == good
    assert wal.append(encode(n_good, [], ["x"], 4)) == n_good + 1
    wal.close()


@pytest.mark.parametrize("html", ["<><<<![<!<<L<\xf7", "<p>a</p><![if x", "<![ <!-- x", "<!x y<![<p>tail"])
def test_html_malformed_marked_sections(html):
    """Inputs atheris found: CPython's HTML parser raised AssertionError on them."""
    text, _ = html_to_text(html)
    assert isinstance(text, str)
    for item in parse(html.encode(), "text/html"):
        assert isinstance(item, (Document, Failure))
