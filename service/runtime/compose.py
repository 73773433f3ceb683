"""The scoring pipeline as one ONNX graph, composed from the bundle's three graphs: at export
(the bundle's ``pipeline.onnx``) or, for bundles written before that, at load time.

    images[N,H,W,C] uint8 -> x = transpose((images / 255 - mean) / std)[N,C,H,W]
    x -> encoder -> mu -> generator -> x_hat[N,C,H,W]
    concat(x, x_hat)[2N,C,H,W] -> discriminator -> logit[2N,1], features[2N,F]
                                                    (and patch[2N,1,H,W] when D has a patch head)

A conditional bundle's graphs also take ``label`` int64 (N,); so does the composed graph, which
hands it to E and G and, twice (for x and x_hat), to D.

Scoring then takes one ONNX Runtime call per batch instead of three, as a Triton ensemble
would, but inside one session: no copies between graphs, and ONNX Runtime sees (and optimizes)
the whole chain. In a Python server this matters more than the saved call overhead: a thread
that runs numpy or retakes the GIL after an ONNX Runtime call waits, while the event loop is
busy, up to the interpreter's switch interval (5 ms) each time; one call per batch from the
raw uint8 images (normalization included, the same float32 operations in the same order as
:func:`service.runtime.preprocess.normalize`) instead of numpy and three calls cuts those
waits to one.

The bundle's contract stays the three graphs; ``pipeline.onnx`` is derived from them and
checked by sha256 like them. Loading it needs no ``onnx`` import (about a second of start-up);
composing needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

__all__ = ["PIPELINE_SIGNATURE", "compose_pipeline"]

# inputs/outputs of the composed graph (``label``: conditional bundles only); D's outputs have
# 2N rows: x first, then x_hat
PIPELINE_SIGNATURE = {"inputs": ("images", "label"), "outputs": ("x", "x_hat", "logit", "features", "patch")}


def _load(path: Path, prefix: str) -> onnx.ModelProto:
    return compose.add_prefix(onnx.load(str(path)), prefix)


def _renamed(info: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(info)
    out.name = name
    return out


def _normalize_nodes(mean: Sequence[float], std: Sequence[float]) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """images uint8 (N, H, W, C) -> e/x float32 (N, C, H, W), as preprocess.normalize does."""
    c = len(mean)
    consts = [
        numpy_helper.from_array(np.array(255.0, np.float32), "pre/255"),
        numpy_helper.from_array(np.asarray(mean, np.float32).reshape(1, 1, 1, c), "pre/mean"),
        numpy_helper.from_array(np.asarray(std, np.float32).reshape(1, 1, 1, c), "pre/std"),
    ]
    nodes = [
        helper.make_node("Cast", ["images"], ["pre/f"], to=TensorProto.FLOAT, name="pre/cast"),
        helper.make_node("Div", ["pre/f", "pre/255"], ["pre/scaled"], name="pre/scale"),
        helper.make_node("Sub", ["pre/scaled", "pre/mean"], ["pre/centred"], name="pre/centre"),
        helper.make_node("Div", ["pre/centred", "pre/std"], ["pre/nhwc"], name="pre/standardize"),
        helper.make_node("Transpose", ["pre/nhwc"], ["e/x"], perm=[0, 3, 1, 2], name="pre/nchw"),
    ]
    return nodes, consts


def compose_pipeline(
    encoder: Path, generator: Path, discriminator: Path, mean: Sequence[float], std: Sequence[float]
) -> bytes:
    """The serialized composed model (see the module docstring) for images normalized with
    ``mean``/``std`` per channel; raises ValueError when the three graphs cannot be joined
    (different opsets or IR versions, unexpected names, a channel count other than E's). The
    graphs of a conditional model (each with a ``label`` input) give a composed graph that takes
    ``label`` too."""
    e, g, d = _load(encoder, "e/"), _load(generator, "g/"), _load(discriminator, "d/")
    opsets = [{(o.domain, o.version) for o in m.opset_import} for m in (e, g, d)]
    if opsets[0] != opsets[1] or opsets[0] != opsets[2]:
        raise ValueError(f"the graphs use different opsets: {opsets}")
    if len({e.ir_version, g.ir_version, d.ir_version}) != 1:
        raise ValueError("the graphs have different IR versions")
    names = {
        "encoder": ([i.name for i in e.graph.input], [o.name for o in e.graph.output]),
        "generator": ([i.name for i in g.graph.input], [o.name for o in g.graph.output]),
        "discriminator": ([i.name for i in d.graph.input], [o.name for o in d.graph.output]),
    }
    patch = names["discriminator"][1] == ["d/logit", "d/features", "d/patch"]
    labelled = "e/label" in names["encoder"][0]
    label = lambda prefix: [f"{prefix}/label"] if labelled else []  # noqa: E731
    expected = {
        "encoder": (["e/x", *label("e")], ["e/mu", "e/logvar"]),
        "generator": (["g/z", *label("g")], ["g/x_hat"]),
        "discriminator": (["d/x", *label("d")], ["d/logit", "d/features", *(["d/patch"] if patch else [])]),
    }
    if names != expected:
        raise ValueError(f"unexpected graph inputs/outputs: {names}")

    x_info = e.graph.input[0]
    dims = list(x_info.type.tensor_type.shape.dim)  # (N, C, H, W)
    if len(dims) != 4 or not (len(mean) == len(std) == dims[1].dim_value):
        raise ValueError(f"the encoder's input {x_info.name} does not take {len(mean)}-channel images")
    images_info = helper.make_tensor_value_info(
        "images", TensorProto.UINT8, [dims[0].dim_param or None, dims[2].dim_value, dims[3].dim_value, dims[1].dim_value]
    )
    pre_nodes, pre_consts = _normalize_nodes(mean, std)
    inputs = [images_info]
    label_nodes = []
    if labelled:
        inputs.append(_renamed(e.graph.input[1], "label"))
        label_nodes = [
            helper.make_node("Identity", ["label"], ["e/label"], name="pipeline/label_e"),
            helper.make_node("Identity", ["label"], ["g/label"], name="pipeline/label_g"),
            helper.make_node("Concat", ["label", "label"], ["d/label"], axis=0, name="pipeline/label_d"),
        ]
    outputs = [
        _renamed(x_info, "x"),
        _renamed(g.graph.output[0], "x_hat"),
        _renamed(d.graph.output[0], "logit"),
        _renamed(d.graph.output[1], "features"),
        *([_renamed(d.graph.output[2], "patch")] if patch else []),
    ]
    nodes = [
        *pre_nodes,
        *label_nodes,
        *e.graph.node,
        helper.make_node("Identity", ["e/mu"], ["g/z"], name="pipeline/mu_to_z"),
        *g.graph.node,
        helper.make_node("Concat", ["e/x", "g/x_hat"], ["d/x"], axis=0, name="pipeline/concat"),
        *d.graph.node,
        helper.make_node("Identity", ["e/x"], ["x"], name="pipeline/x"),
        helper.make_node("Identity", ["g/x_hat"], ["x_hat"], name="pipeline/x_hat"),
        helper.make_node("Identity", ["d/logit"], ["logit"], name="pipeline/logit"),
        helper.make_node("Identity", ["d/features"], ["features"], name="pipeline/features"),
        *([helper.make_node("Identity", ["d/patch"], ["patch"], name="pipeline/patch")] if patch else []),
    ]
    graph = helper.make_graph(
        nodes,
        "vaegan_pipeline",
        inputs,
        outputs,
        initializer=[*pre_consts, *e.graph.initializer, *g.graph.initializer, *d.graph.initializer],
        value_info=[*e.graph.value_info, *g.graph.value_info, *d.graph.value_info],
    )
    model = helper.make_model(graph, opset_imports=list(e.opset_import), ir_version=e.ir_version)
    onnx.checker.check_model(model)
    return model.SerializeToString()
