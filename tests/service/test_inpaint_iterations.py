"""How many model runs an inpainting takes follows how the bundle was trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from vaegan.service.runtime import Runtime
from vaegan.service.runtime.bundle import load_bundle


def _with_mask_prob(bundle: Path, dest: Path, mask_prob: float) -> Runtime:
    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["training"]["train_config"]["mask_prob"] = mask_prob
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return Runtime(load_bundle(dest), providers="cpu")


def test_a_bundle_trained_with_holes_completes_them_in_two_runs(tiny_bundle: Path, tmp_path: Path) -> None:
    plain = _with_mask_prob(tiny_bundle, tmp_path / "plain", 0.0)
    assert not plain.bundle.trained_with_holes and plain.inpaint_iterations == 4
    holes = _with_mask_prob(tiny_bundle, tmp_path / "holes", 0.5)
    assert holes.bundle.trained_with_holes and holes.inpaint_iterations == 2
    assert Runtime(load_bundle(tiny_bundle), providers="cpu", inpaint_iterations=3).inpaint_iterations == 3
    # the runs are really made: counted on the reconstruction the loop calls
    for rt, expected in ((plain, 4), (holes, 2)):
        calls: list[int] = []
        real = rt.reconstruct_normalized
        rt.reconstruct_normalized = lambda *a, real=real, calls=calls, **k: calls.append(1) or real(*a, **k)  # type: ignore[method-assign]
        x = np.zeros((1, rt.spec.channels, rt.spec.height, rt.spec.width), np.float32)
        mask = np.zeros((1, rt.spec.height, rt.spec.width), bool)
        mask[:, 8:16, 8:16] = True
        rt.inpaint_normalized(x, mask)
        assert len(calls) == expected
