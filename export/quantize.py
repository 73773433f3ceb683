"""Reduced-precision bundles: int8 (ONNX Runtime static quantization) and fp16.

``vaegan export --precision int8|fp16`` writes the fp32 bundle as usual, then converts every
graph of it (encoder, generator, discriminator and the composed pipeline):

- ``int8``: QDQ static quantization, weights int8 per channel, activations uint8, with the
  activation ranges calibrated on held-out normal images (the run's selection part), so the
  scales come from the data the model will see. Inputs and outputs stay float32 (the pipeline's
  input stays uint8), so the runtime and the service load the bundle unchanged.
- ``fp16``: float16 weights and activations with float32 inputs and outputs (for GPUs; ONNX
  Runtime's CPU provider runs many float16 ops through casts, so it is slower there).

The converted bundle is then calibrated again (component mean/std and threshold from its own
scores, the fp32 bundle's weights kept) and checked against the fp32 one before it is written:

- parity: the largest absolute difference of each raw component on the calibration images;
- detection: image AUROC of held-out normals against corrupted copies of them (the label-free
  selection task of :mod:`trainer.selection`), fp32 against the converted bundle. A drop of more
  than ``max_auroc_drop`` (0.002 by default) refuses the bundle: nothing is written.

Both figures go to the manifest under ``precision``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vaegan.service.runtime.bundle import GRAPHS, PIPELINE, load_bundle, write_manifest
from vaegan.service.runtime.preprocess import normalize
from vaegan.service.runtime.stats import auroc

__all__ = ["MAX_AUROC_DROP", "PRECISIONS", "PrecisionRefused", "convert_bundle", "export_at_precision"]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
MAX_AUROC_DROP = 0.002
CALIBRATION_BATCH = 64
FLOAT_OPS = frozenset({"ConvTranspose"})  # kept in float32 by int8 export (see _quantize)


class PrecisionRefused(ValueError):
    """The converted bundle detects worse than the fp32 one by more than allowed."""


class _Feeds:
    """The calibration reader ONNX Runtime's quantizer pulls batches of inputs from."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _graph_feeds(src: Path, images: np.ndarray) -> dict[str, list[dict[str, np.ndarray]]]:
    """Representative inputs of each graph, from uint8 (N, H, W, C) normal images at model size:
    the pipeline sees the images, the encoder their normalized form, the generator the
    encoder's codes, the discriminator the images and their reconstructions."""
    import onnxruntime as ort

    bundle = load_bundle(src)
    spec = bundle.spec

    def session(name: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(src / GRAPHS[name]), providers=["CPUExecutionProvider"])

    enc, gen = session("encoder"), session("generator")
    feeds: dict[str, list[dict[str, np.ndarray]]] = {k: [] for k in (*GRAPHS, "pipeline")}
    for i in range(0, len(images), CALIBRATION_BATCH):
        batch = images[i : i + CALIBRATION_BATCH]
        x = normalize(batch, spec)
        mu = enc.run(["mu"], {"x": x})[0]
        x_hat = gen.run(None, {"z": mu})[0]
        feeds["encoder"].append({"x": x})
        feeds["generator"].append({"z": mu})
        feeds["discriminator"].append({"x": np.concatenate([x, x_hat])})
        feeds["pipeline"].append({"images": np.ascontiguousarray(batch)})
    return feeds


class _QuietQuantizer(logging.Filter):
    """Drops the quantizer's advice to the root logger (pre-processing hints, per-channel axis
    notes on 1-D BatchNorm weights): known, harmless, and noise on a user's terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname.replace("\\", "/").split("/site-packages/")[-1].split("/")[0]


# rows of a stride-2, kernel-4, padding-1 transposed convolution's kernel that output phase a
# (even a=0 / odd a=1 rows) reads, for its 2x2 window's first and second row: y[2i] sums
# x[i-1] W[3] + x[i] W[1], y[2i+1] sums x[i] W[2] + x[i+1] W[0]
_TAPS = ((3, 1), (2, 0))


def subpixel_deconvs(model: Any) -> int:
    """Rewrite, in place, every ConvTranspose of ``model`` (an onnx ModelProto) that has kernel
    4, stride 2, padding 1, one group and constant weights as the same arithmetic in ordinary
    convolutions, which ONNX Runtime's CPU provider runs in int8 (it has no int8 transposed
    convolution): one 2x2 Conv, zero padding 1, with 4x the output channels (one block per output phase:
    even/odd row x even/odd column) -> a Slice per phase -> Concat -> DepthToSpace (DCR). A
    BatchNormalization that is the transposed convolution's only consumer is folded into the
    new convolution. Returns the number of nodes rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    attrs = lambda n: {a.name: helper.get_attribute_value(a) for a in n.attribute}  # noqa: E731
    rewritten, new_nodes, drop = 0, [], set()
    for n in g.node:
        a = attrs(n)
        if n.op_type != "ConvTranspose" or n.input[1] not in inits or list(a.get("kernel_shape", [])) != [4, 4] \
                or list(a.get("strides", [])) != [2, 2] or list(a.get("pads", [])) != [1, 1, 1, 1] \
                or a.get("group", 1) != 1 or list(a.get("dilations", [1, 1])) != [1, 1] or a.get("output_padding"):
            new_nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)  # (Cin, Cout, 4, 4)
        cin, cout = w.shape[:2]
        bias = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64) if len(n.input) > 2 and n.input[2] else np.zeros(cout)
        out_name = n.output[0]
        scale, shift = np.ones(cout), np.zeros(cout)
        after = consumers.get(out_name, [])
        if len(after) == 1 and after[0].op_type == "BatchNormalization" and all(i in inits for i in after[0].input[1:5]):
            bn = after[0]
            gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:5])
            scale = gamma / np.sqrt(var + attrs(bn).get("epsilon", 1e-5))
            shift = beta - mean * scale
            out_name = bn.output[0]
            drop.add(id(bn))
        k = np.zeros((4 * cout, cin, 2, 2))
        for ph, (pa, pb) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            for u in range(2):
                for v in range(2):
                    k[ph * cout : (ph + 1) * cout, :, u, v] = w[:, :, _TAPS[pa][u], _TAPS[pb][v]].T * scale[:, None]
        b = np.tile(bias * scale + shift, 4)
        base = (n.name or out_name).replace("/", "_")
        kn, bn_ = f"{base}_sp_w", f"{base}_sp_b"
        g.initializer.extend([
            numpy_helper.from_array(k.astype(np.float32), kn), numpy_helper.from_array(b.astype(np.float32), bn_),
        ])
        conv = f"{base}_sp_conv"  # (N, 4 Cout, H + 1, W + 1): zero padding 1, a 2x2 window
        new_nodes.append(
            helper.make_node("Conv", [n.input[0], kn, bn_], [conv], name=f"{base}_sp_conv", kernel_shape=[2, 2],
                             pads=[1, 1, 1, 1]),
        )
        # phase (a, b) is the conv output shifted by (a, b): of its H + 1 rows, rows a..a+H-1
        # (the last row dropped for a = 0, the first for a = 1); columns likewise with b
        big = np.iinfo(np.int64).max
        phases = []
        for ph, (pa, pb) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            st, en, ax, out = (f"{base}_sp_{t}{ph}" for t in ("st", "en", "ax", "phase"))
            g.initializer.extend([
                numpy_helper.from_array(np.array([ph * cout, pa, pb], np.int64), st),
                numpy_helper.from_array(np.array([(ph + 1) * cout, -1 if pa == 0 else big, -1 if pb == 0 else big],
                                                 np.int64), en),
                numpy_helper.from_array(np.array([1, 2, 3], np.int64), ax),
            ])
            new_nodes.append(helper.make_node("Slice", [conv, st, en, ax], [out], name=f"{base}_sp_slice{ph}"))
            phases.append(out)
        cat = f"{base}_sp_cat"
        new_nodes += [
            helper.make_node("Concat", phases, [cat], name=f"{base}_sp_concat", axis=1),
            helper.make_node("DepthToSpace", [cat], [out_name], name=f"{base}_sp_d2s", blocksize=2, mode="DCR"),
        ]
        rewritten += 1
    if rewritten:
        del g.node[:]
        g.node.extend(m for m in new_nodes if id(m) not in drop)
        onnx.checker.check_model(model)
    return rewritten


def _int8(src: Path, dst: Path, name: str, feeds: list[dict[str, np.ndarray]]) -> None:
    quiet, root = _QuietQuantizer(), logging.getLogger()  # the quantizer logs with logging.warning()
    root.addFilter(quiet)
    try:
        _quantize(src, dst, feeds)
    finally:
        root.removeFilter(quiet)
    logger.info("%s: int8 (QDQ, per-channel weights, %d calibration batches)", name, len(feeds))


def _quantize(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    # ONNX Runtime's CPU provider has no int8 ConvTranspose: quantized, the generator's
    # transposed convolutions ran dequantized and unfused, slower than in fp32 (15.3 against
    # 11.4 ms per batch of 64 at 28x28). They are rewritten as sub-pixel convolutions (exact,
    # int8 kernels); any of another shape stays in float32 and keeps its fused kernel.
    model = onnx.load(str(src))
    rewritten = subpixel_deconvs(model)  # transposed convolutions as int8-able convolutions
    ops = {n.op_type for n in model.graph.node} - FLOAT_OPS
    with tempfile.TemporaryDirectory() as tmp:
        # quantize_static writes scratch files (augmented model, ranges) next to its output
        out, float_in = Path(tmp) / dst.name, Path(tmp) / f"float-{src.name}"
        onnx.save(model, str(float_in))
        if rewritten:
            logger.info("%s: %d transposed convolution(s) rewritten as sub-pixel convolutions", src.name, rewritten)
        quantize_static(
            str(float_in), str(out), _Feeds(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=sorted(ops),
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        shutil.move(str(out), dst)


def _fp16(src: Path, dst: Path, name: str) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    logger.info("%s: float16 weights and activations, float32 inputs and outputs", name)


def _scores(rt: Any, images: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(combined scores (N,), raw components by name) of ``rt.score`` over ``images``."""
    parts = [rt.score(images[i : i + 256]) for i in range(0, len(images), 256)]
    comps = {k: np.concatenate([p.components[k] for p in parts]) for k in parts[0].components}
    return np.concatenate([p.score for p in parts]), comps


def convert_bundle(
    src_dir: str | Path,
    out_dir: str | Path,
    precision: str,
    *,
    calibration_images: np.ndarray,
    selection_images: np.ndarray,
    max_auroc_drop: float = MAX_AUROC_DROP,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``out_dir``: the fp32 bundle ``src_dir`` at ``precision``, recalibrated, with its
    parity figures in ``manifest["precision"]``. Returns that block.

    Args:
        calibration_images: uint8 (N, H, W, C) held-out normals at model size (the calibration
            part): set the converted bundle's threshold; the parity figures are measured on them.
        selection_images: uint8 held-out normals (the selection part): quantization ranges,
            component mean/std, and (with corrupted copies) the AUROC check.
        max_auroc_drop: refuse (:class:`PrecisionRefused`, nothing written) when the converted
            bundle's AUROC on the selection task is lower than fp32's by more than this.
    """
    from vaegan.trainer.calibrate import calibrate_bundle
    from vaegan.trainer.selection import corrupt

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    src, out = Path(src_dir), Path(out_dir)
    source = load_bundle(src)
    if source.manifest.get("classes"):
        raise ValueError(f"{src}: --precision {precision} does not support conditional bundles yet; export fp32")
    if source.calibration is None:
        raise ValueError(f"{src}: the fp32 bundle is not calibrated; --precision needs the held-out normals")
    staging = Path(tempfile.mkdtemp(prefix=".precision-", dir=out.parent if out.parent.exists() else None))
    try:
        shutil.copytree(src, staging, dirs_exist_ok=True)
        if precision != "fp32":
            feeds = _graph_feeds(src, selection_images)
            for name, file in [*GRAPHS.items(), ("pipeline", PIPELINE)]:
                if not (src / file).is_file():
                    continue
                if precision == "int8":
                    _int8(src / file, staging / file, name, feeds[name])
                else:
                    _fp16(src / file, staging / file, name)
        manifest = json.loads((staging / "manifest.json").read_text())
        write_manifest(staging, manifest)  # the converted graphs' checksums
        calibrate_bundle(
            staging, calibration_images, selection_images=selection_images,
            target_fpr=float(source.calibration.target_fpr), weights=dict(source.calibration.weights), seed=seed,
        )
        # parity on the calibration images, detection on normals vs their corrupted copies
        from vaegan.service.runtime import Runtime

        rt32, rt_q = Runtime.load(src, providers="cpu"), Runtime.load(staging, providers="cpu")
        _, comps32 = _scores(rt32, calibration_images)
        _, comps_q = _scores(rt_q, calibration_images)
        parity = {k: float(np.max(np.abs(comps32[k] - comps_q[k]))) for k in comps32}
        task = np.concatenate([selection_images, corrupt(selection_images, seed=seed)[0]])
        labels = np.r_[np.zeros(len(selection_images)), np.ones(len(selection_images))]
        auroc32, auroc_q = auroc(_scores(rt32, task)[0], labels), auroc(_scores(rt_q, task)[0], labels)
        record = {
            "precision": precision,
            "component_max_abs_error": parity,
            "auroc_fp32": auroc32,
            "auroc": auroc_q,
            "auroc_drop": auroc32 - auroc_q,
            "max_auroc_drop": max_auroc_drop,
            "auroc_task": (f"{len(selection_images)} held-out normals (selection part) against corrupted "
                           "copies of them, each bundle scoring with its own calibration"),
            "n_parity_images": int(len(calibration_images)),
        }
        if auroc32 - auroc_q > max_auroc_drop:
            raise PrecisionRefused(
                f"{precision} bundle refused: AUROC {auroc_q:.4f} against {auroc32:.4f} for fp32 on held-out "
                f"normals vs corrupted copies (a drop of {auroc32 - auroc_q:.4f} > {max_auroc_drop}); "
                "keep fp32, or allow more with --max-auroc-drop"
            )
        manifest = json.loads((staging / "manifest.json").read_text())
        manifest["precision"] = record
        write_manifest(staging, manifest)
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("%s: %s bundle, AUROC %.4f (fp32 %.4f), component max abs error %s", out, precision,
                record["auroc"], record["auroc_fp32"], {k: f"{v:.2e}" for k, v in parity.items()})
    return record


def export_at_precision(
    checkpoint: str | Path,
    out_dir: str | Path,
    precision: str,
    *,
    name: str | None = None,
    version: int = 1,
    max_auroc_drop: float = MAX_AUROC_DROP,
) -> dict[str, Any]:
    """``vaegan export --precision``: the fp32 bundle of ``checkpoint`` (calibrated on the
    held-out parts its training used), converted by :func:`convert_bundle` on those same parts.
    Returns the manifest written to ``out_dir``."""
    from vaegan.trainer.checkpoint import load_checkpoint
    from vaegan.trainer.pipeline import checkpoint_split, export_checkpoint

    out = Path(out_dir)
    if precision == "fp32":
        return export_checkpoint(Path(checkpoint), out, name=name, version=version)
    ckpt = load_checkpoint(checkpoint)
    split = checkpoint_split(ckpt)  # loaded once: the fp32 export and the conversion share it
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fp32-", dir=out.parent) as tmp:
        fp32 = Path(tmp) / "bundle"
        export_checkpoint(Path(checkpoint), fp32, name=name, version=version, split=split)
        convert_bundle(
            fp32, out, precision, calibration_images=split.calibration.images,
            selection_images=split.selection.images, max_auroc_drop=max_auroc_drop,
            seed=int(ckpt["train_config"].get("seed", 0)),
        )
    return json.loads((out / "manifest.json").read_text())
