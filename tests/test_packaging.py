"""Packaging: one line naming the missing extra; GPU providers either start or say why in one line;
a serving install without onnx still serves old bundles."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.blocking import run_blocked
from vaegan.service.runtime import session

REPO = Path(__file__).resolve().parents[1]

@pytest.mark.parametrize(
    "blocked,argv,extra",
    [
        (("torch",), ["train", "--out", "x", "--epochs", "1"], "train"),
        (("torch",), ["demo", "--out", "x"], "train"),
        (("pyarrow",), ["score", "a.png", "--model", "m", "--out", "o.parquet"], "batch"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(blocked: tuple[str, ...], argv: list[str], extra: str) -> None:
    out = run_blocked(blocked, f"from vaegan.cli import main\nsys.exit(main({argv!r}))\n")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"pip install 'vaegan[{extra}]'" in lines[0] and blocked[0] in lines[0]


def test_explicit_cuda_on_a_cpu_build_names_the_gpu_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(session, "_installed", lambda dist: dist == "onnxruntime")
    with pytest.raises(ValueError, match=r"--providers cuda: CUDAExecutionProvider is not in this onnxruntime build.*vaegan\[gpu\]"):
        session.resolve_providers("cuda")
    # both wheels installed: the CPU one's files win; the message says how to keep only the GPU one
    monkeypatch.setattr(session, "_installed", lambda dist: True)
    with pytest.raises(ValueError, match="both onnxruntime .CPU. and onnxruntime-gpu are installed"):
        session.resolve_providers("tensorrt")
    assert session.resolve_providers("auto") == ["CPUExecutionProvider"]


def test_explicit_cuda_without_a_driver_or_that_falls_back_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(session, "cuda_driver_present", lambda: False)
    with pytest.raises(ValueError, match="no NVIDIA driver"):
        session.resolve_providers("cuda")
    assert session.resolve_providers("auto") == ["CPUExecutionProvider"]  # auto never asks without a driver
    preloaded = []
    monkeypatch.setattr(session, "cuda_driver_present", lambda: True)
    monkeypatch.setattr(session.ort, "preload_dlls", lambda: preloaded.append(1), raising=False)
    assert session.resolve_providers("cuda")[0] == "CUDAExecutionProvider" and preloaded
    # ONNX Runtime fell back to the CPU: explicit cuda fails, auto only warns
    with pytest.raises(ValueError, match="could not start CUDAExecutionProvider and fell back to CPUExecutionProvider"):
        session.check_provider_started("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"])
    session.check_provider_started("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"])


def test_cuda_on_this_machine_exits_2_in_one_line(tiny_bundle: Path) -> None:
    """No GPU here: whichever onnxruntime is installed, --providers cuda says why in one line."""
    out = subprocess.run(
        [sys.executable, "-m", "vaegan", "evaluate", "--model", str(tiny_bundle), "--out", "/tmp/x",
         "--providers", "cuda", "--dataset", "synthetic"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and "--providers cuda" in lines[0] and "Traceback" not in out.stderr


def test_an_old_bundle_serves_without_onnx_installed(tiny_bundle: Path, tmp_path: Path) -> None:
    """A serving install has no onnx: a bundle without pipeline.onnx runs its three graphs."""
    from vaegan.service.runtime.bundle import PIPELINE, write_manifest

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    (old / PIPELINE).unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["files"][PIPELINE]
    write_manifest(old, manifest)
    body = (
        "import logging, numpy as np\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from vaegan.service.runtime import Runtime\n"
        f"rt = Runtime.load({str(old)!r}, providers='cpu')\n"
        "res = rt.score(np.zeros((2, 32, 32, 3), np.uint8))\n"
        "print(rt.pipeline is None, len(res.score))\n"
    )
    out = run_blocked(("onnx",), body)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "2"]
    assert "onnx is not installed" in out.stderr
