"""vaegan export --precision int8|fp16: real quantization of a bundle the session trained."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from vaegan.cli import main
from vaegan.service.runtime import Runtime
from vaegan.service.runtime.stats import auroc
from vaegan.trainer.data import load_dataset


@pytest.fixture(scope="module")
def int8_bundle(tiny_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "bundle"
    ckpt = tiny_run[0].run.checkpoint
    # the tiny model's AUROC moves by a few thousandths either way; the refusal has its own test
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--precision", "int8",
                 "--max-auroc-drop", "0.05"]) == 0
    return out


def _op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_int8_bundle_is_quantized_recalibrated_and_scores_like_fp32(int8_bundle: Path, tiny_bundle: Path) -> None:
    for f in ("encoder.onnx", "generator.onnx", "discriminator.onnx", "pipeline.onnx"):
        ops = _op_types(int8_bundle / f)
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, f  # QDQ int8 graphs
        assert "QuantizeLinear" not in _op_types(tiny_bundle / f)
    # ConvTranspose stays float32 (no int8 kernel on ONNX Runtime's CPU provider): its weight is
    # a plain float initializer, not the output of a DequantizeLinear
    gen = onnx.load(str(int8_bundle / "generator.onnx")).graph
    floats = {i.name for i in gen.initializer if i.data_type == onnx.TensorProto.FLOAT}
    deconvs = [n for n in gen.node if n.op_type == "ConvTranspose"]
    assert deconvs and all(n.input[1] in floats for n in deconvs)
    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    p = manifest["precision"]
    assert p["precision"] == "int8" and p["auroc_drop"] == pytest.approx(p["auroc_fp32"] - p["auroc"])
    assert set(p["component_max_abs_error"]) >= {"pixel", "feature", "disc"}
    fp32 = json.loads((tiny_bundle / "manifest.json").read_text())
    # recalibrated on its own scores, the fp32 weights kept
    assert manifest["calibration"]["weights"] == fp32["calibration"]["weights"]
    assert manifest["calibration"]["threshold"] != fp32["calibration"]["threshold"]
    images = load_dataset("synthetic", None, "test", None, limit=64).images
    s32 = Runtime.load(tiny_bundle, providers="cpu").score(images)
    s8 = Runtime.load(int8_bundle, providers="cpu").score(images)  # the checksums match the new graphs
    for k in ("pixel", "feature", "disc"):
        assert np.corrcoef(s32.components[k], s8.components[k])[0, 1] > 0.95, k
    labels = load_dataset("synthetic", None, "test", None, limit=64).labels != 0
    assert auroc(s8.score, labels) > auroc(s32.score, labels) - 0.1


def test_a_bundle_that_detects_worse_is_refused_and_nothing_is_written(tiny_run, tmp_path: Path, capsys) -> None:
    out = tmp_path / "refused"
    rc = main(["export", "--checkpoint", str(tiny_run[0].run.checkpoint), "--out", str(out), "--precision", "fp16",
               "--max-auroc-drop", "-1"])  # no bundle can pass: AUROC would have to rise by 1
    assert rc == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fp16 bundle refused" in err[0] and "--max-auroc-drop" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".precision-*")) and not list(tmp_path.glob(".fp32-*"))


def test_fp16_bundle_has_half_weights_and_float_io(tiny_run, tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    assert main(["export", "--checkpoint", str(tiny_run[0].run.checkpoint), "--out", str(out), "--precision", "fp16",
                 "--max-auroc-drop", "0.05"]) == 0
    model = onnx.load(str(out / "encoder.onnx"))
    types = {i.data_type for i in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # I/O stays float32
    p = json.loads((out / "manifest.json").read_text())["precision"]
    assert p["precision"] == "fp16" and max(p["component_max_abs_error"].values()) < 0.05
    images = load_dataset("synthetic", None, "test", None, limit=8).images
    assert np.isfinite(Runtime.load(out, providers="cpu").score(images).score).all()


def test_precision_needs_the_held_out_normals(tiny_run, tmp_path: Path, capsys) -> None:
    assert main(["export", "--checkpoint", str(tiny_run[0].run.checkpoint), "--out", str(tmp_path / "x"),
                 "--precision", "int8", "--no-calibrate"]) == 2
    assert "drop --no-calibrate" in capsys.readouterr().err


def test_conditional_bundles_are_refused_with_a_clear_error(conditional_bundle: Path, tmp_path: Path) -> None:
    from vaegan.export.quantize import convert_bundle

    images = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="does not support conditional bundles"):
        convert_bundle(conditional_bundle, tmp_path / "q", "int8", calibration_images=images, selection_images=images)
    assert not (tmp_path / "q").exists()
