"""The training loop: data, model, optimizers, epochs, checkpoints, then bundle + calibration.

Reads top to bottom: :func:`fit` is the whole run.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from vaegan.models import (
    VAEGAN,
    AdversarialLoss,
    KLDivergence,
    ModelConfig,
    ReconstructionLoss,
    round_robin,
)
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
from vaegan.trainer.distributed import DistContext, check_agreement, convert_batchnorm
from vaegan.trainer.selection import corrupt, select_weights
from vaegan.trainer.step import Losses, Optimizers, StepNoise, cat_labels, train_step

__all__ = ["RunResult", "best_labels", "components_torch", "fit", "resolve_device", "split_normal", "to_tensor"]

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


def _build(
    model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, ctx: DistContext | None = None
) -> tuple[VAEGAN, Optimizers, Losses]:
    model = VAEGAN(model_cfg)
    if ctx is not None and ctx.enabled:  # before the optimizers see the parameters: BatchNorm over the global batch
        convert_batchnorm(model)
    # channels-last convolutions: faster on CUDA and on CPU too (oneDNN; benchmarks/training_speed.py)
    model = model.to(device, memory_format=memory_format(cfg))

    def adam(m: torch.nn.Module, scale: float = 1.0, decay: float = 0.0) -> torch.optim.Optimizer:
        return torch.optim.Adam(m.parameters(), lr=cfg.lr * scale, betas=(cfg.beta1, cfg.beta2), weight_decay=decay)

    opt = Optimizers(
        adam(model.encoder, decay=cfg.weight_decay), adam(model.generator, decay=cfg.weight_decay),
        adam(model.discriminator, cfg.d_lr_scale),
    )
    n_elem = model_cfg.num_channels * model_cfg.image_size**2
    losses = Losses(
        kl=KLDivergence(cfg.kl_weight / n_elem),
        recon=ReconstructionLoss(cfg.feature_weight, cfg.pixel_weight),
        adv=AdversarialLoss(cfg.adv_loss, cfg.adv_weight),
        patch_weight=cfg.patch_weight,
    )
    return model, opt, losses


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    """The memory format the networks and batches train in (``TrainConfig.channels_last``)."""
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 runs natively on ``device``: CUDA, or a CPU whose oneDNN has bf16 kernels
    (AVX512-BF16 or AMX; elsewhere it emulates them, slower than float32)."""
    if device.type == "cuda":
        return True
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The training step's autocast dtype for ``TrainConfig.autocast``: bf16 or None (float32).
    ``auto`` is bf16 on CUDA only: on a CPU with native bf16 it trains 1.6x faster but the demo's
    image AUROC fell by 0.02 on average over three seeds, so there it is opt-in (``bf16``)."""
    if choice == "bf16":
        if not native_bf16(device):
            logger.warning("--autocast bf16 on %s without native bf16 kernels: emulated, slower than float32", device)
        return torch.bfloat16
    return torch.bfloat16 if choice == "auto" and device.type == "cuda" else None


@torch.no_grad()
def best_labels(model: VAEGAN, x: torch.Tensor) -> torch.Tensor | None:
    """For a conditional model, each image's best class: int64 (B,), the class whose
    reconstruction has the lowest pixel error (the rule of an uncalibrated bundle's runtime,
    :meth:`service.runtime.Runtime.forward_images`, which is what scores the selection part at
    calibration); None for an unconditional model. x: normalized (B, C, H, W), eval mode."""
    k = model.cfg.num_classes
    if k == 0:
        return None
    errors = []
    for c in range(k):
        labels = torch.full((len(x),), c, dtype=torch.int64, device=x.device)
        errors.append((x - model.reconstruct(x, labels)).float().flatten(1).pow(2).mean(1))  # (B,)
    return torch.stack(errors, 1).argmin(1)  # (B,)


@torch.no_grad()
def components_torch(model: VAEGAN, x_all: torch.Tensor, device: torch.device) -> dict[str, np.ndarray]:
    """The raw score components of normalized images, eval mode: the networks run in torch,
    the components come from the serving code (:func:`service.runtime.scoring.raw_components`),
    so selection during training scores exactly as the bundle will. A conditional model scores
    each image against its best class (:func:`best_labels`), as the uncalibrated bundle does."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(x_all), 128):
        x = x_all[i : i + 128].to(device)
        labels = best_labels(model, x)
        x_hat = model.reconstruct(x, labels)
        logit, f, patch = model.discriminator(x, labels)
        _, f_hat, _ = model.discriminator(x_hat, labels)
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


@torch.no_grad()
def heldout_losses(
    model: VAEGAN, x: torch.Tensor, losses: Losses, device: torch.device, n: int = 512,
    labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """The named loss terms of :func:`train_step` on (up to ``n``) held-out normals, eval mode,
    z = mu and prior codes from a fixed seed, as ``val_<term>`` (for losses.png and TensorBoard).
    ``patch_d`` (D's per-pixel loss on shape negatives) has no held-out counterpart.
    ``labels``: the images' classes, int64 (B,), for a conditional model (the prior samples'
    classes are drawn from the same fixed seed)."""
    was_training = model.training
    model.eval()
    x = x[:n].to(device)
    gen = torch.Generator().manual_seed(0)
    y = y_prior = None
    if labels is not None:
        y = labels[:n].to(device)
    mu, logvar = model.encoder(x, y)
    x_rec = model.generator(mu, y)
    z = torch.randn(len(x), mu.shape[1], generator=gen).to(device)
    if labels is not None:
        y_prior = torch.randint(0, model.cfg.num_classes, (len(x),), generator=gen).to(device)
    x_prior = model.generator(z, y_prior)
    logits, feats, _ = model.discriminator(torch.cat([x, x_rec, x_prior]), cat_labels([y, y, y_prior]))
    logit_real, logit_rec, logit_prior = logits.chunk(3)
    feat_real, feat_rec, _ = feats.chunk(3)
    rec_feature, rec_pixel = losses.recon(x, x_rec, feat_real, feat_rec)
    model.train(was_training)
    return {
        "val_kl": float(losses.kl(mu, logvar)),
        "val_recon_feature": float(rec_feature),
        "val_recon_pixel": float(rec_pixel),
        "val_adv_g": float(losses.adv.generator_loss(logit_rec, logit_prior)),
        "val_adv_d": float(losses.adv.discriminator_loss(logit_real, logit_rec, logit_prior)),
    }


@torch.no_grad()
def _epoch_pictures(
    model: VAEGAN, x_fixed: torch.Tensor, z_fixed: torch.Tensor, run_dir: Path, epoch: int,
    y_fixed: torch.Tensor | None = None,
) -> None:
    """Prior samples of the fixed codes (a conditional model: classes round-robin) and
    reconstructions of the fixed held-out images (with their classes ``y_fixed``)."""
    from vaegan.trainer.pictures import write_epoch_row

    was_training = model.training
    model.eval()
    y_prior = round_robin(len(z_fixed), model.cfg.num_classes, z_fixed.device) if model.cfg.conditional else None
    samples = model.generator(z_fixed, y_prior).float().cpu().numpy()
    recs = model.reconstruct(x_fixed, y_fixed).float().cpu().numpy()
    model.train(was_training)
    write_epoch_row(run_dir, epoch, samples, recs, x_fixed.float().cpu().numpy())


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


def _log_images(writer: Any, model: VAEGAN, x: torch.Tensor, epoch: int, labels: torch.Tensor | None = None) -> None:
    from torchvision.utils import make_grid

    model.eval()
    with torch.no_grad():
        rec = model.reconstruct(x, labels)
        samples = model.sample(len(x))
    model.train()
    for tag, imgs in (("real", x), ("reconstruction", rec), ("samples", samples)):
        writer.add_image(f"images/{tag}", make_grid(imgs.float().cpu(), nrow=8, normalize=True, value_range=(-1, 1)), epoch)


def _checked_labels(data: ImageSet, num_classes: int) -> torch.Tensor:
    """``data.labels`` as int64 (N,), each in 0..num_classes-1 (ValueError otherwise)."""
    bad = (data.labels < 0) | (data.labels >= num_classes)
    if bad.any():
        raise ValueError(
            f"label {int(data.labels[bad][0])} is outside the conditional model's classes 0..{num_classes - 1}"
        )
    return torch.from_numpy(np.asarray(data.labels, np.int64))


def _ids_digest(data: ImageSet) -> str:
    """What the training images are, in a few characters (ids when the set has them)."""
    import hashlib

    h = hashlib.sha256()
    if data.ids:
        h.update("\n".join(map(str, data.ids)).encode())
    else:
        h.update(np.ascontiguousarray(data.images[:64]).tobytes())
    return h.hexdigest()[:16]


class _Parallel(torch.nn.Module):
    """E, G and D, each in its own ``DistributedDataParallel``: train_step's D-then-(E, G)
    update and its ``backward(inputs=...)`` calls stay as they are, and each network's
    gradients are averaged over the processes when its own backward runs."""

    def __init__(self, encoder: torch.nn.Module, generator: torch.nn.Module, discriminator: torch.nn.Module) -> None:
        super().__init__()
        self.encoder, self.generator, self.discriminator = encoder, generator, discriminator


def _data_parallel(model: VAEGAN, cfg: TrainConfig, device: torch.device) -> _Parallel:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None

    def wrap(m: torch.nn.Module, unused: bool = False) -> DDP:
        return DDP(m, device_ids=ids, find_unused_parameters=unused)

    # with --adv-loss none, D's per-pixel head gets no loss (D only lends its features)
    return _Parallel(wrap(model.encoder), wrap(model.generator), wrap(model.discriminator, cfg.adv_loss == "none"))


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
    dist: DistContext | None = None,
    device: torch.device | None = None,
) -> RunResult:
    """Train for ``cfg.epochs`` epochs, checkpointing every epoch to ``run_dir/checkpoints``.

    ``selection``: the selection part of the held-out normals, validated every epoch (the
    checkpoint is chosen on it); the calibration part must not be passed here.

    A conditional ``model_cfg`` (``num_classes`` K > 0, ``--conditional``) trains on the images'
    labels (``train.labels``, in 0..K-1) as their conditions; the selection part's labels go
    into its held-out losses and pictures.

    ``dist``: this process's place in a data-parallel job (:func:`trainer.distributed.setup`);
    each of the ``world_size`` processes trains on ``batch_size / world_size`` rows of every
    global batch, and only rank 0 validates, logs and writes (checkpoints, TensorBoard).
    """
    from tqdm.auto import tqdm

    ctx = dist or DistContext()
    if cfg.batch_size % ctx.world_size:
        raise ValueError(
            f"--batch-size {cfg.batch_size} is the global batch and must divide evenly over the "
            f"{ctx.world_size} training processes; use a multiple of {ctx.world_size}"
        )
    local_batch = cfg.batch_size // ctx.world_size
    main = ctx.is_main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "checkpoints"
    device = device or resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, opt, losses = _build(model_cfg, cfg, device, ctx)
    history: list[dict[str, float]] = []
    start_epoch = 0
    if resume and (ckpt_dir / "last.pt").is_file():
        ckpt = load_checkpoint(ckpt_dir / "last.pt", map_location=device)
        if ModelConfig.from_dict(ckpt["model_config"]) != model_cfg:
            raise ValueError("--resume: the checkpoint's model config differs from this run's")
        loaded = model_from_checkpoint(ckpt, weights="training").to(device)
        model.load_state_dict(loaded.state_dict())
        opt.load_state_dict(ckpt["optim"])
        start_epoch, history = int(ckpt["epoch"]), list(ckpt["history"])
        logger.info("resumed from epoch %d", start_epoch)
    check_agreement(
        ctx, train_config=cfg.to_dict(), model_config=model_cfg.to_dict(), image_spec=spec.to_dict(),
        n_train=len(train), train_ids=_ids_digest(train), start_epoch=start_epoch,
    )
    ema = None  # the moving average scored, selected and exported (cfg.ema_decay > 0)
    if cfg.ema_decay > 0:
        ema = copy.deepcopy(model).requires_grad_(False)
        if resume and start_epoch > 0 and ckpt.get("ema_state") is not None:
            ema.load_state_dict(model_from_checkpoint(ckpt).to(device).state_dict())
    scored = model if ema is None else ema
    trained = _data_parallel(model, cfg, device) if ctx.enabled else model

    x_train, x_val = to_tensor(train.images, spec), to_tensor(selection.images, spec)
    y_train = y_val = None  # class labels, int64 (N,): the conditions of a conditional model
    if model_cfg.conditional:
        y_train, y_val = (_checked_labels(d, model_cfg.num_classes) for d in (train, selection))
    z_fixed = torch.randn(8, model_cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    x_corrupt = to_tensor(corrupt(selection.images, seed=cfg.seed)[0], spec)
    autocast = autocast_dtype(cfg.autocast, device)
    if main:
        logger.info("training on %s in %s", device, "bf16 autocast" if autocast is not None else "float32")
    writer = None
    if tensorboard and main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    dataset = TensorDataset(x_train) if y_train is None else TensorDataset(x_train, y_train)
    # one seeded permutation per epoch, dealt out over the processes: rank r gets rows r, r + N,
    # ... of every global batch (so 1 process and N processes see the same global batches)
    sampler = DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed * 1000, drop_last=True,
    )
    drop_last = len(x_train) > cfg.batch_size
    steps_per_epoch = len(x_train) // cfg.batch_size if drop_last else 1
    t0 = time.perf_counter()
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)  # resumable data order
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # the same on every rank
        loader = DataLoader(
            dataset, batch_size=local_batch, sampler=sampler, drop_last=drop_last,
            num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        )
        sums: dict[str, float] = {}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch,
                   disable=None if progress and main else True, leave=False)
        for step, (x, *y) in enumerate(bar):
            x = x.to(device, non_blocking=True)
            labels = y[0].to(device, non_blocking=True) if y else None
            x = x.contiguous(memory_format=memory_format(cfg))
            masked = cfg.mask_prob > 0 and torch.rand(1, generator=gen).item() < cfg.mask_prob
            noise = StepNoise.seeded(int(torch.randint(0, 2**62, (1,), generator=gen)), ctx.rank, ctx.world_size)
            mask = noise.masks(len(x), spec.height, cfg.hole_kind_list).to(device) if masked else None
            terms = train_step(trained, x, opt, losses, mask=mask, autocast_dtype=autocast, d_noise=cfg.d_noise,
                               d_negatives=cfg.negative_kinds, noise=noise, input_noise=cfg.input_noise,
                               labels=labels, hole_weight=cfg.hole_weight)
            if ema is not None:
                update_ema(ema, model, cfg.ema_decay, epoch * steps_per_epoch + step)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            if main:
                bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items()}, refresh=False)
            if writer is not None:
                for k, v in terms.items():
                    writer.add_scalar(f"train/{k}", v, epoch * steps_per_epoch + step)
        n_steps = max(1, step + 1)
        row = {"epoch": epoch + 1, **{k: v / n_steps for k, v in sums.items()}}
        if not main:  # rank 0 validates and writes; the others wait for it at the barrier
            history.append(row)
            ctx.barrier()
            continue
        row.update(_validate(scored, x_val, x_corrupt, device))
        row.update(heldout_losses(scored, x_val, losses, device, labels=y_val))
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        _epoch_pictures(scored, x_val[:8].to(device), z_fixed, run_dir, epoch + 1,
                        None if y_val is None else y_val[:8].to(device))
        logger.info("epoch %d/%d %s", epoch + 1, cfg.epochs, " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        if writer is not None:
            for k, v in row.items():
                if k.startswith("val_"):
                    writer.add_scalar(f"val/{k}", v, epoch + 1)  # val/val_pixel, val/val_kl, ...
            _log_images(writer, scored, x_val[:16].to(device), epoch + 1, None if y_val is None else y_val[:16].to(device))
        payload = {
            "model_config": model_cfg.to_dict(),
            "train_config": cfg.to_dict(),
            "image_spec": spec.to_dict(),
            "epoch": epoch + 1,
            "history": history,
            "state": network_states(model),
            "optim": opt.state_dict(),
            "ema_state": None if ema is None else network_states(ema),
            "distributed": ctx.record(),
            # the class names of a conditional model (index = label), for the bundle manifest
            "class_names": list(train.class_names)[: model_cfg.num_classes] if model_cfg.conditional else None,
        }
        save_checkpoint(ckpt_dir / f"epoch_{epoch + 1:03d}.pt", payload)
        save_checkpoint(ckpt_dir / "last.pt", payload)
        ctx.barrier()
    if writer is not None:
        writer.close()
    if main:
        from vaegan.trainer.pictures import write_losses_png, write_samples_png

        write_losses_png(run_dir, history)
        write_samples_png(run_dir)
    return RunResult(run_dir, ckpt_dir / "last.pt", cfg.epochs, history, time.perf_counter() - t0)
