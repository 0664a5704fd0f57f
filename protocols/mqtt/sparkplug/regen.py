"""Regenerate ``sparkplug_b_pb2.py`` from ``sparkplug_b.proto`` (needs the dev extras)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

__all__ = ["generate", "main"]

_HERE = Path(__file__).resolve().parent
PROTO = _HERE / "sparkplug_b.proto"
MODULE = _HERE / "sparkplug_b_pb2.py"


def generate() -> str:
    """The module text protoc writes for the committed .proto."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as out:
        rc = protoc.main(["protoc", f"-I{_HERE}", f"--python_out={out}", str(PROTO)])
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        return (Path(out) / "sparkplug_b_pb2.py").read_text()


def main() -> int:
    MODULE.write_text(generate())
    print(f"wrote {MODULE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
