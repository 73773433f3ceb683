"""`vaegan demo` end to end (shortened): train, export, serve over gRPC, score, picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vaegan.cli import main
from vaegan.service.runtime import Runtime


def test_demo_runs_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--max-train", "128", "--test-images", "100"]) == 0
    text = capsys.readouterr().out
    assert "via gRPC at 127.0.0.1:" in text  # scored through a real server
    assert "image AUROC" in text and "pixel AUROC" in text
    grid = np.asarray(Image.open(out / "demo_grid.png"))
    assert grid.ndim == 3 and grid.shape[0] > 3 * 32 and grid.std() > 10  # three rows of pictures
    rt = Runtime.load(out / "bundle")
    assert rt.bundle.name == "demo" and rt.bundle.calibration is not None
