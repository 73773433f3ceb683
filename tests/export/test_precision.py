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
    # no int8 ConvTranspose on ONNX Runtime's CPU provider: the generator's are sub-pixel convolutions
    assert "ConvTranspose" in _op_types(tiny_bundle / "generator.onnx")
    assert "ConvTranspose" not in _op_types(int8_bundle / "generator.onnx")
    assert "DepthToSpace" in _op_types(int8_bundle / "generator.onnx")
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


@pytest.mark.parametrize("bn,bias,hw", [(True, False, (3, 3)), (False, True, (4, 6)), (True, True, (1, 5))])
def test_subpixel_rewrite_of_transposed_convolutions_is_exact(bn: bool, bias: bool, hw: tuple[int, int]) -> None:
    """ConvTranspose(kernel 4, stride 2, padding 1) [+ BatchNormalization] == the rewritten
    Conv + Slice + Concat + DepthToSpace graph, in ONNX Runtime, on random weights and inputs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from vaegan.export.quantize import subpixel_deconvs

    rng = np.random.default_rng(0)
    cin, cout = 5, 3
    inits = [numpy_helper.from_array(rng.normal(size=(cin, cout, 4, 4)).astype(np.float32), "w")]
    ins = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=cout).astype(np.float32), "b"))
        ins.append("b")
    nodes = [helper.make_node("ConvTranspose", ins, ["y" if not bn else "t"], kernel_shape=[4, 4], strides=[2, 2],
                              pads=[1, 1, 1, 1])]
    if bn:
        for name, v in (("g", rng.uniform(0.5, 2, cout)), ("be", rng.normal(size=cout)), ("m", rng.normal(size=cout)),
                        ("v", rng.uniform(0.5, 2, cout))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), name))
        nodes.append(helper.make_node("BatchNormalization", ["t", "g", "be", "m", "v"], ["y"], epsilon=1e-5))
    graph = helper.make_graph(
        nodes, "deconv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cin, None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, cout, None, None])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    x = rng.normal(size=(2, cin, *hw)).astype(np.float32)

    def run(m: onnx.ModelProto) -> np.ndarray:
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0]

    want = run(model)
    assert subpixel_deconvs(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert "ConvTranspose" not in ops and "BatchNormalization" not in ops  # BN folded into the conv
    got = run(model)
    assert got.shape == want.shape == (2, cout, 2 * hw[0], 2 * hw[1])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
