"""The rag.v1 Python stubs, generated from proto/ by grpcio-tools (never committed).

`make setup` generates them into server/_gen; if they are missing or older than the
.proto (a fresh clone, an edited proto), this module regenerates them on import.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
PROTO = PROTO_ROOT / "rag" / "v1" / "rag.proto"
GEN = Path(__file__).resolve().parent / "_gen"


def generate() -> None:
    from grpc_tools import protoc

    out = GEN / "rag" / "v1"
    out.mkdir(parents=True, exist_ok=True)
    for pkg in (GEN / "rag", out):
        (pkg / "__init__.py").touch()
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={GEN}",
                        f"--grpc_python_out={GEN}", str(PROTO)])
    if code != 0:
        raise RuntimeError(f"protoc failed ({code}) on {PROTO}")


def _stale() -> bool:
    pb = GEN / "rag" / "v1" / "rag_pb2.py"
    return not pb.exists() or pb.stat().st_mtime < PROTO.stat().st_mtime


if _stale():
    generate()
if str(GEN) not in sys.path:
    sys.path.insert(0, str(GEN))

pb = importlib.import_module("rag.v1.rag_pb2")
rpc = importlib.import_module("rag.v1.rag_pb2_grpc")

if __name__ == "__main__":
    generate()
    print(f"generated stubs in {GEN}")
