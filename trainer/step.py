"""One VAE-GAN training step as a plain function returning named loss terms.

Larsen et al. 2016, section 2.3: D learns to tell real images from reconstructions and prior
samples; the encoder minimizes KL + the learned-similarity reconstruction; the generator
minimizes the reconstruction + the adversarial term. D is updated first, on detached fakes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vaegan.models import VAEGAN, AdversarialLoss, KLDivergence, ReconstructionLoss
from vaegan.trainer.config import NEGATIVE_KINDS

__all__ = [
    "Losses", "Optimizers", "StepNoise", "cat_labels", "patch_loss", "random_masks", "shape_negatives", "train_step",
]


@dataclass
class StepNoise:
    """The random draws of one training step, made for the whole global batch and cut to this
    process's rows, so N data-parallel processes draw what one process with the same global
    batch would (see :mod:`trainer.distributed`).

    Rank ``r`` of ``world_size`` holds rows ``r, r + world_size, ...`` of the global batch (the
    order ``DistributedSampler`` deals them in). Every rank must seed ``generator`` alike.
    """

    generator: torch.Generator
    rank: int = 0
    world_size: int = 1

    @classmethod
    def seeded(cls, seed: int, rank: int = 0, world_size: int = 1) -> StepNoise:
        return cls(torch.Generator().manual_seed(seed), rank, world_size)

    def _rows(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.rank :: self.world_size]

    def randn(self, like: torch.Tensor) -> torch.Tensor:
        """N(0, 1) noise shaped, typed and placed like ``like`` (B local rows first)."""
        full = torch.randn((like.shape[0] * self.world_size, *like.shape[1:]), generator=self.generator)
        return self._rows(full).to(like.device, like.dtype)

    def seeds(self, n: int) -> list[int]:
        """One seed per local row, for draws made image by image."""
        return self._rows(torch.randint(0, 2**62, (n * self.world_size,), generator=self.generator)).tolist()

    def labels(self, like: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Random class labels int64 (B,) uniform over 0..num_classes-1, placed like ``like``
        (B local rows first): the conditions of the conditional model's prior samples."""
        full = torch.randint(0, num_classes, (like.shape[0] * self.world_size,), generator=self.generator)
        return self._rows(full).to(like.device)

    def masks(self, n: int, size: int) -> torch.Tensor:
        """:func:`random_masks` for the local rows: float (n, 1, size, size)."""
        return self._rows(random_masks(n * self.world_size, size, generator=self.generator))


@dataclass
class Losses:
    kl: KLDivergence
    recon: ReconstructionLoss
    adv: AdversarialLoss
    patch_weight: float = 1.0  # D's per-pixel loss, relative to its image-level adversarial loss


@dataclass
class Optimizers:
    encoder: torch.optim.Optimizer
    generator: torch.optim.Optimizer
    discriminator: torch.optim.Optimizer

    def state_dict(self) -> dict[str, dict]:
        return {k: getattr(self, k).state_dict() for k in ("encoder", "generator", "discriminator")}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for k, v in state.items():
            getattr(self, k).load_state_dict(v)


def random_masks(n: int, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random rectangular holes, 1/8 to 1/2 of the side each: float (n, 1, size, size)."""
    lo, hi = max(1, size // 8), max(2, size // 2)
    hw = torch.randint(lo, hi + 1, (n, 2), generator=generator)
    top = (torch.rand(n, generator=generator) * (size - hw[:, 0] + 1)).long()
    left = (torch.rand(n, generator=generator) * (size - hw[:, 1] + 1)).long()
    ar = torch.arange(size)
    rows = (ar[None] >= top[:, None]) & (ar[None] < (top + hw[:, 0])[:, None])  # (n, size)
    cols = (ar[None] >= left[:, None]) & (ar[None] < (left + hw[:, 1])[:, None])  # (n, size)
    return (rows[:, :, None] & cols[:, None, :]).float()[:, None]  # (n, 1, size, size)


def _box(h: int, w: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """A random box of 1/4 to 1/2 of each side: (top, left, height, width)."""
    bh = int(torch.randint(h // 4, h // 2 + 1, (1,), generator=generator))
    bw = int(torch.randint(w // 4, w // 2 + 1, (1,), generator=generator))
    t = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
    lf = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
    return t, lf, bh, bw


def _local_defect(img: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One small defect drawn into ``img`` (C, H, W, normalized) in place; returns its bool mask
    (H, W). Size: a radius of 1-5% of the side. Placed on image content (a pixel at least as
    bright as the median), one of: a blob of another grey level (hole, stain), a thin line
    (cut, scratch), a patch copied from elsewhere in the image, a darkened spot."""
    c, h, w = img.shape
    side = min(h, w)
    u = lambda lo, hi: float(torch.empty(1).uniform_(lo, hi, generator=generator))  # noqa: E731
    grey = img.mean(0)  # (H, W)
    cand = (grey >= grey.median()).nonzero()
    cy, cx = cand[int(torch.randint(0, len(cand), (1,), generator=generator))].tolist()
    r = max(1.0, u(0.01, 0.05) * side)
    yy = torch.arange(h, dtype=torch.float32)[:, None] - cy  # (H, 1)
    xx = torch.arange(w, dtype=torch.float32)[None, :] - cx  # (1, W)
    kind = int(torch.randint(0, 4, (1,), generator=generator))
    if kind == 0:  # blob of another grey level
        mask = (yy / r) ** 2 + (xx / (r * u(0.4, 1.6))) ** 2 <= 1.0
        level = u(-1.0, 1.0)
        img[:, mask] = 0.7 * level + 0.3 * img[:, mask]
    elif kind == 1:  # thin line
        angle = u(0.0, 3.1416)
        across = (yy * torch.cos(torch.tensor(angle)) - xx * torch.sin(torch.tensor(angle))).abs()
        along = (yy * torch.sin(torch.tensor(angle)) + xx * torch.cos(torch.tensor(angle))).abs()
        mask = (across <= max(0.5, u(0.005, 0.012) * side)) & (along <= 2 * r)
        img[:, mask] = img[:, mask] * 0.2 + (u(-1.0, 1.0) if u(0, 1) < 0.3 else -0.8)
    elif kind == 2:  # a patch of the image from elsewhere
        s = max(2, int(2 * r))
        s = min(s, h - 1, w - 1)
        sy, sx = int(torch.randint(0, h - s + 1, (1,), generator=generator)), int(torch.randint(0, w - s + 1, (1,), generator=generator))
        ty, tx = min(max(cy - s // 2, 0), h - s), min(max(cx - s // 2, 0), w - s)
        patch = img[:, sy : sy + s, sx : sx + s].clone()
        img[:, ty : ty + s, tx : tx + s] = patch
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[ty : ty + s, tx : tx + s] = True
    else:  # darkened spot
        mask = (yy / r) ** 2 + (xx / r) ** 2 <= 1.0
        img[:, mask] = (img[:, mask] + 1.0) * u(0.2, 0.6) - 1.0
    return mask


def shape_negatives(
    x: torch.Tensor, kinds: tuple[str, ...], generator: torch.Generator | None = None,
    seeds: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images made wrong in shape but not in texture, one of ``kinds`` per image: negative
    data augmentation (Sinha et al. 2021) that D must call fake. x: normalized (B, C, H, W).

    ``erase``: a box (1/4 to 1/2 of each side) filled with the image's median, its background
    (strokes go missing: an 8 becomes a 3). ``paste``: a box of the next image of the batch laid
    over another place, keeping the brighter pixel (strokes are added). ``swap``: the image
    rolled by half its height or width. ``rot``: turned by 90 or 270 degrees (square images).
    ``local``: one small defect (1-5% of the side: a blob, a thin line, a copied patch or a dark
    spot) on the image's content, as real defects on photographed parts are.

    Each image draws from its own generator, seeded by ``seeds[i]`` (drawn from ``generator``
    when not given), so an image's negative does not depend on which process holds it; ``paste``
    takes its strokes from the next image of the same (local) batch.

    Returns (altered images, float masks (B, 1, H, W): 1 where the image was altered), so D's
    per-pixel head learns *where* an image is wrong.
    """
    b, _, h, w = x.shape
    out = x.clone()
    masks = torch.zeros(b, 1, h, w)
    if seeds is None:
        seeds = torch.randint(0, 2**62, (b,), generator=generator).tolist()
    for i in range(b):
        generator = torch.Generator().manual_seed(int(seeds[i]))
        kind = kinds[int(torch.randint(0, len(kinds), (1,), generator=generator))]
        coin = float(torch.rand(1, generator=generator))
        if kind == "erase":
            t, lf, bh, bw = _box(h, w, generator)
            out[i, :, t : t + bh, lf : lf + bw] = x[i].flatten(1).median(dim=1).values[:, None, None]
            masks[i, :, t : t + bh, lf : lf + bw] = 1.0
        elif kind == "paste":
            t, lf, bh, bw = _box(h, w, generator)
            st = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
            sl = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
            region = out[i, :, t : t + bh, lf : lf + bw]
            out[i, :, t : t + bh, lf : lf + bw] = torch.maximum(region, x[(i + 1) % b, :, st : st + bh, sl : sl + bw])
            masks[i, :, t : t + bh, lf : lf + bw] = 1.0
        elif kind == "swap":
            out[i] = torch.roll(x[i], h // 2, dims=1) if coin < 0.5 else torch.roll(x[i], w // 2, dims=2)
            masks[i] = 1.0
        elif kind == "rot":
            out[i] = torch.rot90(x[i], 1 if coin < 0.5 else 3, dims=(1, 2))
            masks[i] = 1.0
        elif kind == "local":
            masks[i, 0] = _local_defect(out[i], generator).float()
        else:
            raise ValueError(f"unknown negative kind {kind!r} (known: {', '.join(NEGATIVE_KINDS)})")
    return out.to(x.device), masks.to(x.device, x.dtype)


def _global_count(weights: torch.Tensor) -> torch.Tensor:
    """The number of pixels ``weights`` selects in the whole global batch, divided by the number
    of data-parallel processes (1 without torchrun). A sum over local pixels divided by it,
    averaged over the processes (as DDP averages gradients), is the global batch's mean."""
    count = weights.detach().sum()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = count.clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp_min(1.0)


def patch_loss(real: torch.Tensor | None, fakes: list[torch.Tensor], negatives: torch.Tensor | None, neg_masks: torch.Tensor | None) -> torch.Tensor:
    """BCE of D's per-pixel logits (B, 1, H, W): real images real everywhere, reconstructions and
    prior samples fake everywhere, shape negatives fake inside their masks and real outside.
    The masked and unmasked pixels of the negatives weigh half each (masks are small); each is
    a mean over all such pixels of the global batch (:func:`_global_count`), so data-parallel
    shards average to the loss of one process holding the whole batch."""
    if real is None:
        return torch.zeros(())
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    terms = [bce(real, torch.ones_like(real))]
    terms += [bce(f, torch.zeros_like(f)) for f in fakes]
    if negatives is not None and neg_masks is not None:
        per_pixel = bce(negatives, 1.0 - neg_masks, reduction="none")
        inside = (per_pixel * neg_masks).sum() / _global_count(neg_masks)
        outside = (per_pixel * (1 - neg_masks)).sum() / _global_count(1 - neg_masks)
        terms.append(0.5 * (inside + outside))
    return sum(terms) / len(terms)


def _zero_grad(*modules: nn.Module) -> None:
    for m in modules:
        for p in m.parameters():
            p.grad = None


def masked_input(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A normalized batch with its holes (``mask`` (B, 1, H, W), 1 = hole) set to 0, the
    normalization mean: how the encoder sees a masked image in training, and how the runtime
    starts a hole (``service.runtime.inpaint.hole_start``; a test checks they agree)."""
    return x * (1 - mask)


def _num_classes(net: nn.Module) -> int:
    """The class count of a network's config, through a DDP wrapper."""
    inner: Any = getattr(net, "module", net)
    return int(inner.cfg.num_classes)


def cat_labels(parts: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The labels of batches concatenated as their images are (int64 (sum B,)); None when the
    model is unconditional (any part without labels)."""
    if any(p is None for p in parts):
        return None
    return torch.cat([p for p in parts if p is not None])


def train_step(
    model: VAEGAN,
    x: torch.Tensor,
    opt: Optimizers,
    losses: Losses,
    mask: torch.Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
    d_noise: float = 0.0,
    d_negatives: tuple[str, ...] = (),
    noise: StepNoise | None = None,
    input_noise: float = 0.0,
    labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """One update of D, then of E and G, on a normalized batch x (B, C, H, W).

    With ``mask`` (B, 1, H, W), 1 = hole, the encoder sees the image with the holes filled with
    zeros (the normalized dataset mean) and the loss targets the whole image, which teaches the
    model to complete holes in one pass. ``d_noise`` > 0 adds Gaussian instance noise of that
    std to every input of D's own update (not to E/G's pass), so D cannot win on fine texture
    alone. ``input_noise`` > 0 is the denoising variant: the encoder sees x plus Gaussian
    noise of that std (normalized units) while every loss targets the clean x.
    ``noise``: where the step's random draws come from (default: seeded from torch's
    global generator); data-parallel ranks pass generators seeded alike.
    ``labels``: int64 (B,) class ids of x, for a conditional model (CVAE-GAN, required there):
    E, G and D see the true labels for the real images, their reconstructions and their shape
    negatives, and labels drawn uniformly (from ``noise``, for the global batch) for the prior
    samples. Without labels nothing is drawn for them, so an unconditional step is unchanged.

    ``model``'s networks may be wrapped in ``DistributedDataParallel``: D's second pass (E/G's
    loss) runs the unwrapped D, as D gets no gradient there. Returns the named loss terms.
    """
    E, G, D = model.encoder, model.generator, model.discriminator
    D_plain = getattr(D, "module", D)  # DDP's inner module: no gradient sync for E/G's pass
    device_type = x.device.type
    amp = torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    if noise is None:
        noise = StepNoise.seeded(int(torch.randint(0, 2**62, (1,))))
    x_in = x + input_noise * noise.randn(x) if input_noise > 0 else x
    x_in = masked_input(x_in, mask) if mask is not None else x_in

    # ---- discriminator: real vs reconstruction vs prior sample -------------------------
    with amp:
        mu, logvar = E(x_in, labels)
        z = mu + noise.randn(mu) * torch.exp(0.5 * logvar)  # reparameterization
        x_rec = G(z, labels)
        z_prior = noise.randn(mu)
        # the conditional model: E, G and D take a label per image; prior samples get drawn ones
        prior_labels = noise.labels(mu, _num_classes(G)) if labels is not None else None
        x_prior = G(z_prior, prior_labels)
        # D has no batch statistics, so one call on the three batches equals three calls
        parts = [x, x_rec.detach(), x_prior.detach()]
        part_labels = [labels, labels, prior_labels]
        neg_masks = None
        if d_negatives:
            negatives, neg_masks = shape_negatives(x, d_negatives, seeds=noise.seeds(len(x)))
            parts.append(negatives)
            part_labels.append(labels)  # a negative keeps its image's class
        d_in = torch.cat(parts)  # (3B or 4B, C, H, W)
        if d_noise > 0:
            d_in = d_in + d_noise * torch.cat([noise.randn(p) for p in parts])
        # (3B or 4B, 1), _, (3B or 4B, 1, H, W) or None
        logits, _, patches = D(d_in, cat_labels(part_labels))
        logit_real, *logit_fakes = logits.chunk(len(parts))
        loss_d = losses.adv.discriminator_loss(logit_real, *logit_fakes)
        loss_patch = torch.zeros((), device=x.device)
        if patches is not None and losses.adv.kind != "none":
            p_real, p_rec, p_prior, *p_neg = patches.float().chunk(len(parts))
            # reconstructions and prior samples count as fake everywhere: without them the head's
            # map localized the tyre defects far worse (pixel AUROC 0.36 against 0.93, seed 0)
            loss_patch = patch_loss(p_real, [p_rec, p_prior], p_neg[0] if p_neg else None, neg_masks)
            loss_d = loss_d + losses.adv.weight * losses.patch_weight * loss_patch
    _zero_grad(D)
    loss_d.float().backward()
    opt.discriminator.step()

    # ---- encoder and generator -----------------------------------------------------------
    with amp:
        d_in = torch.cat([x, x_rec, x_prior])
        # (3B, 1), (3B, F)
        logits, feats, _ = D_plain(d_in, cat_labels(part_labels[:3]))
        _, logit_rec, logit_prior = logits.chunk(3)
        feat_real, feat_rec, _ = feats.chunk(3)
        kl = losses.kl(mu.float(), logvar.float())
        rec_feature, rec_pixel = losses.recon(x, x_rec, feat_real, feat_rec)
        adv_g = losses.adv.generator_loss(logit_rec, logit_prior)
        loss_e = (kl + rec_feature + rec_pixel).float()
        loss_g = (rec_feature + rec_pixel + adv_g).float()
    _zero_grad(E, G)
    # Larsen's split: the encoder gets no adversarial gradient, D's weights get none here.
    loss_e.backward(inputs=list(E.parameters()), retain_graph=True)
    loss_g.backward(inputs=list(G.parameters()))
    opt.encoder.step()
    opt.generator.step()

    return {
        "kl": kl.item(),
        "recon_feature": rec_feature.item(),
        "recon_pixel": rec_pixel.item(),
        "adv_g": adv_g.item(),
        "adv_d": loss_d.item(),
        "patch_d": loss_patch.item(),
    }
