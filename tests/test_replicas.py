"""Read-only serving replicas: two `rag serve --read-only` beside one writer, on loopback,
with one client spreading calls over both (gRPC round_robin)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from engine.cli import main
from engine.documents import Document
from engine.errors import InvalidInput
from engine.pipeline import Engine
from server.client import RagClient, channel_target
from serverproc import free_port, start_server

REPO = Path(__file__).resolve().parent.parent
WRITER = "10.9.8.7:50051"  # what the writer says about itself in writer.lock


def test_two_read_only_replicas_share_calls_see_writes_and_refuse_them(tmp_path, config, embedder, capsys):
    data = tmp_path / "data"
    writer = Engine(config.replace(data_dir=data), embedder=embedder,
                    owner={"command": "rag serve", "address": WRITER})
    writer.create_collection("c")
    writer.ingest_paths("c", [REPO / "examples" / "corpus"])
    ports = [free_port(), free_port()]
    procs = []
    try:
        for i, port in enumerate(ports):
            procs.append(start_server(data, port, log=tmp_path / f"replica{i}.log",
                                      serve_args=["--read-only", "--lazy-generator"]))
        addresses = [f"127.0.0.1:{p}" for p in ports]
        with RagClient(addresses, timeout=60) as client:
            ids, deadline = set(), time.monotonic() + 30
            while len(ids) < 2 and time.monotonic() < deadline:
                info = client.info()
                assert info.read_only
                ids.add(info.server_id)
            assert len(ids) == 2, f"calls reached only {ids}"

            first = [[h.doc_id for h in client.search("c", "green tea water temperature", 3)] for _ in range(4)]
            assert all(f == first[0] for f in first) and "tea" in first[0][0]

            with pytest.raises(grpc.RpcError) as e:
                client.ingest("c", [{"id": "x", "text": "A replica must not take this."}])
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "read-only" in e.value.details() and WRITER in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                client.delete("c", ["x"])
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.RpcError) as e:
                client.copy_collection("c", "c2")
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "read-only" in e.value.details()

            # The writer's commits reach both replicas.
            writer.ingest("c", [Document("zebra", "Zebras sleep standing up in the savanna.", "zebra.txt")])
            for _ in range(4):
                assert client.search("c", "how do zebras sleep", 1)[0].doc_id == "zebra"

            # One replica gone: the other serves every call, from the first one after the kill
            # (a read routed to the dead replica before the channel notices is tried again on
            # the other: the client's retry policy for reads)
            procs[0].kill()
            procs[0].wait(30)
            for _ in range(12):
                assert client.search("c", "how do zebras sleep", 1)[0].doc_id == "zebra"
                assert client.info().read_only

        # The CLI takes the same list, comma-separated.
        assert main(["search", "zebras", "-c", "c", "-k", "1", "--server", ",".join(addresses)]) == 0
        assert "zebra.txt" in capsys.readouterr().out
    finally:
        for p in procs:
            p.kill()
            p.wait(30)
        writer.close()


def test_replica_targets():
    assert channel_target("127.0.0.1:1") == "127.0.0.1:1"
    assert channel_target("dns:///replicas.internal:50051") == "dns:///replicas.internal:50051"
    assert channel_target(["127.0.0.1:1", "localhost:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("127.0.0.1:1,127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    with pytest.raises(InvalidInput, match="not HOST:PORT"):
        channel_target(["127.0.0.1:1", "nohost"])


class GoingAway(grpc.GenericRpcHandler):
    """A server that answers every call UNAVAILABLE, as one shutting down does, counting them."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def service(self, details):
        def fail(request, context):
            self.calls.append(details.method)
            context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")
        return grpc.unary_unary_rpc_method_handler(fail)


def test_reads_are_tried_again_on_the_next_server_writes_are_not(tmp_path, config, embedder):
    from concurrent.futures import ThreadPoolExecutor

    from server.app import create_server

    engine = Engine(config.replace(data_dir=tmp_path / "data", warm_generator=False), embedder=embedder)
    engine.create_collection("c")
    engine.ingest_paths("c", [REPO / "examples" / "corpus"])
    srv, port = create_server(engine.config, "127.0.0.1:0", engine=engine)
    away = GoingAway()
    bad = grpc.server(ThreadPoolExecutor(4), handlers=[away])
    bad_port = bad.add_insecure_port("127.0.0.1:0")
    bad.start()
    try:
        with RagClient([f"127.0.0.1:{bad_port}", f"127.0.0.1:{port}"], timeout=30) as client:
            for _ in range(8):  # half of them reach the failing server first: each then gets the other
                assert "tea" in client.search("c", "green tea water temperature", 1)[0].doc_id
                assert client.list_documents("c", page_size=1).documents
            assert any(m.endswith("/Search") for m in away.calls)
        with RagClient(f"127.0.0.1:{bad_port}", timeout=30) as only_bad:
            away.calls.clear()
            with pytest.raises(grpc.RpcError) as e:
                only_bad.search("c", "tea", 1)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and len(away.calls) == 4  # tried 4 times
            away.calls.clear()
            with pytest.raises(grpc.RpcError) as e:
                only_bad.delete("c", ["x"])
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and len(away.calls) == 1  # a write: once
    finally:
        bad.stop(0)
        srv.stop(0)
        engine.close()
