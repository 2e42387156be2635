"""`rag serve` in a subprocess, for the tests that SIGKILL it or measure its memory."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, port: int, *, log: Path, global_args: Sequence[str] = (),
                 serve_args: Sequence[str] = (), timeout: float = 300,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `rag serve` from this checkout (python -m, so a worktree's code is what runs) and
    wait until its health check says SERVING. Its log is appended to `log`: a file, not a
    pipe, which would block the server's logging once full. `env`: its environment (default:
    this process's)."""
    with log.open("ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "--data-dir", str(data_dir), *global_args,
                                 "serve", "--address", f"127.0.0.1:{port}", *serve_args],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return proc
        except grpc.RpcError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text(errors='replace')[-3000:]}")
    proc.kill()
    raise RuntimeError("server did not start")
