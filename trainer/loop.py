"""The training loop: data, model, optimizers, epochs, checkpoints, then bundle + calibration.

Reads top to bottom: :func:`fit` is the whole run.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from vaegan.models import VAEGAN, AdversarialLoss, KLDivergence, ModelConfig, ReconstructionLoss
from vaegan.service.runtime.preprocess import ImageSpec, normalize
from vaegan.service.runtime.scoring import raw_components
from vaegan.trainer.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    network_states,
    save_checkpoint,
)
from vaegan.trainer.config import TrainConfig
from vaegan.trainer.data import ImageSet
from vaegan.trainer.selection import corrupt, select_weights
from vaegan.trainer.step import Losses, Optimizers, random_masks, train_step

__all__ = ["RunResult", "components_torch", "fit", "resolve_device", "split_normal", "to_tensor"]

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path
    epochs: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(choice)


def to_tensor(images: np.ndarray, spec: ImageSpec) -> torch.Tensor:
    """uint8 (N, H, W, C) -> normalized float32 (N, C, H, W): the serving code's normalize()."""
    return torch.from_numpy(normalize(images, spec))


def split_normal(data: ImageSet, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Deterministic split of normal training images into (train, held-out normals).

    The held-out normals are then cut into a selection and a calibration part
    (:func:`trainer.selection.split_held_out`); see :func:`trainer.pipeline.load_split`.
    """
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(data))
    n_val = max(2, int(round(len(data) * val_fraction)))
    return data.subset(np.sort(idx[n_val:])), data.subset(np.sort(idx[:n_val]))


def _build(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device) -> tuple[VAEGAN, Optimizers, Losses]:
    model = VAEGAN(model_cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    def adam(m: torch.nn.Module, scale: float = 1.0) -> torch.optim.Optimizer:
        return torch.optim.Adam(m.parameters(), lr=cfg.lr * scale, betas=(cfg.beta1, cfg.beta2))

    opt = Optimizers(adam(model.encoder), adam(model.generator), adam(model.discriminator, cfg.d_lr_scale))
    n_elem = model_cfg.num_channels * model_cfg.image_size**2
    losses = Losses(
        kl=KLDivergence(cfg.kl_weight / n_elem),
        recon=ReconstructionLoss(cfg.feature_weight, cfg.pixel_weight),
        adv=AdversarialLoss(cfg.adv_loss, cfg.adv_weight),
        patch_weight=cfg.patch_weight,
    )
    return model, opt, losses


@torch.no_grad()
def components_torch(model: VAEGAN, x_all: torch.Tensor, device: torch.device) -> dict[str, np.ndarray]:
    """The raw score components of normalized images, eval mode: the networks run in torch,
    the components come from the serving code (:func:`service.runtime.scoring.raw_components`),
    so selection during training scores exactly as the bundle will."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(x_all), 128):
        x = x_all[i : i + 128].to(device)
        x_hat = model.reconstruct(x)
        logit, f, patch = model.discriminator(x)
        _, f_hat, _ = model.discriminator(x_hat)
        comps = raw_components(
            x.float().cpu().numpy(), x_hat.float().cpu().numpy(), f.float().cpu().numpy(),
            f_hat.float().cpu().numpy(), logit.float().cpu().numpy(),
            None if patch is None else patch.float().cpu().numpy(),
        )
        for k, v in comps.items():
            parts.setdefault(k, []).append(v)
    model.train(was_training)
    return {k: np.concatenate(v) for k, v in parts.items()}


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * model for parameters, with d = min(decay, (1 + step) / (10 +
    step)) so the first steps do not leave the average stuck near the random initialization;
    buffers (BatchNorm statistics, spectral-norm vectors) are copied, as their averages mean
    nothing."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(p, 1.0 - d)
    for be, b in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(b)


def _validate(model: VAEGAN, x_val: torch.Tensor, x_corrupt: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Reconstruction errors of the selection part of the held-out normals, and how well the
    best weighting separates them from corrupted copies (the label-free model-selection
    signal). The calibration part is never seen here: it only sets the threshold."""
    normal = components_torch(model, x_val, device)
    corrupted = components_torch(model, x_corrupt, device)
    weights, report = select_weights(normal, corrupted)
    row = {"val_pixel": float(normal["pixel"].mean()), "val_feature": float(normal["feature"].mean()),
           "val_selection_auroc": report["selection_auroc"]}
    row.update({f"val_sep_{k}": v for k, v in report["component_auroc"].items()})
    return row


def _log_images(writer: Any, model: VAEGAN, x: torch.Tensor, epoch: int) -> None:
    from torchvision.utils import make_grid

    model.eval()
    with torch.no_grad():
        rec = model.reconstruct(x)
        samples = model.sample(len(x))
    model.train()
    for tag, imgs in (("real", x), ("reconstruction", rec), ("samples", samples)):
        writer.add_image(f"images/{tag}", make_grid(imgs.float().cpu(), nrow=8, normalize=True, value_range=(-1, 1)), epoch)


def fit(
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    spec: ImageSpec,
    train: ImageSet,
    selection: ImageSet,
    run_dir: Path,
    *,
    resume: bool = False,
    tensorboard: bool = False,
    progress: bool = True,
) -> RunResult:
    """Train for ``cfg.epochs`` epochs, checkpointing every epoch to ``run_dir/checkpoints``.

    ``selection``: the selection part of the held-out normals, validated every epoch (the
    checkpoint is chosen on it); the calibration part must not be passed here.
    """
    from tqdm.auto import tqdm

    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "checkpoints"
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, opt, losses = _build(model_cfg, cfg, device)
    history: list[dict[str, float]] = []
    start_epoch = 0
    if resume and (ckpt_dir / "last.pt").is_file():
        ckpt = load_checkpoint(ckpt_dir / "last.pt", map_location=device)
        if ckpt["model_config"] != model_cfg.to_dict():
            raise ValueError("--resume: the checkpoint's model config differs from this run's")
        loaded = model_from_checkpoint(ckpt, weights="training").to(device)
        model.load_state_dict(loaded.state_dict())
        opt.load_state_dict(ckpt["optim"])
        start_epoch, history = int(ckpt["epoch"]), list(ckpt["history"])
        logger.info("resumed from epoch %d", start_epoch)
    ema = None  # the moving average scored, selected and exported (cfg.ema_decay > 0)
    if cfg.ema_decay > 0:
        ema = copy.deepcopy(model).requires_grad_(False)
        if resume and start_epoch > 0 and ckpt.get("ema_state") is not None:
            ema.load_state_dict(model_from_checkpoint(ckpt).to(device).state_dict())
    scored = model if ema is None else ema

    x_train, x_val = to_tensor(train.images, spec), to_tensor(selection.images, spec)
    x_corrupt = to_tensor(corrupt(selection.images, seed=cfg.seed)[0], spec)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    writer = None
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    t0 = time.perf_counter()
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # resumable data order
        loader = DataLoader(
            TensorDataset(x_train), batch_size=cfg.batch_size, shuffle=True, drop_last=len(x_train) > cfg.batch_size,
            generator=gen, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        )
        sums: dict[str, float] = {}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, disable=None if progress else True, leave=False)
        for step, (x,) in enumerate(bar):
            x = x.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            mask = None
            if cfg.mask_prob > 0 and torch.rand(1, generator=gen).item() < cfg.mask_prob:
                mask = random_masks(len(x), spec.height, generator=gen).to(device)
            terms = train_step(model, x, opt, losses, mask=mask, autocast_dtype=autocast, d_noise=cfg.d_noise,
                               d_negatives=cfg.negative_kinds)
            if ema is not None:
                update_ema(ema, model, cfg.ema_decay, epoch * steps_per_epoch + step)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items()}, refresh=False)
            if writer is not None:
                for k, v in terms.items():
                    writer.add_scalar(f"train/{k}", v, epoch * steps_per_epoch + step)
        n_steps = max(1, step + 1)
        row = {"epoch": epoch + 1, **{k: v / n_steps for k, v in sums.items()}, **_validate(scored, x_val, x_corrupt, device)}
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        logger.info("epoch %d/%d %s", epoch + 1, cfg.epochs, " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        if writer is not None:
            for k in ("val_pixel", "val_feature"):
                writer.add_scalar(f"val/{k}", row[k], epoch + 1)
            _log_images(writer, scored, x_val[:16].to(device), epoch + 1)
        payload = {
            "model_config": model_cfg.to_dict(),
            "train_config": cfg.to_dict(),
            "image_spec": spec.to_dict(),
            "epoch": epoch + 1,
            "history": history,
            "state": network_states(model),
            "optim": opt.state_dict(),
            "ema_state": None if ema is None else network_states(ema),
        }
        save_checkpoint(ckpt_dir / f"epoch_{epoch + 1:03d}.pt", payload)
        save_checkpoint(ckpt_dir / "last.pt", payload)
    if writer is not None:
        writer.close()
    return RunResult(run_dir, ckpt_dir / "last.pt", cfg.epochs, history, time.perf_counter() - t0)
