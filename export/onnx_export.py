"""torch -> ONNX for the three networks, with a parity check against ONNX Runtime."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn.utils import parametrize

from vaegan.models import VAEGAN
from vaegan.service.runtime.bundle import GRAPHS, graph_signatures
from vaegan.service.runtime.preprocess import ImageSpec

__all__ = ["OPSET", "IR_VERSION", "PARITY_TOLERANCE", "ExportError", "export_graphs"]

logger = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; onnx >= 1.23 writes 14 unless told
PARITY_TOLERANCE = 1e-4  # max abs error torch vs onnxruntime on fp32, per output


class ExportError(RuntimeError):
    """An exported graph failed onnx.checker or the parity check."""


def _plain_copy(module: nn.Module) -> nn.Module:
    """An eval-mode deep copy with spectral-norm parametrizations baked into plain weights."""
    m = copy.deepcopy(module).cpu().float().eval()
    for sub in m.modules():
        if parametrize.is_parametrized(sub):
            for name in list(sub.parametrizations.keys()):
                parametrize.remove_parametrizations(sub, name, leave_parametrized=True)
    return m


class _Outputs(nn.Module):
    """A module whose forward returns its inner module's outputs without the ``None`` ones (a
    discriminator without the per-pixel head), as the graph signature lists them."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.inner(*inputs)
        return tuple(o for o in (out if isinstance(out, tuple) else (out,)) if o is not None)


def _export_one(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, sig: dict) -> None:
    """``example``: one tensor per input of ``sig``, in its order."""
    inputs, outputs = list(sig["inputs"]), list(sig["outputs"])
    dynamic = {n: {0: "batch"} for n in inputs + outputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    # state the fixed output dims the signature promises (the tracer leaves some symbolic, e.g.
    # after Resize); the batch axis stays dynamic
    for out in proto.graph.output:
        for dim, want in zip(out.type.tensor_type.shape.dim, sig["outputs"][out.name], strict=True):
            if want is not None:
                dim.Clear()
                dim.dim_value = int(want)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def _parity(module: nn.Module, path: Path, example: tuple[torch.Tensor, ...], sig: dict) -> float:
    """Max abs error between torch and ONNX Runtime (CPU) over all outputs."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = module(*example)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = sess.run(list(sig["outputs"]), {name: t.numpy() for name, t in zip(sig["inputs"], example, strict=True)})
    return max(float(np.max(np.abs(r.numpy() - g))) for r, g in zip(ref, got, strict=True))


def export_graphs(
    model: VAEGAN, spec: ImageSpec, out_dir: Path, seed: int = 0
) -> dict[str, float]:
    """Write encoder/generator/discriminator .onnx into ``out_dir``; return max abs errors.

    Raises :class:`ExportError` when a graph fails ``onnx.checker`` or parity above
    :data:`PARITY_TOLERANCE` (checked at two batch sizes, so the batch axis is really dynamic).
    A conditional model's graphs take a second input, ``label`` int64 (N,); the parity check
    draws labels over all its classes.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    sigs = graph_signatures(spec, cfg.latent_dim, cfg.feature_dim, cfg.patch_head, cfg.num_classes)
    g = torch.Generator().manual_seed(seed)

    def labelled(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not cfg.conditional:
            return (t,)
        return t, torch.randint(0, cfg.num_classes, (len(t),), generator=g)

    img = lambda n: labelled(torch.rand(n, spec.channels, spec.height, spec.width, generator=g) * 2 - 1)  # noqa: E731
    lat = lambda n: labelled(torch.randn(n, cfg.latent_dim, generator=g))  # noqa: E731
    nets = {"encoder": (model.encoder, img), "generator": (model.generator, lat), "discriminator": (model.discriminator, img)}
    errors: dict[str, float] = {}
    for name, (net, make) in nets.items():
        plain = _Outputs(_plain_copy(net)).eval()
        path = out_dir / GRAPHS[name]
        try:
            _export_one(plain, make(2), path, sigs[name])
        except onnx.checker.ValidationError as e:
            raise ExportError(f"{path}: onnx.checker failed ({e})") from e
        err = max(_parity(plain, path, make(n), sigs[name]) for n in (1, 5))
        if err > PARITY_TOLERANCE:
            raise ExportError(f"{path}: parity error {err:.2e} > {PARITY_TOLERANCE:.0e}")
        errors[name] = err
        logger.info("exported %s (parity max abs error %.2e)", path, err)
    return errors
