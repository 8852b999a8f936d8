"""Regenerate the Python gRPC stubs from ``proto/moeyard/v1/*.proto``.

    .venv/bin/python proto/generate.py

Writes ``moeyard/v1/*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` at the
repository root (the generated code imports ``moeyard.v1``). The stubs are
committed so every node (and the container image) can import them without
grpcio-tools; ``tests/test_proto_stubs.py`` checks they are up to date.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def generate(out_dir: Path = ROOT) -> list[Path]:
    from grpc_tools import protoc

    sources = sorted((PROTO_ROOT / "moeyard" / "v1").glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}"] + [str(s.relative_to(PROTO_ROOT)) for s in sources]
    import os

    cwd = os.getcwd()
    os.chdir(PROTO_ROOT)
    try:
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
    finally:
        os.chdir(cwd)
    pkg = out_dir / "moeyard" / "v1"
    for init in (out_dir / "moeyard" / "__init__.py", pkg / "__init__.py"):
        if not init.exists():
            init.write_text("")
    return sorted(pkg.glob("*_pb2*.py*"))


if __name__ == "__main__":
    for p in generate():
        print(p.relative_to(ROOT))
    sys.exit(0)
