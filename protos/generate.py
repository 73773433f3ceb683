"""Regenerate the Python modules of every ``.proto`` under ``protos/`` with grpc_tools.protoc.

    python protos/generate.py              # rewrite the checked-in files beside the .proto files
    python protos/generate.py --out DIR    # write the tree under DIR instead (the drift test)

The repository root is the include path, so ``protos/vaegan/v1/outlier_service.proto`` keeps
that name inside the descriptors. The folder installs as the package ``vaegan.protos``, so the
generated modules' own imports are rewritten from ``protos.`` to ``vaegan.protos.`` (the one
post-processing step). Output: ``*_pb2.py``, ``*_pb2.pyi`` (types) and
``*_pb2_grpc.py``. The result depends only on the .proto files and the grpcio-tools version
pinned in pyproject.toml.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

__all__ = ["PROTO_ROOT", "REPO_ROOT", "generate", "proto_files"]

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent


def proto_files() -> list[Path]:
    """Every .proto below ``protos/``, relative to the repository root, sorted."""
    return sorted(p.relative_to(REPO_ROOT) for p in PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path = REPO_ROOT) -> list[Path]:
    """Run protoc on every .proto; returns the generated files (absolute paths under out_dir)."""
    from grpc_tools import protoc  # dev dependency: imported only when generating

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    files = proto_files()
    args = [
        "grpc_tools.protoc",
        f"--proto_path={REPO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(f) for f in files),
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code} on {[str(f) for f in files]}")
    out = []
    for f in files:
        stem = out_dir / f.parent / f.stem
        out += [Path(f"{stem}_pb2.py"), Path(f"{stem}_pb2.pyi"), Path(f"{stem}_pb2_grpc.py")]
    for path in out:
        text = path.read_text()
        fixed = text.replace("from protos.", "from vaegan.protos.").replace("'protos.", "'vaegan.protos.")
        if fixed != text:
            path.write_text(fixed)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: repo)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
