"""Regenerate the committed stubs in ``kd/v1`` from ``proto/kd/v1/*.proto``."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTO_FILES = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "kd" / "v1").glob("*.proto"))


def protoc(args: list[str]) -> None:
    import grpc_tools
    from grpc_tools import protoc as _protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    rc = _protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{include}", *args, *PROTO_FILES])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")


def main() -> None:
    protoc([f"--python_out={ROOT}", f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}"])
    print(f"regenerated stubs for {', '.join(PROTO_FILES)}", file=sys.stderr)


if __name__ == "__main__":
    main()
