"""Regenerates the Python stubs of Mirador's protos.

    python protos/generate_python.py            # write the stubs
    python protos/generate_python.py --check    # exit 1 if the committed stubs are stale

The stubs land in services/common/generated/mirador/v1/ and are imported as
`mirador.v1` (protoc derives Python imports from proto paths; we keep that
instead of rewriting imports after generation). Never edit them by hand.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
OUT_ROOT = REPO / "services" / "common" / "generated"
PACKAGE_DIRS = ("mirador", "mirador/v1")


def generate(out_root: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "mirador" / "v1").glob("*.proto"))
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the message above")
    for package in PACKAGE_DIRS:
        init = out_root / package / "__init__.py"
        init.write_text('"""Generated from protos/ by protos/generate_python.py. Do not edit."""\n')


def stale_files(committed: Path, fresh: Path) -> list[str]:
    fresh_files = {p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file()}
    committed_files = {
        p.relative_to(committed) for p in committed.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    stale = sorted(str(p) for p in fresh_files ^ committed_files)
    for rel in fresh_files & committed_files:
        if not filecmp.cmp(fresh / rel, committed / rel, shallow=False):
            stale.append(str(rel))
    return sorted(stale)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if not args.check:
        generate(OUT_ROOT)
        print(f"stubs written to {OUT_ROOT.relative_to(REPO)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = stale_files(OUT_ROOT, Path(tmp))
    if stale:
        print("generated stubs differ from protos/: run `python protos/generate_python.py`", file=sys.stderr)
        for name in stale:
            print(f"  {name}", file=sys.stderr)
        return 1
    print("generated stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
