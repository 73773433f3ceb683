"""The held-out normals in two parts: selection (checkpoint, weights, mean/std) and calibration
(threshold only); disjoint, deterministic, recorded; ``vaegan calibrate`` rebuilds them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vaegan.trainer.config import TrainConfig
from vaegan.trainer.data import DatasetError, ImageSet
from vaegan.trainer.selection import ids_digest, split_held_out

REPO = Path(__file__).resolve().parents[2]


def _ids(s: ImageSet) -> set[str]:
    return set(s.ids or [])


def _assert_disjoint(*parts: ImageSet) -> None:
    for i, a in enumerate(parts):
        assert len(_ids(a)) == len(a)  # ids unique within a part
        for b in parts[i + 1 :]:
            assert not _ids(a) & _ids(b)


def test_split_held_out_is_deterministic_disjoint_and_sized() -> None:
    imgs = np.zeros((101, 4, 4, 1), np.uint8)
    held = ImageSet(imgs, np.zeros(101), None, ["x"], ids=[f"f{i}" for i in range(101)])
    sel, cal = split_held_out(held, 0.3, seed=4)
    assert (len(sel), len(cal)) == (30, 71)
    _assert_disjoint(sel, cal)
    assert _ids(sel) | _ids(cal) == _ids(held)
    again_sel, _ = split_held_out(held, 0.3, seed=4)
    assert again_sel.ids == sel.ids
    assert split_held_out(held, 0.3, seed=5)[0].ids != sel.ids
    assert len(split_held_out(held.subset(np.arange(5)), 0.01, seed=0)[0]) == 2  # >= 2 per part
    with pytest.raises(ValueError, match="need >= 4"):
        split_held_out(held.subset(np.arange(3)), 0.5, seed=0)


def test_load_split_parts_never_share_an_id_and_rebuild_identically() -> None:
    from vaegan.trainer.pipeline import image_spec_for, load_split

    cfg = TrainConfig(dataset="synthetic", max_train=300, val_fraction=0.2, selection_fraction=0.5)
    spec = image_spec_for("synthetic", 32, 3)
    split = load_split(cfg, spec)
    assert (len(split.train), len(split.selection), len(split.calibration)) == (300, 400, 400)
    _assert_disjoint(split.train, split.selection, split.calibration)
    assert split.held_out_from == {"train": 800}
    again = load_split(cfg, spec)
    assert again.record() == split.record()
    assert split.record()["calibration"]["ids_sha256"] == ids_digest(split.calibration.ids)


def test_a_validation_split_joins_the_held_out_normals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Datasets with their own validation split (mvtec): held-out = validation + val_fraction of
    train; clashing ids are prefixed by split, so the parts still never share one."""
    import vaegan.trainer.pipeline as pipeline

    def fake_load(name, root, split, spec, *, seed=0, limit=None):  # noqa: ANN001, ANN202
        n = {"train": 100, "validation": 20}.get(split)
        if n is None:
            raise DatasetError(f"no {split}")
        imgs = np.full((n, 8, 8, 3), 1 if split == "train" else 2, np.uint8)
        return ImageSet(imgs, np.zeros(n), None, ["good"])  # ids "0".."n-1" in both splits

    monkeypatch.setattr(pipeline, "load_dataset", fake_load)
    split = pipeline.load_split(TrainConfig(dataset="synthetic", val_fraction=0.2), None)  # type: ignore[arg-type]
    assert split.held_out_from == {"train": 20, "validation": 20}
    assert len(split.train) == 80 and len(split.selection) + len(split.calibration) == 40
    held = split.selection.ids + split.calibration.ids
    assert sum(i.startswith("validation:") for i in held) == 20
    assert all(i.startswith(("train:", "validation:")) for i in held)
    _assert_disjoint(split.selection, split.calibration)
    # validation images reach both parts (seeded mix), train ids stay as they were
    assert (split.selection.images == 2).any() and (split.calibration.images == 2).any()
    assert not _ids(split.train) & {i.split(":", 1)[1] for i in held if i.startswith("train:")}


def test_manifest_records_the_parts_and_stats_come_from_the_selection_part(tiny_run) -> None:  # noqa: ANN001
    from vaegan.service.runtime import Runtime
    from vaegan.service.runtime.scoring import component_stats
    from vaegan.trainer.calibrate import components_of
    from vaegan.trainer.pipeline import load_split

    outcome, cfg, _, spec = tiny_run
    m = json.loads((outcome.bundle_dir / "manifest.json").read_text())
    cal_block = m["calibration"]
    split = load_split(cfg, spec)
    rec = split.record()
    for part in ("train", "selection", "calibration"):
        assert cal_block["parts"][part] == rec[part]
    assert cal_block["n"] == len(split.calibration) and m["training"]["n_calibration"] == len(split.calibration)
    assert cal_block["selection"]["n_normal"] == len(split.selection)  # weights chosen on the selection part
    assert cal_block["stats_source"] == "selection part"
    rt = Runtime.load(outcome.bundle_dir, providers="cpu")
    sel_stats = component_stats(components_of(rt, split.selection.images)[0])
    cal_stats = component_stats(rt.bundle.calibration.samples)
    for k, (mean, std) in rt.bundle.calibration.stats.items():
        assert (mean, std) == pytest.approx(sel_stats[k], rel=1e-5)
        assert mean != pytest.approx(cal_stats[k][0], rel=1e-6)  # not the calibration samples'


def test_calibrate_defaults_to_the_train_split_and_rebuilds_the_calibration_part(
    tiny_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from vaegan.cli import build_parser, main
    from vaegan.service.runtime.bundle import load_bundle

    assert build_parser().parse_args(["calibrate", "--model", "m"]).split == "train"
    model = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, model)
    before = json.loads((model / "manifest.json").read_text())["calibration"]
    assert main(["calibrate", "--model", str(model), "--dataset", "synthetic"]) == 0
    after = load_bundle(model)
    parts = after.manifest["calibration"]["parts"]
    assert parts["calibration"] == before["parts"]["calibration"]  # the very images training held out
    assert parts["selection"] == before["parts"]["selection"]
    assert after.calibration.threshold() == pytest.approx(before["threshold"], rel=1e-5)
    assert int(after.version) == 2
    # other data than the bundle's: its train split, with a note, split into two parts
    with caplog.at_level("INFO"):
        assert main(["calibrate", "--model", str(model), "--dataset", "synthetic", "--normal-class", "0",
                     "--limit", "60"]) == 0
    assert "is not the data this bundle was trained on" in caplog.text
    parts = load_bundle(model).manifest["calibration"]["parts"]
    assert parts["source"] == "synthetic/train"
    assert parts["selection"]["n"] + parts["calibration"]["n"] == 60


def test_calibrate_refuses_a_nan_weight_in_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    model = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, model)
    out = subprocess.run(
        [sys.executable, "-m", "vaegan", "calibrate", "--model", str(model), "--dataset", "synthetic",
         "--weights", "1,nan,1"], cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "feature" in lines[0] and "finite" in lines[0] and "Traceback" not in out.stderr
    assert json.loads((model / "manifest.json").read_text()) == json.loads((tiny_bundle / "manifest.json").read_text())
