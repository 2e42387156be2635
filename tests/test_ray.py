"""Scale-out on a real local Ray cluster (engine/distributed.py), against single-process runs.

The cluster is `ray start --head` bound to 127.0.0.1 with 2 CPUs, started and stopped here.
Skipped when the `ray` extra is not installed (`make ray` installs it; .ci/run does).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine import distributed
from engine.cli import main
from engine.errors import Unavailable
from engine.pipeline import Engine
from serverproc import free_port

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"
EMBED_CLASS = "_EmbedChunks"


@pytest.fixture(scope="module")
def ray_address():
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
                   check=True, timeout=180, env=env, capture_output=True)
    address = f"127.0.0.1:{port}"
    try:
        distributed.connect(address)
        yield address
    finally:
        distributed.shutdown()
        subprocess.run([str(RAY), "stop", "--force"], timeout=120, env=env, capture_output=True)


@pytest.fixture()
def corpus(tmp_path) -> list[str]:
    """Every input kind: the example corpus (txt, md, html, nested), JSONL with good and bad
    lines, a file with no text, an unsupported file and a path that does not exist."""
    root = tmp_path / "in"
    shutil.copytree(REPO / "examples" / "corpus", root)
    lines = [{"id": "a", "text": "Lighthouses guide ships at night with a rotating beam.", "kind": "faq"},
             "not json", {"id": "b", "body": "no text field"},
             {"id": "c", "text": "Green tea steeps best at about 80 degrees Celsius for two minutes."},
             {"id": "a", "text": "A later line with the same id replaces the first one."}]
    (root / "extra.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    (root / "empty.txt").write_text("   \n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    return [str(root), str(tmp_path / "image.png"), str(tmp_path / "missing.md")]


def contents(engine: Engine, name: str) -> tuple[dict, dict]:
    """(documents: doc_id -> [(ordinal, start, end, n_tokens, text, source, metadata)], vectors by (doc, ordinal))."""
    col = engine.collections.get(name)
    keys = col.store.keys()
    rows = col.store.chunks(keys)
    vectors = col.store.vectors()
    docs, vecs = {}, {}
    for k in keys:
        r = rows[int(k)]
        docs.setdefault(r.doc_id, []).append((r.ordinal, r.start, r.end, r.n_tokens, r.text, r.source, r.metadata))
        vecs[(r.doc_id, r.ordinal)] = np.array(vectors[int(k)])
    return {d: sorted(c) for d, c in docs.items()}, vecs


def report_view(r) -> tuple:
    return (r.documents_added, r.documents_updated, r.documents_unchanged, r.chunks_added, r.chunks_removed,
            r.chunks_reused, r.failures, r.results)


def assert_same(a: Engine, b: Engine, name: str) -> None:
    docs_a, vec_a = contents(a, name)
    docs_b, vec_b = contents(b, name)
    assert docs_a == docs_b
    assert vec_a.keys() == vec_b.keys()
    assert max(float(np.abs(vec_a[k] - vec_b[k]).max()) for k in vec_a) <= 1e-5


def engines(tmp_path, config, embedder):
    a = Engine(config.replace(data_dir=tmp_path / "single", threads=1), embedder=embedder)
    b = Engine(config.replace(data_dir=tmp_path / "ray", threads=1), embedder=embedder)
    for e in (a, b):
        e.create_collection("c")
    return a, b


def test_ray_ingest_equals_single_process_ingest_and_upserts_alike(ray_address, tmp_path, corpus, config, embedder,
                                                                   monkeypatch):
    from engine.documents import jsonl_parts
    monkeypatch.setattr(distributed, "JSONL_PART_BYTES", 64)  # extra.jsonl read in parts, by several tasks
    assert len(jsonl_parts(Path(corpus[0]) / "extra.jsonl", 64)) == 3
    single, on_ray = engines(tmp_path, config, embedder)
    try:
        ra = single.ingest_paths("c", corpus)
        seen = []
        rb = distributed.ingest(on_ray, "c", corpus, actors=2, address=ray_address,
                                progress=lambda docs, chunks: seen.append(docs))
        assert report_view(ra) == report_view(rb)
        assert ra.documents_added >= 6 and len(ra.failures) >= 4  # bad JSON, no field, no text, png, missing
        assert seen == sorted(seen) and seen[-1] >= ra.documents_added + len(ra.failures)
        assert_same(single, on_ray, "c")

        # Upsert: one file changed, one removed from the inputs; the rest unchanged.
        root = Path(corpus[0])
        (root / "tea.txt").write_text((root / "tea.txt").read_text() + "\nOolong sits between green and black.\n")
        extra = root / "extra.jsonl"  # record "c" gets a metadata field: its text's stored vector is kept
        extra.write_text(extra.read_text().replace('"id": "c",', '"id": "c", "kind": "tea",'))
        ra2 = single.ingest_paths("c", corpus)
        rb2 = distributed.ingest(on_ray, "c", corpus, actors=1, address=ray_address)
        assert report_view(ra2) == report_view(rb2)
        assert ra2.documents_updated == 2 and ra2.documents_unchanged >= 5 and ra2.chunks_reused >= 1
        assert_same(single, on_ray, "c")

        # JSONL records named by another field (--id-field): new documents, alike
        ra3 = single.ingest_paths("c", corpus, id_field="kind")
        rb3 = distributed.ingest(on_ray, "c", corpus, id_field="kind", actors=1, address=ray_address)
        assert report_view(ra3) == report_view(rb3)
        assert {d.rsplit("#", 1)[1] for d in ra3.results if "extra.jsonl#" in d} == {"faq", "tea", "5"}
        assert_same(single, on_ray, "c")
    finally:
        single.close()
        on_ray.close()


def embed_actor_pids() -> list[int]:
    """Processes of live embedding actors (Ray titles an actor's process "ray::<its class>")."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::") and EMBED_CLASS.encode() in cmd:
                pids.append(int(d.name))
    return pids


def test_killing_an_embedding_actor_mid_run_still_gives_identical_results(ray_address, tmp_path, config, embedder):
    # Six files: Ray Data spreads work per file (one block each) over the two actors.
    words = "lighthouse beam harbour tea kettle index graph vector query answer".split()
    files = []
    for n in range(6):
        src = tmp_path / f"part{n}.jsonl"
        with src.open("w") as f:
            for i in range(n * 100, n * 100 + 100):
                text = " ".join(words[(i + j) % len(words)] for j in range(12 + i % 30)) + f" number {i}."
                f.write(json.dumps({"id": i, "text": text}) + "\n")
        files.append(src)
    single, on_ray = engines(tmp_path, config, embedder)
    killed = []

    def kill_one(docs, chunks):
        pids = embed_actor_pids()
        if not killed and pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    try:
        ra = single.ingest_paths("c", files)
        rb = distributed.ingest(on_ray, "c", files, actors=2, address=ray_address, progress=kill_one)
        assert killed, "no embedding actor was alive to kill"
        assert report_view(ra) == report_view(rb)
        assert ra.documents_added == 600
        assert_same(single, on_ray, "c")
    finally:
        single.close()
        on_ray.close()


def batch_lines(path: Path) -> list[dict]:
    """Output lines without what depends on timing: durations, and how many prompt tokens
    the prefix cache held when a row was admitted (rows that share a prefix race for it)."""
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        rec.pop("timings_ns", None)
        rec.get("usage", {}).pop("cached_tokens", None)
        out.append(rec)
    return out


def differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in a.keys() | b.keys() for d in differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def test_ray_batch_answers_and_search_equal_single_process(ray_address, tmp_path, capsys):
    data = tmp_path / "data"
    common = ["--data-dir", str(data), "--threads", "1"]
    assert main([*common, "ingest", str(REPO / "examples" / "corpus"), "-c", "demo", "-q"]) == 0
    questions = tmp_path / "q.jsonl"
    qs = ["How hot should the water be for green tea?", "What does a lighthouse keeper do?",
          "How does HNSW find neighbours?"]
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": q}) + "\n" for i, q in enumerate(qs)))
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    ask = ["ask", "-c", "demo", "--batch", str(questions), "--max-new-tokens", "24", "-q"]
    assert main([*common, *ask, "--out", str(one)]) == 0
    assert main([*common, *ask, "--out", str(many), "--ray", ray_address, "--ray-actors", "1"]) == 0
    single, on_ray = batch_lines(one), batch_lines(many)
    assert [r["id"] for r in on_ray] == ["q0", "q1", "q2"]
    assert not differences(single, on_ray), differences(single, on_ray)
    assert any("80" in r["answer"] for r in single[:1])

    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps(q) + "\n" for q in [*qs, "tea"] * 5))
    h1, h2 = tmp_path / "h1.jsonl", tmp_path / "h2.jsonl"
    search = ["search", "-c", "demo", "--batch", str(queries), "-k", "3"]
    assert main([*common, *search, "--out", str(h1)]) == 0
    assert main([*common, *search, "--out", str(h2), "--ray", ray_address, "--ray-actors", "2"]) == 0
    hits1, hits2 = batch_lines(h1), batch_lines(h2)
    assert len(hits1) == 20 and [r["id"] for r in hits2] == list(range(1, 21))
    assert [[h["doc_id"] for h in r["hits"]] for r in hits1] == [[h["doc_id"] for h in r["hits"]] for r in hits2]
    for r1, r2 in zip(hits1, hits2):
        assert np.allclose([h["score"] for h in r1["hits"]], [h["score"] for h in r2["hits"]], atol=1e-5)
    # a metadata filter reaches the actors: the planets' records only, the same on Ray
    planets = [*search, "--filter", "kind=planet"]
    h3, h4 = tmp_path / "h3.jsonl", tmp_path / "h4.jsonl"
    assert main([*common, *planets, "--out", str(h3)]) == 0
    assert main([*common, *planets, "--out", str(h4), "--ray", ray_address, "--ray-actors", "2"]) == 0
    only1, only2 = batch_lines(h3), batch_lines(h4)
    assert all(len(r["hits"]) == 3 and all(h["metadata"]["kind"] == "planet" for h in r["hits"]) for r in only1)
    assert [[h["doc_id"] for h in r["hits"]] for r in only1] == [[h["doc_id"] for h in r["hits"]] for r in only2]
    # each line's own filter (a batch of many tenants' queries), with --filter's: the same on Ray
    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps({"query": q, "filter": f}) + "\n" for q, f in [
        ("tea", {"kind": "planet"}), ("largest planet", {"id": {"$in": ["mars", "venus"]}}), ("tea", None)] * 3))
    h5, h6 = tmp_path / "h5.jsonl", tmp_path / "h6.jsonl"
    lines = ["search", "-c", "demo", "--batch", str(own), "-k", "3", "--filter", "kind!=none"]
    assert main([*common, *lines, "--out", str(h5)]) == 0
    assert main([*common, *lines, "--out", str(h6), "--ray", ray_address, "--ray-actors", "2"]) == 0
    own1, own2 = batch_lines(h5), batch_lines(h6)
    assert [{h["metadata"].get("id") for h in r["hits"]} for r in own1[1:2]] == [{"mars", "venus"}]
    assert all(h["metadata"]["kind"] == "planet" for h in own1[0]["hits"]) and len(own1[2]["hits"]) == 3
    assert [[h["doc_id"] for h in r["hits"]] for r in own1] == [[h["doc_id"] for h in r["hits"]] for r in own2]


def test_an_unreachable_ray_address_fails_before_anything_is_read(tmp_path, capsys):
    port = free_port()  # nothing listens here
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match=f"cannot reach a Ray cluster at '127.0.0.1:{port}'"):
        distributed.connect(f"127.0.0.1:{port}")
    data = tmp_path / "data"
    rc = main(["--data-dir", str(data), "ingest", str(REPO / "examples" / "corpus"), "-c", "c",
               "--ray", f"127.0.0.1:{port}"])
    assert rc == 2
    assert "cannot reach a Ray cluster" in capsys.readouterr().err
    assert not (data / "collections" / "c").exists()  # nothing created, nothing read
    assert time.monotonic() - t0 < 30


def test_ray_flags_need_batch_mode(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path), "ask", "what?", "-c", "c", "--ray"]) == 2
    assert "--ray works with `rag ask --batch`" in capsys.readouterr().err
