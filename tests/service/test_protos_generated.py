"""The checked-in generated protobuf/gRPC modules match what protos/generate.py produces."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_generate():
    spec = importlib.util.spec_from_file_location("protos_generate", REPO / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_has_not_drifted(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    generate = _load_generate()
    produced = generate.generate(tmp_path)
    assert produced, "no .proto files found"
    for path in produced:
        rel = path.relative_to(tmp_path)
        checked_in = REPO / rel
        assert checked_in.is_file(), f"{rel} is not checked in; run python protos/generate.py"
        assert checked_in.read_bytes() == path.read_bytes(), (
            f"{rel} differs from the generator's output; run python protos/generate.py"
        )


def test_generated_modules_import_under_the_repo_package() -> None:
    from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
    from vaegan.protos.vaegan.v1 import outlier_service_pb2_grpc as pb_grpc

    assert pb.DESCRIPTOR.name == "protos/vaegan/v1/outlier_service.proto"
    assert pb.DESCRIPTOR.package == "vaegan.v1"
    service = pb.DESCRIPTOR.services_by_name["OutlierService"]
    assert [m.name for m in service.methods] == [
        "Score", "ScoreStream", "Inpaint", "GetModelInfo", "ListModels", "Sample", "Interpolate",
    ]
    assert hasattr(pb_grpc, "OutlierServiceStub")
