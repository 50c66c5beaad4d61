"""Compile the Open Inference Protocol's .proto files into the descriptor set the service loads.

    python scripts/compile_v2_protos.py            # rewrite service/v2/proto/inference.binpb
    python scripts/compile_v2_protos.py --check    # exit 1 when the committed file is not what the .proto files compile to

Needs grpcio-tools (the dev extra), which bundles protoc; the service itself needs only protobuf.
The .proto files are Triton's, unchanged; service/v2/proto/README.md says where they come from.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent.parent / "service" / "v2" / "proto"
SOURCES = ["grpc_service.proto", "model_config.proto"]
OUTPUT = PROTO_DIR / "inference.binpb"


def compile_protos() -> bytes:
    """The serialised FileDescriptorSet of SOURCES (with their imports), as protoc writes it."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "inference.binpb"
        args = ["protoc", f"--proto_path={PROTO_DIR}", f"--descriptor_set_out={out}", "--include_imports", *SOURCES]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {', '.join(SOURCES)} in {PROTO_DIR}")
        return out.read_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed descriptor set instead of writing it")
    args = parser.parse_args()
    compiled = compile_protos()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_bytes() != compiled:
            print(f"{OUTPUT} is not what {', '.join(SOURCES)} compile to: run scripts/compile_v2_protos.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_bytes(compiled)
    print(f"wrote {OUTPUT} ({len(compiled)} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
