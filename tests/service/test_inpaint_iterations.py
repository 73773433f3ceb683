"""How many model runs an inpainting takes follows how the bundle was trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from vaegan.service.runtime import Runtime
from vaegan.service.runtime.bundle import load_bundle


def test_a_bundle_trained_with_holes_completes_them_in_two_runs(tiny_bundle: Path, tmp_path: Path) -> None:
    rt = Runtime.load(tiny_bundle, providers="cpu")
    assert not rt.bundle.trained_with_holes and rt.inpaint_iterations == 4
    masked = tmp_path / "masked"
    shutil.copytree(tiny_bundle, masked)
    manifest = json.loads((masked / "manifest.json").read_text())
    manifest["training"]["train_config"]["mask_prob"] = 0.5
    (masked / "manifest.json").write_text(json.dumps(manifest))
    rt2 = Runtime(load_bundle(masked), providers="cpu")
    assert rt2.bundle.trained_with_holes and rt2.inpaint_iterations == 2
    # the runs are really made: counted on the generator's graph
    calls = []
    real = rt2.reconstruct_normalized
    rt2.reconstruct_normalized = lambda *a, **k: calls.append(1) or real(*a, **k)  # type: ignore[method-assign]
    x = np.zeros((1, rt2.spec.channels, rt2.spec.height, rt2.spec.width), np.float32)
    mask = np.zeros((1, rt2.spec.height, rt2.spec.width), bool)
    mask[:, 8:16, 8:16] = True
    rt2.inpaint_normalized(x, mask)
    assert len(calls) == 2
