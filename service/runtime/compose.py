"""The scoring pipeline as one ONNX graph, composed at load time from the bundle's three graphs.

    x[N,C,H,W] -> encoder -> mu -> generator -> x_hat[N,C,H,W]
    concat(x, x_hat)[2N,C,H,W] -> discriminator -> logit[2N,1], features[2N,F]

Scoring then takes one ONNX Runtime call per batch instead of three, as a Triton ensemble
would, but inside one session: no copies between graphs, and ONNX Runtime sees (and optimizes)
the whole chain. In a Python server this matters more than the saved call overhead: a thread
that runs ONNX Runtime must retake the GIL after every call, and while the event loop is busy
each retake can wait up to the interpreter's switch interval (5 ms); one call per batch
instead of three (with numpy between them) cuts those waits to one.

The bundle itself is unchanged (its contract is the three graphs, each checked by sha256 and
signature before this runs); the composed graph exists only in memory.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import compose, helper

__all__ = ["PIPELINE_SIGNATURE", "compose_pipeline"]

# inputs/outputs of the composed graph; D's outputs have 2N rows: x first, then x_hat
PIPELINE_SIGNATURE = {"inputs": ("x",), "outputs": ("x_hat", "logit", "features")}


def _load(path: Path, prefix: str) -> onnx.ModelProto:
    return compose.add_prefix(onnx.load(str(path)), prefix)


def _renamed(info: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(info)
    out.name = name
    return out


def compose_pipeline(encoder: Path, generator: Path, discriminator: Path) -> bytes:
    """The serialized composed model (see the module docstring); raises ValueError when the
    three graphs cannot be joined (different opsets or IR versions, unexpected names)."""
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
    expected = {
        "encoder": (["e/x"], ["e/mu", "e/logvar"]),
        "generator": (["g/z"], ["g/x_hat"]),
        "discriminator": (["d/x"], ["d/logit", "d/features"]),
    }
    if names != expected:
        raise ValueError(f"unexpected graph inputs/outputs: {names}")

    x_info = _renamed(e.graph.input[0], "x")
    outputs = [
        _renamed(g.graph.output[0], "x_hat"),
        _renamed(d.graph.output[0], "logit"),
        _renamed(d.graph.output[1], "features"),
    ]
    nodes = [
        helper.make_node("Identity", ["x"], ["e/x"], name="pipeline/input"),
        *e.graph.node,
        helper.make_node("Identity", ["e/mu"], ["g/z"], name="pipeline/mu_to_z"),
        *g.graph.node,
        helper.make_node("Concat", ["e/x", "g/x_hat"], ["d/x"], axis=0, name="pipeline/concat"),
        *d.graph.node,
        helper.make_node("Identity", ["g/x_hat"], ["x_hat"], name="pipeline/x_hat"),
        helper.make_node("Identity", ["d/logit"], ["logit"], name="pipeline/logit"),
        helper.make_node("Identity", ["d/features"], ["features"], name="pipeline/features"),
    ]
    graph = helper.make_graph(
        nodes,
        "vaegan_pipeline",
        [x_info],
        outputs,
        initializer=[*e.graph.initializer, *g.graph.initializer, *d.graph.initializer],
        value_info=[*e.graph.value_info, *g.graph.value_info, *d.graph.value_info],
    )
    model = helper.make_model(graph, opset_imports=list(e.opset_import), ir_version=e.ir_version)
    onnx.checker.check_model(model)
    return model.SerializeToString()
