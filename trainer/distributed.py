"""Data-parallel training under ``torchrun``: one process per device, one global batch.

``torchrun --nproc-per-node N -m vaegan train ...`` starts N copies of ``vaegan train`` with
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in their environment; :func:`setup` reads them,
joins the process group (gloo on CPU, nccl on CUDA) and says which device this process owns.
Without those variables (a plain ``vaegan train``) nothing here is used: world size 1, no
process group, exactly the single-process run.

What makes N processes train like one process with the same ``--batch-size``:

- every process takes ``batch_size / N`` rows of each global batch (``DistributedSampler``
  over the same seeded permutation, so the union of the shards is the single process's batch);
- every random draw of a step (reparameterization noise, prior samples, masks, D's negatives
  and instance noise) is made for the whole global batch from a generator seeded identically
  on every rank, and each rank keeps its own rows (:class:`trainer.step.StepNoise`);
- BatchNorm layers normalize with the statistics of the global batch (:class:`GlobalBatchNorm`,
  a differentiable all-reduce of the sums; ``nn.SyncBatchNorm`` is CUDA-only);
- E, G and D are each wrapped in ``DistributedDataParallel``, which averages gradients.

So a 2-process run ends with the parameters of the 1-process run, to float summation order
(tests/trainer/test_distributed.py checks it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistContext", "GlobalBatchNorm", "check_agreement", "convert_batchnorm", "setup", "teardown"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly one-process) training job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # gloo | nccl; None: not distributed

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs, writes checkpoints, TensorBoard and the bundle."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def record(self) -> dict[str, Any]:
        """For the manifest's training summary."""
        return {"world_size": self.world_size, "backend": self.backend}


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def setup(device_choice: str, timeout_s: float = 1800.0) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes, or stay single-process.

    ``device_choice``: ``auto`` | ``cpu`` | ``cuda`` (as ``--device``). Under torchrun with
    CUDA each process takes ``cuda:LOCAL_RANK`` and the nccl backend; on CPU, gloo. Ranks other
    than 0 log warnings only, so the job's log is rank 0's.
    """
    from vaegan.trainer.loop import resolve_device

    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext(), resolve_device(device_choice)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_choice)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} but torch sees {torch.cuda.device_count()} CUDA device(s): "
                "use --nproc-per-node <= the number of GPUs on each node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if rank != 0:
        logging.getLogger("vaegan").setLevel(logging.WARNING)
    ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, backend=backend)
    logger.info("distributed training: %d processes, backend %s, this is rank %d on %s",
                ctx.world_size, backend, ctx.rank, device)
    return ctx, device


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_agreement(ctx: DistContext, **facts: Any) -> None:
    """Every rank must train the same run: compare ``facts`` (configs, data size, the epoch a
    resume starts from) across ranks and raise on all of them, naming what differs, when they
    do not agree (for example ranks started with different flags or different data)."""
    if not ctx.enabled:
        return
    facts = _flatten(facts)
    mine = {k: _fingerprint(v) for k, v in facts.items()}
    everyone: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(everyone, {"facts": mine, "values": {k: v for k, v in facts.items() if _short(v)}})
    base = everyone[0]["facts"]
    for rank, theirs in enumerate(everyone):
        differ = sorted(k for k in base if theirs["facts"].get(k) != base[k])
        if differ:
            shown = ", ".join(
                f"{k} (rank 0: {everyone[0]['values'].get(k, 'see its config')!r}, "
                f"rank {rank}: {theirs['values'].get(k, 'see its config')!r})" for k in differ
            )
            raise ValueError(f"the training processes disagree, so they would not train one model: {shown}; "
                             "start every rank with the same flags and data")


def _flatten(facts: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train_config": {"seed": 0}} -> {"train_config.seed": 0}: differences name the field."""
    flat: dict[str, Any] = {}
    for k, v in facts.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _short(v: Any) -> bool:
    return isinstance(v, (int, float, str, type(None))) and len(str(v)) < 80


class _AllReduceSum(torch.autograd.Function):
    """Sum a tensor over the ranks; the gradient of each rank's copy is the sum of the ranks'
    gradients (every rank's loss depends on every rank's contribution)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all ranks (any backend, CPU included).

    In training, the per-channel sum and sum of squares of the local rows are all-reduced with
    a differentiable all-reduce, so both the normalization and its gradient are those of one
    process holding the whole batch. Its state dict is BatchNorm's (same keys), so checkpoints
    load into the plain network for export. In eval mode it is plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3, 4, 5):
            raise ValueError(f"expected 2D to 5D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        x = input.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        stats = _AllReduceSum.apply(stats)  # sums over ranks; backward sums the gradients back
        c = input.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * n / (n - 1).clamp_min(1.0)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        shape = [1, c] + [1] * (input.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d in ``module`` (in place, recursively) by a
    :class:`GlobalBatchNorm` holding the same parameters and buffers; returns ``module``."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(next(iter(child.buffers()), torch.empty(0)).device)
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_batchnorm(child)
    return module
