"""The `rag` command: the README quick start, exit codes and messages for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main

CORPUS = Path(__file__).resolve().parent.parent / "examples" / "corpus"


def rag(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_quick_start_as_a_console_script(tmp_path):
    """README: `rag ingest FOLDER --collection NAME`, then `rag search ...` (RAG_DATA_DIR honoured)."""
    env = {**os.environ, "RAG_DATA_DIR": str(tmp_path / "data")}
    exe = Path(sys.executable).parent / "rag"
    r = subprocess.run([exe, "ingest", str(CORPUS), "--collection", "notes"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "8 added" in r.stdout
    r = subprocess.run([exe, "search", "How do I feed a sourdough starter?", "--collection", "notes", "-k", "3"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    rank, _, score, _, cosine, source = lines[0].split()[:6]
    assert rank == "1" and source.endswith("bread.md")
    assert "[" in lines[0] and "starter" in lines[1]
    # hits print in descending order of the score shown (the fused score), cosine beside it
    scores = [float(line.split()[2]) for line in lines[0::2]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True), r.stdout
    assert all(-1.0 <= float(line.split()[4]) <= 1.0 for line in lines[0::2])
    assert (tmp_path / "data" / "collections" / "notes").is_dir()


def test_search_json_collections_delete_drop(tmp_path, capsys):
    d = ["--data-dir", str(tmp_path)]
    assert rag(capsys, *d, "ingest", str(CORPUS), "-c", "c", "--dtype", "i8", "-q")[0] == 0
    code, out, _ = rag(capsys, *d, "search", "Olympus Mons", "-c", "c", "-k", "1", "--json")
    hit = json.loads(out)
    assert code == 0 and hit["rank"] == 1 and hit["doc_id"].endswith("#mars") and hit["metadata"]["kind"] == "planet"
    code, out, _ = rag(capsys, *d, "search", "Olympus Mons", "-c", "c", "-k", "3", "--json", "--filter", "kind=planet")
    hits = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(hits) == 3 and all(h["metadata"]["kind"] == "planet" for h in hits)
    code, out, _ = rag(capsys, *d, "search", "Olympus Mons", "-c", "c", "--filter", "kind=nothing")
    assert code == 0 and "no results (no chunk matches the filter)" in out
    code, out, _ = rag(capsys, *d, "search", "Olympus Mons", "-c", "c", "-k", "8", "--json", "--filter", "kind!=planet")
    hits = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and hits and all(h["metadata"].get("kind") != "planet" for h in hits)
    code, out, _ = rag(capsys, *d, "search", "Olympus Mons", "-c", "c", "-k", "8", "--json",
                       "--filter", "kind=planet", "--filter", "kind=nothing", "--filter", "kind>=a")
    assert code == 0 and len(out.splitlines()) == 4  # any of planet, nothing: the 4 planets
    code, out, _ = rag(capsys, *d, "documents", "-c", "c", "--limit", "3")
    assert code == 0 and len(out.splitlines()) == 4 and "more after" in out.splitlines()[-1]
    after = out.splitlines()[2].split("\t")[0]
    code, out, _ = rag(capsys, *d, "documents", "-c", "c", "--limit", "3", "--after", after, "--all", "--json")
    rest = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rest) == 5 and [r["doc_id"] for r in rest] == sorted(r["doc_id"] for r in rest)
    assert all(r["doc_id"] > after for r in rest)
    code, out, _ = rag(capsys, *d, "documents", "-c", "c", "--filter", "kind=planet", "--json")
    planets = [json.loads(line) for line in out.splitlines()]
    assert [p["metadata"]["kind"] for p in planets] == ["planet"] * 4 and planets[0]["n_chunks"] == 1
    code, out, _ = rag(capsys, *d, "delete", "-c", "c", "--filter", "kind=planet")
    assert code == 0 and "deleted 4 documents matching the filter" in out
    code, out, _ = rag(capsys, *d, "search", "Olympus Mons", "-c", "c", "--filter", "kind=planet")
    assert "no results (no chunk matches the filter)" in out
    code, out, _ = rag(capsys, *d, "collections", "--json")
    info = json.loads(out)
    assert (info["name"], info["documents"], info["index_dtype"]) == ("c", 4, "i8")  # 8 less the 4 planets
    code, out, _ = rag(capsys, *d, "delete", "-c", "c", "tea.txt")
    assert code == 0 and "deleted 0 of 1" in out  # ids are resolved paths
    code, out, _ = rag(capsys, *d, "delete", "-c", "c", str((CORPUS / "tea.txt").resolve()))
    assert code == 0 and "deleted 1 of 1" in out
    assert rag(capsys, *d, "drop", "c")[0] == 0
    code, out, _ = rag(capsys, *d, "collections")
    assert "no collections" in out


BATCH_FILES = {"BADLINE": '"fine"\n{"query": "q", "filter": {"n": {"$bad": 1}}}\n',
               "CLASH": '{"query": "q", "filter": {"kind": "tea"}}\n'}


@pytest.mark.parametrize("args, message", [
    (["search", "q", "-c", "missing"], "collection 'missing' does not exist"),
    (["search", "", "-c", "c"], "query is empty"),
    (["search", "q", "-c", "c", "-k", "0"], "k must be an integer in [1, 1000]"),
    (["search", "q", "-c", "c", "--filter", "kind"],
     "--filter takes FIELD=VALUE (or FIELD!=VALUE, FIELD>=VALUE, FIELD>VALUE, FIELD<=VALUE, FIELD<VALUE, "
     "FIELD~=VALUE), got 'kind'"),
    (["search", "q", "-c", "c", "--filter", "=md"], "--filter takes FIELD=VALUE (or FIELD!=VALUE"),
    (["search", "q", "-c", "c", "--filter", "n>1", "--filter", "n>2"], "--filter gives n> twice ('1' and '2')"),
    (["search", "q", "-c", "c", "--filter", "n>1", "--filter", "n<z"], "range bounds must all be numbers or all text"),
    (["delete", "-c", "c"], "give the ids of the documents to delete, or --filter FIELD=VALUE"),
    (["documents", "-c", "c", "--limit", "0"], "limit must be an integer in [1, 1000], got 0"),
    (["search", "-c", "c", "--batch", "BADLINE"], ":2: filter field 'n': unknown operator '$bad'"),
    (["search", "-c", "c", "--batch", "CLASH", "--filter", "kind=planet"],
     "entry 1: filter field 'kind': $eq is given twice ('planet' and 'tea')"),
    (["documents", "-c", "missing"], "collection 'missing' does not exist"),
    (["delete", "-c", "c", "x", "--filter", "kind=md"], "give document ids or a filter to delete by, not both"),
    (["create", "c"], "already exists"),
    (["create", "bad/name"], "collection name"),
])
def test_errors_exit_2_with_message(tmp_path, capsys, args, message):
    d = ["--data-dir", str(tmp_path)]
    for name, text in BATCH_FILES.items():
        (tmp_path / name).write_text(text)
    args = [str(tmp_path / a) if a in BATCH_FILES else a for a in args]
    assert rag(capsys, *d, "create", "c")[0] == 0
    code, out, err = rag(capsys, *d, *args)
    assert code == 2
    assert err.startswith("error: ") and message in err


def test_ingest_reports_skipped_files(tmp_path, capsys):
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "good.txt").write_text("a perfectly fine document")
    (bad / "bin.txt").write_bytes(b"\x00\x01\x02")
    code, out, err = rag(capsys, "--data-dir", str(tmp_path / "d"), "ingest", str(bad), "-c", "c")
    assert code == 0
    assert "skipped" in err and "bin.txt" in err
    assert "1 added" in out and "1 skipped" in out
    # nothing usable at all: exit 1
    code, out, err = rag(capsys, "--data-dir", str(tmp_path / "d"), "ingest", str(bad / "bin.txt"), "-c", "c")
    assert code == 1


def test_info_names_the_cpu_and_the_execution_plan(tmp_path, capsys):
    from engine.config import Config
    from engine.plan import cpu_key, resolve

    code, out, _ = rag(capsys, "--data-dir", str(tmp_path), "info", "--json")
    info = json.loads(out)
    assert code == 0 and info["cpu"] == cpu_key()
    assert info["execution_plan"].startswith(f"prefill {info['prefill_variant']}, decode {info['decode_variant']}")
    plan = resolve(Config().gen_model_dir)  # what make models measured here
    assert info["verify_rows_per_run"] == 8, "make models writes the verify weights' row-slots copy"
    assert (info["prefill_variant"], info["decode_variant"], info["verify_variant"]) == (plan.prefill, plan.decode,
                                                                                         plan.verify)
    assert info["decode_variant"] in ("int8", "int4") and info["plan_source"] in ("measured", "rule")
    other = "fp32" if info["prefill_variant"] != "fp32" else "int8"  # not what this machine's plan chose
    code, out, _ = rag(capsys, "--data-dir", str(tmp_path), "--gen-prefill-variant", other, "info")
    forced = resolve(Config().gen_model_dir, prefill=other)  # the verify weights may follow the prefill's
    assert code == 0 and f"prefill {other}, decode {plan.decode} for latency, drafts verified on {forced.verify} " \
        f"up to {forced.drafts} a run (set by config" in out
    code, out, _ = rag(capsys, "--data-dir", str(tmp_path), "--gen-verify-variant", "fp32", "info", "--json")
    assert code == 0 and json.loads(out)["verify_variant"] == "fp32"
    code, out, _ = rag(capsys, "--data-dir", str(tmp_path), "--plan-objective", "throughput", "info", "--json")
    busy = resolve(Config().gen_model_dir, objective="throughput")
    assert code == 0 and json.loads(out)["decode_variant"] == busy.decode
    assert json.loads(out)["plan_objective"] == "throughput"
    assert info["speculative_tokens"] == plan.drafts
    assert json.loads(out)["speculative_tokens"] == busy.drafts  # the objective's (0 where full runs do not pay)
    code, out, _ = rag(capsys, "--data-dir", str(tmp_path), "--speculative-tokens", "1", "info", "--json")
    assert code == 0 and json.loads(out)["speculative_tokens"] == 1
    code, _, err = rag(capsys, "--data-dir", str(tmp_path), "--speculative-tokens", "9", "info")
    assert code != 0 and "speculative_tokens must be an integer in [0, 7]" in err


def test_huge_pages_are_asked_for_only_by_rag_huge_pages():
    """RAG_HUGE_PAGES=1 adds glibc's huge-page tunable to the environment `rag serve` restarts
    with (kept after any tunables already set); off by default, never twice, never where
    GLIBC_TUNABLES already says how malloc uses huge pages."""
    from engine.cli import HUGE_PAGES_TUNABLE, huge_pages_env

    base = {"PATH": os.environ.get("PATH", "")}
    assert huge_pages_env(base) is None
    assert huge_pages_env({**base, "RAG_HUGE_PAGES": "0"}) is None
    on = huge_pages_env({**base, "RAG_HUGE_PAGES": "1"})
    if on is None:
        pytest.skip("no transparent huge pages for malloc here (not Linux with glibc >= 2.35, or THP never)")
    assert on["GLIBC_TUNABLES"] == HUGE_PAGES_TUNABLE and on["PATH"] == base["PATH"]
    assert huge_pages_env(on) is None  # the restarted process does not restart again
    mine = huge_pages_env({**base, "RAG_HUGE_PAGES": "1", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert mine["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}"
    assert huge_pages_env({**base, "RAG_HUGE_PAGES": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None


def test_rag_serve_with_huge_pages_restarts_itself_with_them(tmp_path):
    """`RAG_HUGE_PAGES=1 rag serve`: the same process (same id) runs with the tunable and
    serves. (How much memory the kernel then gives huge pages depends on its free memory:
    benchmarks/huge_pages.py reports it.)"""
    import grpc

    from engine.cli import huge_pages_env
    from serverproc import free_port, start_server
    from server.client import RagClient

    env = {**os.environ, "RAG_HUGE_PAGES": "1"}
    if huge_pages_env(env) is None:
        pytest.skip("no transparent huge pages for malloc here (not Linux with glibc >= 2.35, or THP never)")
    port = free_port()
    proc = start_server(tmp_path / "data", port, log=tmp_path / "server.log", env=env)
    try:
        environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{proc.pid}/environ").read_text().split("\0") if "=" in kv)
        assert "glibc.malloc.hugetlb=1" in environ["GLIBC_TUNABLES"] and environ["RAG_HUGE_PAGES_RESTARTED"] == "1"
        with RagClient(f"127.0.0.1:{port}") as client:
            client.create_collection("notes")
            with pytest.raises(grpc.RpcError) as e:
                client.search("missing", "anything")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_copy_a_collection_and_restore_a_backup(tmp_path, capsys):
    d = ["--data-dir", str(tmp_path / "data")]
    backup = tmp_path / "backup"
    assert rag(capsys, *d, "ingest", str(CORPUS), "-c", "notes", "-q")[0] == 0
    code, out, _ = rag(capsys, *d, "copy", "notes", "notes-old", "-q")
    assert code == 0 and out.startswith("copied notes to notes-old (8 documents, ")
    code, out, _ = rag(capsys, *d, "copy", "notes", "notes", "--to", str(backup), "-q")
    assert code == 0 and f"copied notes to notes in {backup} (8 documents" in out
    assert rag(capsys, *d, "drop", "notes")[0] == 0
    code, out, _ = rag(capsys, "--data-dir", str(backup), "copy", "notes", "notes", "--to", str(tmp_path / "data"), "-q")
    assert code == 0
    code, out, _ = rag(capsys, *d, "search", "How do I feed a sourdough starter?", "-c", "notes", "-k", "1", "--json")
    assert code == 0 and json.loads(out)["source"].endswith("bread.md")
    code, _, err = rag(capsys, *d, "copy", "notes", "notes-old")
    assert code == 2 and "error: collection 'notes-old' already exists" in err
    code, _, err = rag(capsys, *d, "copy", "missing", "x")
    assert code == 2 and "collection 'missing' does not exist" in err


def stdin_of(data: bytes):
    import io
    return io.TextIOWrapper(io.BufferedReader(io.BytesIO(data)), encoding="utf-8")


def test_ingest_reads_stdin(tmp_path, capsys, monkeypatch):
    """`rag ingest -`: JSONL records a line at a time, or one document of the type given."""
    d = ["--data-dir", str(tmp_path)]
    lines = b'{"id": "a", "text": "Zebras sleep standing up.", "n": 1}\nnot json\n{"id": "b", "text": "Owls hunt."}\n'
    monkeypatch.setattr(sys, "stdin", stdin_of(lines))
    code, out, err = rag(capsys, *d, "ingest", "-", "-c", "s", "--stdin-type", "jsonl", "--stdin-name", "feed", "-q")
    assert code == 0 and out.startswith("s: 2 added, 0 updated, 0 unchanged, 1 skipped") and "feed:2: not valid JSON" in err
    monkeypatch.setattr(sys, "stdin", stdin_of(b"<html><title>Tea</title><p>Green tea at 80 degrees.</p></html>"))
    assert rag(capsys, *d, "ingest", str(CORPUS / "tea.txt"), "-", "-c", "s", "--stdin-type", "html", "-q")[0] == 0
    code, out, _ = rag(capsys, *d, "documents", "-c", "s", "--json")
    docs = {json.loads(line)["doc_id"]: json.loads(line) for line in out.splitlines()}
    assert set(docs) == {"feed#a", "feed#b", "stdin", str((CORPUS / "tea.txt").resolve())}
    assert docs["feed#a"]["metadata"] == {"id": "a", "n": 1} and docs["stdin"]["metadata"] == {"title": "Tea"}
    for args, says in ((["-"], "needs --stdin-type"), ([str(CORPUS), "--stdin-type", "txt"], "give - among the paths"),
                       (["-", "-", "--stdin-type", "txt"], "give - (stdin) once")):
        code, _, err = rag(capsys, *d, "ingest", *args, "-c", "s")
        assert code == 2 and says in err, err
    monkeypatch.setattr(sys, "stdin", stdin_of(b"\x00\x01binary"))
    code, out, err = rag(capsys, *d, "ingest", "-", "-c", "s", "--stdin-type", "txt", "-q")
    assert code == 1 and "skipped stdin: " in err and "binary" in err


def test_copy_beside_the_collections_writer_leaves_it_writing(tmp_path, capsys, config, embedder):
    """`rag copy` reads its source as a reader: beside the writer (here an engine in this
    process, as a `rag serve` would be) it copies, and the writer keeps its lock and writes."""
    from engine.documents import Document
    from engine.pipeline import Engine
    writer = Engine(config.replace(data_dir=tmp_path), embedder=embedder)
    try:
        writer.create_collection("live")
        writer.ingest_paths("live", [CORPUS])
        code, out, err = rag(capsys, "--data-dir", str(tmp_path), "copy", "live", "snap", "-q")
        assert code == 0 and out.startswith("copied live to snap (8 documents"), err
        r = writer.ingest("live", [Document("new", "A note written after the copy.", "new.txt")])
        assert r.documents_added == 1 and writer.describe("live").documents == 9
        assert writer.describe("snap").documents == 8
    finally:
        writer.close()
