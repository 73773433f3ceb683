"""Guard rails: a collapsed generator and a too-small calibration set are reported, recorded
and logged; a healthy bundle is not flagged."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from vaegan.trainer.guards import (
    COLLAPSE_RATIO,
    calibration_size_report,
    collapse_report,
    image_variation,
)


def _textures(n: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def test_image_variation_is_the_mean_per_pixel_std_across_images() -> None:
    imgs = _textures()
    assert image_variation(imgs) == pytest.approx(imgs.astype(float).std(0).mean())
    assert image_variation(imgs, batch=7) == pytest.approx(image_variation(imgs))
    assert image_variation(np.full((10, 4, 4, 1), 77, np.uint8)) == 0.0


def test_collapse_fires_on_flat_reconstructions_only() -> None:
    imgs = _textures()
    flat = collapse_report(np.full_like(imgs, 128), imgs)  # one grey square for every input
    assert flat["fired"] and flat["ratio"] == 0.0 and "COLLAPSED" in flat["message"]
    almost = np.clip(128 + np.random.default_rng(1).normal(0, 0.5, imgs.shape), 0, 255).astype(np.uint8)
    assert collapse_report(almost, imgs)["fired"]  # sensor-noise-sized variation is still collapse
    blurry = (0.3 * imgs + 0.7 * imgs.mean(0)).astype(np.uint8)  # a blurry but input-dependent model
    ok = collapse_report(blurry, imgs)
    assert not ok["fired"] and ok["ratio"] > 4 * COLLAPSE_RATIO and ok["message"] is None
    # inputs that barely vary themselves do not make a faithful model look collapsed
    same = np.full_like(imgs, 90)
    assert not collapse_report(same, same)["fired"]
    assert collapse_report(np.full_like(imgs, 128))["fired"]  # without inputs: the absolute floor


def test_small_calibration_warning_at_30_images_and_1_percent() -> None:
    r = calibration_size_report(30, 0.01)
    assert r["fired"] and r["n_recommended"] == 1000 and r["n_minimum"] == 99
    assert r["fpr_std"] == pytest.approx(math.sqrt(0.01 * 0.99 / 30))
    assert "--val-fraction" in r["message"] and "--target-fpr" in r["message"]
    assert "1/(n+1)" in r["message"]  # below 1/a - 1 the threshold is the largest score
    assert not calibration_size_report(1000, 0.01)["fired"]
    assert calibration_size_report(999, 0.01)["fired"]
    assert not calibration_size_report(200, 0.05)["fired"]
    assert "more images" in calibration_size_report(30, 0.01, remedy="more images")["message"]


def test_tiny_bundle_is_not_flagged_as_collapsed(tiny_bundle: Path) -> None:
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    collapse = m["training"]["checks"]["collapse"]
    assert not collapse["fired"] and collapse["ratio"] > 10 * COLLAPSE_RATIO
    kinds = [w["kind"] for w in m["calibration"]["warnings"]]
    assert "collapse" not in kinds
    assert m["training"]["warnings"] == kinds


def test_a_flat_generator_is_flagged_logged_and_recorded(
    tiny_run, tmp_path: Path, caplog: pytest.LogCaptureFixture  # noqa: ANN001
) -> None:
    """The failure seen on CIFAR: a generator that outputs one flat grey square for every input."""
    import torch

    from vaegan.export import write_bundle
    from vaegan.trainer.calibrate import calibrate_bundle
    from vaegan.trainer.checkpoint import load_checkpoint, model_from_checkpoint
    from vaegan.trainer.pipeline import load_split

    outcome, cfg, _, spec = tiny_run
    model = model_from_checkpoint(load_checkpoint(outcome.run.checkpoint))
    with torch.no_grad():
        for p in model.generator.parameters():
            p.zero_()  # tanh(0) everywhere: mid grey
    write_bundle(model.eval(), spec, tmp_path / "flat", name="flat")
    split = load_split(cfg, spec)
    with caplog.at_level(logging.WARNING):
        cal = calibrate_bundle(tmp_path / "flat", split.calibration.images[:200],
                               selection_images=split.selection.images[:200], target_fpr=0.05)
    assert [w["kind"] for w in cal.warnings] == ["collapse"]
    assert cal.warnings[0]["recon_std"] < 0.5
    logged = " ".join(m.strip() for m in caplog.messages)  # the log wraps long lines
    assert "COLLAPSE WARNING" in logged and "Do not deploy" in logged
    m = json.loads((tmp_path / "flat" / "manifest.json").read_text())
    assert m["calibration"]["warnings"][0]["kind"] == "collapse"


def test_evaluate_reports_collapse_and_calibration_warnings(tiny_bundle: Path) -> None:
    from vaegan.service.runtime import Runtime
    from vaegan.trainer.data import load_dataset
    from vaegan.trainer.evaluate import evaluate

    rt = Runtime.load(tiny_bundle, providers="cpu")
    ev = evaluate(rt, load_dataset("synthetic", None, "test", rt.spec, limit=40), progress=False)
    assert ev.report["collapse"]["fired"] is False and ev.report["collapse"]["n"] == 20  # the normals
    assert ev.report["calibration_warnings"] == rt.bundle.manifest["calibration"]["warnings"]
    json.dumps(ev.report)  # report.json stays serializable
