"""The serving side never loads torch (the serving image has none)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.blocking import run_blocked

REPO = Path(__file__).resolve().parents[2]


def test_service_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "import vaegan.service, vaegan.service.runtime\n"
        "from vaegan.service.runtime import Runtime\n"
        "import vaegan.cli\n"
        "vaegan.cli.build_parser()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision') "
        "or m.startswith(('vaegan.models', 'vaegan.trainer', 'vaegan.export')))\n"
        "assert not bad, bad\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"


def test_bundle_loads_in_a_process_that_blocks_torch(tiny_bundle: Path) -> None:
    """Make torch unimportable, then load and score the bundle: serving needs no torch."""
    code = (
        "import numpy as np\n"
        "from vaegan.service.runtime import Runtime\n"
        f"rt = Runtime.load({str(tiny_bundle)!r})\n"
        "res = rt.score(np.zeros((2, 32, 32, 3), np.uint8))\n"
        "print(len(res.score), res.is_outlier.dtype)\n"
    )
    out = run_blocked(("torch", "torchvision"), code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "bool"]


def test_batch_scoring_runs_where_torch_cannot_load(tiny_bundle: Path, tmp_path: Path) -> None:
    """`vaegan score --model` in a process that blocks torch; its decode workers import neither
    ONNX Runtime nor onnx (they start small and fast)."""
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40, 30), (i * 60, 90, 120)).save(tmp_path / f"{i}.png")
    code = (
        "import vaegan.service.batch.decode\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'onnx', 'grpc', 'pyarrow'))\n"
        "assert not heavy, heavy\n"
        "from vaegan.cli import main\n"
        f"code = main(['score', {str(tmp_path)!r}, '--model', {str(tiny_bundle)!r}, '--out', "
        f"{str(tmp_path / 'o.jsonl')!r}, '--workers', '1', '--no-progress'])\n"
        "print('exit', code)\n"
    )
    out = run_blocked(("torch", "torchvision"), code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "exit 0"
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 3


def test_loading_a_bundle_writes_nothing_under_home_or_tmp(tiny_bundle: Path, tmp_path: Path) -> None:
    """ONNX Runtime wrote a device id and a database under ~/.cache and a file in $TMPDIR at every
    session start; the runtime switches that off (a read-only root with /tmp only must do)."""
    home = tmp_path / "home"
    home.mkdir()
    code = f"from vaegan.service.runtime import Runtime\nRuntime.load({str(tiny_bundle)!r}, providers='cpu')\n"
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(home), TMPDIR=str(home))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == []
