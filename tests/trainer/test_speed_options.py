"""The training speed options: channels-last memory format (the default), batched shape
negatives, and bf16 autocast (opt-in on CPU). Their speed is a benchmark
(``benchmarks/training_speed.py``); these tests check they change nothing they should not."""

from __future__ import annotations

import pytest
import torch

from vaegan.models import ModelConfig
from vaegan.trainer.config import TrainConfig
from vaegan.trainer.loop import _build, autocast_dtype
from vaegan.trainer.step import Optimizers, StepNoise, train_step

CFG = TrainConfig(batch_size=8, kl_weight=0.1)
MODEL = ModelConfig(num_channels=3, image_size=28, latent_dim=8, base_width=8)


class _Hold:
    """An optimizer that keeps the weights: the gradients of a step stay readable."""

    def step(self) -> None:
        pass


def _step(fmt: torch.memory_format, dtype: torch.dtype | None = None, data_seed: int = 1,
          update: bool = True) -> torch.nn.Module:
    """The tiny model after one training step in memory format ``fmt`` (weights unchanged and
    gradients kept with ``update=False``)."""
    torch.manual_seed(0)
    model, opt, losses = _build(MODEL, CFG, torch.device("cpu"))
    model = model.to(memory_format=fmt)
    x = (torch.rand(8, 3, 28, 28, generator=torch.Generator().manual_seed(data_seed)) * 2 - 1).contiguous(memory_format=fmt)
    if not update:
        opt = Optimizers(_Hold(), _Hold(), _Hold())  # type: ignore[arg-type]
    train_step(model, x, opt, losses, d_negatives=CFG.negative_kinds, noise=StepNoise.seeded(2), autocast_dtype=dtype)
    return model


def _one_step(fmt: torch.memory_format, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _step(fmt, dtype).state_dict().items()}


def test_the_trainer_builds_channels_last_networks() -> None:
    model, _, _ = _build(MODEL, CFG, torch.device("cpu"))
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)


def _grads(fmt: torch.memory_format, data_seed: int = 1) -> dict[str, torch.Tensor]:
    """The gradients of one training step (nothing updated)."""
    model = _step(fmt, data_seed=data_seed, update=False)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_channels_last_computes_the_same_gradients() -> None:
    """A channels-last step is the same arithmetic as an NCHW one: every gradient of E, G and D
    agrees to float rounding (relative to the tensor's largest gradient)."""
    a, b = _grads(torch.contiguous_format), _grads(torch.channels_last)
    assert a.keys() == b.keys() and len(a) > 20
    worst = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)
    assert worst < 1e-4
    # and the comparison has teeth: another batch gives other gradients
    c = _grads(torch.channels_last, data_seed=2)
    assert max(float((a[k] - c[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a) > 0.1


def test_the_cli_turns_channels_last_off() -> None:
    from vaegan.cli import build_parser

    a = build_parser().parse_args(["train", "--out", "x", "--no-channels-last", "--autocast", "bf16"])
    assert a.no_channels_last and a.autocast == "bf16"
    model, _, _ = _build(MODEL, TrainConfig(channels_last=False), torch.device("cpu"))
    assert all(p.is_contiguous() for p in model.parameters())


def test_bf16_autocast_really_runs_in_bf16_and_stays_close() -> None:
    """``--autocast bf16`` changes the arithmetic (the weights differ from float32's by more
    than float rounding) but not the update (they stay within a bf16-sized distance)."""
    a = _one_step(torch.channels_last, None)
    b = _one_step(torch.channels_last, torch.bfloat16)
    diffs = [float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point()]
    assert max(diffs) > 1e-4  # bf16 was used
    assert max(diffs) < 0.05 and all(torch.isfinite(v).all() for v in b.values() if v.is_floating_point())


def test_autocast_choice() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("off", cpu) is None and autocast_dtype("off", cuda) is None
    assert autocast_dtype("auto", cpu) is None  # opt-in on CPU: it cost AUROC on the demo
    assert autocast_dtype("auto", cuda) is torch.bfloat16
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="autocast must be auto, bf16 or off"):
        TrainConfig(autocast="fp8")
