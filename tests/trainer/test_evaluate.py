"""Calibration, evaluation and selection on the tiny synthetic bundle, through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vaegan.cli import main
from vaegan.service.runtime import Runtime
from vaegan.service.runtime.bundle import load_bundle
from vaegan.trainer.data import load_dataset
from vaegan.trainer.evaluate import evaluate
from vaegan.trainer.selection import CORRUPTIONS, corrupt, select_weights

# The tiny fixture trains 3 epochs on 768 images: it must already separate defects clearly.
AUROC_FLOOR = 0.7
PIXEL_AUROC_FLOOR = 0.85
# 20-30 defective images: the tiny bundle's pixel AUROC there moves by 0.1 from one training
# seed to the next (0.79-0.99 on seeds 0-2); misplaced masks would give about 0.5
SMALL_SET_FLOOR = 0.7
AU_PRO_FLOOR = 0.5


@pytest.fixture(scope="module")
def synthetic_eval(tiny_bundle: Path):
    rt = Runtime.load(tiny_bundle, providers="cpu")
    test = load_dataset("synthetic", None, "test", rt.spec, limit=300)
    return rt, test, evaluate(rt, test, progress=False)


def test_tiny_bundle_separates_defects(synthetic_eval) -> None:
    _, test, ev = synthetic_eval
    r = ev.report
    assert r["n_normal"] == 150 and r["n_anomalous"] == 150
    assert r["image_auroc"] > AUROC_FLOOR, r
    assert r["pixel_auroc"] > PIXEL_AUROC_FLOOR, r
    assert set(r["component_auroc"]) == {"pixel", "feature", "disc", "pixel_local", "disc_local"}
    # the calibrated threshold keeps false positives near the 1% target on unseen normals
    assert r["fpr_at_threshold"] <= 0.06


def test_report_localisation_intervals_and_types(synthetic_eval) -> None:
    from vaegan.service.runtime.stats import auroc

    _, test, ev = synthetic_eval
    r = ev.report
    # MVTec's convention: the pixels of every test image, defect-free ones included
    assert r["pixel_auroc"] == pytest.approx(auroc(ev.maps.ravel(), test.masks.ravel()), abs=1e-12)
    assert r["au_pro_max_fpr"] == 0.3
    assert AU_PRO_FLOOR < r["au_pro"] <= 1.0, r
    for key in ("image_auroc", "pixel_auroc", "au_pro"):
        lo, hi = r[f"{key}_ci"]
        assert lo < r[key] < hi and hi - lo < 0.2, (key, lo, hi)
    assert r["bootstrap"] == {"resamples": 1000, "seed": 0, "confidence": 0.95, "unit": "image"}
    assert r["image_auroc_by_type"] == {"defect": pytest.approx(r["image_auroc"])}
    assert r["n_by_type"] == {"normal": 150, "defect": 150}
    json.dumps(r, allow_nan=False)  # every new value is a number, a list or None


def test_scores_are_deterministic_and_match_torch(synthetic_eval, tiny_run) -> None:
    import torch

    from vaegan.trainer.checkpoint import load_checkpoint
    from vaegan.trainer.loop import components_torch, to_tensor
    from vaegan.trainer.pipeline import select_checkpoint

    rt, test, _ = synthetic_eval
    a = rt.score(test.images[:16])
    b = rt.score(test.images[:16])
    assert np.array_equal(a.score, b.score)
    outcome, cfg, _, spec = tiny_run
    from vaegan.trainer.checkpoint import model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(select_checkpoint(outcome.run, cfg.select_checkpoint)))
    with torch.no_grad():
        ref = components_torch(model, to_tensor(test.images[:16], spec), torch.device("cpu"))
    for k in ("pixel", "feature", "disc"):
        assert np.max(np.abs(ref[k] - a.components[k])) < 1e-4, k


def test_selection_keeps_equal_weights_unless_dropping_clearly_helps() -> None:
    rng = np.random.default_rng(0)
    n = 400
    normal = {"pixel": rng.normal(0, 1, n), "feature": rng.normal(0, 1, n), "disc": rng.normal(0, 1, n)}
    # pixel and feature separate; disc is anti-informative and drags the sum down
    bad = {"pixel": rng.normal(2, 1, n), "feature": rng.normal(1.5, 1, n), "disc": rng.normal(-2, 1, n)}
    w, report = select_weights(normal, bad)
    assert w == {"pixel": 1.0, "feature": 1.0, "disc": 0.0}
    assert report["dropped"][0]["dropped"] == "disc"
    assert report["selection_auroc"] > report["equal_weights_auroc"] + 0.01
    assert report["component_auroc"]["disc"] < 0.5
    # the weakest component stays when it still helps the sum
    weak = dict(bad, disc=rng.normal(1.2, 1, n))
    w2, report2 = select_weights(normal, weak)
    assert w2 == {"pixel": 1.0, "feature": 1.0, "disc": 1.0} and report2["dropped"] == []
    # pure noise only dilutes the sum: it goes
    w3, _ = select_weights(normal, dict(bad, disc=rng.normal(0, 1, n)))
    assert w3["disc"] == 0.0


def test_corruptions_change_every_image() -> None:
    imgs = load_dataset("synthetic", None, "train", None, limit=60).images
    bad, kinds = corrupt(imgs, seed=1)
    assert bad.shape == imgs.shape and bad.dtype == np.uint8
    assert set(kinds.tolist()) == set(range(len(CORRUPTIONS)))
    changed = np.abs(bad.astype(int) - imgs).reshape(len(imgs), -1).max(1) > 0
    assert changed.mean() > 0.95
    assert np.array_equal(bad, corrupt(imgs, seed=1)[0])  # deterministic


def test_evaluate_cli_writes_every_artifact(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", str(tiny_bundle), "--dataset", "synthetic", "--limit", "120",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("image_auroc", "image_auprc", "f1", "fpr_at_threshold", "tpr_at_threshold",
                "component_auroc", "pixel_auroc", "n_normal", "n_anomalous", "model"):
        assert key in report, key
    assert report["model"] == {"name": "tiny", "version": "1"}
    assert report["pixel_auroc"] is not None  # synthetic data carries masks
    for png in ("roc.png", "histogram.png", "extremes.png"):
        assert (out / png).stat().st_size > 1000
    assert "image AUROC" in capsys.readouterr().out


def test_evaluate_cli_folder_pair_with_masks(tiny_bundle: Path, tmp_path: Path) -> None:
    from PIL import Image

    test = load_dataset("synthetic", None, "test", None, limit=40)
    for sub in ("normal", "anomalous", "masks"):
        (tmp_path / sub).mkdir()
    for i, (img, lab, m) in enumerate(zip(test.images, test.labels, test.masks, strict=True)):
        if lab == 0:
            Image.fromarray(img).save(tmp_path / "normal" / f"{i}.png")
        else:
            Image.fromarray(img).save(tmp_path / "anomalous" / f"{i}.png")
            Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / "masks" / f"{i}.png")
    rc = main(["evaluate", "--model", str(tiny_bundle), "--normal", str(tmp_path / "normal"),
               "--anomalous", str(tmp_path / "anomalous"), "--masks", str(tmp_path / "masks"),
               "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["n_normal"] == 20 and report["n_anomalous"] == 20
    # the files lead to the figures of the same images evaluated in memory (masks matched to their
    # images, nothing resized), and those are well above chance
    direct = evaluate(Runtime.load(tiny_bundle, providers="cpu"), test, progress=False).report
    assert report["pixel_auroc"] == pytest.approx(direct["pixel_auroc"], abs=1e-6)
    assert report["image_auroc"] == pytest.approx(direct["image_auroc"], abs=1e-6)
    assert report["pixel_auroc"] > SMALL_SET_FLOOR


def test_evaluate_cli_mvtec_layout_reports_each_defect_type(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    test = load_dataset("synthetic", None, "test", None, limit=60)
    root = tmp_path / "mvtec"
    counts = {"good": 0, "blob": 0, "scratch": 0}
    for i, (img, lab, m) in enumerate(zip(test.images, test.labels, test.masks, strict=True)):
        kind = "good" if lab == 0 else ("blob", "scratch")[i // 2 % 2]
        name = f"{counts[kind]:03d}.png"
        counts[kind] += 1
        for folder in [f"test/{kind}", *(["train/good"] if kind == "good" and i < 8 else [])]:
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / folder / name)
        if kind != "good":
            (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(m.astype(np.uint8) * 255).save(root / "ground_truth" / kind / f"{name[:3]}_mask.png")
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", str(tiny_bundle), "--dataset", "mvtec", "--data-root", str(root),
               "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n_by_type"] == counts == {"good": 30, "blob": 15, "scratch": 15}
    assert report["n_normal"] == 30 and report["n_anomalous"] == 30
    assert set(report["image_auroc_by_type"]) == {"blob", "scratch"}
    assert all(0.5 < v <= 1.0 for v in report["image_auroc_by_type"].values()), report
    direct = evaluate(Runtime.load(tiny_bundle, providers="cpu"), test, progress=False).report
    assert report["pixel_auroc"] == pytest.approx(direct["pixel_auroc"], abs=1e-6)
    assert report["au_pro"] > AU_PRO_FLOOR and report["pixel_auroc"] > SMALL_SET_FLOOR
    printed = capsys.readouterr().out
    assert "AU-PRO (FPR <= 0.3)" in printed and "image AUROC by type: blob" in printed


def test_calibrate_changes_threshold_version_and_checksums(tiny_bundle: Path, tmp_path: Path) -> None:
    from PIL import Image

    before = load_bundle(tiny_bundle)
    data = tmp_path / "normals"
    data.mkdir()
    # brighter "normals": a shifted distribution must move the calibration
    imgs = load_dataset("synthetic", None, "train", None, limit=80).images
    for i, img in enumerate(imgs):
        Image.fromarray(np.clip(img.astype(int) + 60, 0, 255).astype(np.uint8)).save(data / f"{i}.png")
    out = tmp_path / "recal"
    rc = main(["calibrate", "--model", str(tiny_bundle), "--data", str(data), "--out", str(out),
               "--target-fpr", "0.05"])
    assert rc == 0
    after = load_bundle(out)  # verifies every sha256
    assert after.calibration is not None and before.calibration is not None
    assert after.calibration.target_fpr == 0.05
    # half of the 80 choose the weights and the mean/std, the other half set the threshold
    assert after.calibration.n == 40 and after.calibration.parts["selection"]["n"] == 40
    assert after.calibration.stats["pixel"] != before.calibration.stats["pixel"]
    assert int(after.version) == int(before.version) + 1
    files_after = json.loads((out / "manifest.json").read_text())["files"]
    assert files_after["calibration"] != before.manifest["files"]["calibration"]
    assert {k: v for k, v in files_after.items() if k.endswith(".onnx")} == {
        k: v for k, v in before.manifest["files"].items() if k.endswith(".onnx")}  # graphs unchanged
    # the original is untouched
    assert load_bundle(tiny_bundle).calibration.n == before.calibration.n
    shutil.rmtree(out)
