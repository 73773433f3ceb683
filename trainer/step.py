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
from vaegan.trainer.config import HOLE_KINDS, NEGATIVE_KINDS

__all__ = [
    "HOLE_MASKS", "Losses", "Optimizers", "StepNoise", "cat_labels", "hole_masks", "patch_loss", "random_masks",
    "shape_negatives", "train_step",
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

    def uniforms(self, n: int, k: int) -> torch.Tensor:
        """Uniforms in [0, 1), (n, k) for the n local rows: per-image draws (a row per image)."""
        return self._rows(torch.rand(n * self.world_size, k, generator=self.generator))

    def labels(self, like: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Random class labels int64 (B,) uniform over 0..num_classes-1, placed like ``like``
        (B local rows first): the conditions of the conditional model's prior samples."""
        full = torch.randint(0, num_classes, (like.shape[0] * self.world_size,), generator=self.generator)
        return self._rows(full).to(like.device)

    def masks(self, n: int, size: int, kinds: Sequence[str] = ("rects",)) -> torch.Tensor:
        """:func:`hole_masks` for the local rows: float (n, 1, size, size)."""
        return self._rows(hole_masks(n * self.world_size, size, kinds, generator=self.generator))


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


def _only(masks: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Masks (n, 1, H, W) with the images outside ``rows`` (bool (n,); None: all) emptied."""
    return masks if rows is None else masks * rows[:, None, None, None]


def random_masks(n: int, size: int, generator: torch.Generator | None = None,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
    """Random rectangular holes, 1/8 to 1/2 of the side each: float (n, 1, size, size); with
    ``rows`` (bool (n,)), in those images only (the random draws are the same either way)."""
    lo, hi = max(1, size // 8), max(2, size // 2)
    hw = torch.randint(lo, hi + 1, (n, 2), generator=generator)
    top = (torch.rand(n, generator=generator) * (size - hw[:, 0] + 1)).long()
    left = (torch.rand(n, generator=generator) * (size - hw[:, 1] + 1)).long()
    return _only(_box_masks(top, left, hw[:, 0], hw[:, 1], size, size).float()[:, None], rows)  # (n, 1, size, size)


STROKE_STEPS = 40  # steps of a free-form stroke's random walk (before its coverage target stops it)


def stroke_masks(n: int, size: int, generator: torch.Generator | None = None,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
    """Free-form strokes: a random walk of discs (radius 1/14 of the side) that turns a little
    at every step, until it covers its target share of the image (10-30%, drawn per image):
    float (n, 1, size, size). ``rows`` (bool (n,)): draw strokes in those images only (the
    others stay empty; the random draws are the same either way)."""
    radius = max(1.0, size / 14)
    target = 0.10 + 0.20 * torch.rand(n, generator=generator)
    y, x = torch.rand(n, generator=generator) * size, torch.rand(n, generator=generator) * size
    angle = torch.rand(n, generator=generator) * 2 * torch.pi
    turns = torch.randn(STROKE_STEPS, n, generator=generator) * 0.6
    if rows is not None:  # render the chosen images only
        idx = rows.nonzero()[:, 0]
        full = torch.zeros(n, 1, size, size)
        full[idx] = _render_strokes(target[idx], y[idx], x[idx], angle[idx], turns[:, idx], size, radius)
        return full
    return _render_strokes(target, y, x, angle, turns, size, radius)


def _render_strokes(target: torch.Tensor, y: torch.Tensor, x: torch.Tensor, angle: torch.Tensor,
                    turns: torch.Tensor, size: int, radius: float) -> torch.Tensor:
    """The random walks of :func:`stroke_masks` drawn: float (n, 1, size, size)."""
    n = len(target)
    ar = torch.arange(size, dtype=torch.float32)
    out = torch.zeros(n, size, size, dtype=torch.bool)
    for k in range(STROKE_STEPS):
        going = out.flatten(1).float().mean(1) < target  # (n,): images still short of their share
        if not bool(going.any()):
            break
        disc = ((ar[None, :, None] - y[:, None, None]) ** 2 + (ar[None, None, :] - x[:, None, None]) ** 2) <= radius**2
        out |= disc & going[:, None, None]
        angle = angle + turns[k]
        y = (y + torch.sin(angle) * radius).clamp(0, size - 1)
        x = (x + torch.cos(angle) * radius).clamp(0, size - 1)
    return out.float()[:, None]


def centre_masks(n: int, size: int, generator: torch.Generator | None = None,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
    """A centred square of half the side (a quarter of the area), moved by up to 1/8 of the
    side: float (n, 1, size, size); ``rows`` as in :func:`random_masks`."""
    side = max(1, round(size / 2))
    jitter = max(1, size // 8)
    top = ((size - side) // 2 + torch.randint(-jitter, jitter + 1, (n,), generator=generator)).clamp(0, size - side)
    left = ((size - side) // 2 + torch.randint(-jitter, jitter + 1, (n,), generator=generator)).clamp(0, size - side)
    full = torch.full((n,), side)
    return _only(_box_masks(top, left, full, full, size, size).float()[:, None], rows)


HOLE_MASKS = {"rects": random_masks, "centre": centre_masks, "strokes": stroke_masks}
assert tuple(HOLE_MASKS) == HOLE_KINDS


def hole_masks(n: int, size: int, kinds: Sequence[str], generator: torch.Generator | None = None) -> torch.Tensor:
    """Training holes: every image gets one of ``kinds`` (:data:`HOLE_MASKS`), drawn uniformly:
    float (n, 1, size, size), 1 = hole."""
    unknown = [k for k in kinds if k not in HOLE_MASKS]
    if unknown or not kinds:
        raise ValueError(f"hole kinds must be among {', '.join(HOLE_MASKS)}, got {list(kinds)}")
    pick = torch.randint(0, len(kinds), (n,), generator=generator)
    # every kind draws for all n images (so the random stream does not depend on pick) and
    # draws holes in its own images only
    return sum(HOLE_MASKS[kind](n, size, generator, rows=pick == j) for j, kind in enumerate(kinds))  # type: ignore[return-value]


# number of uniform draws one image's negative consumes (kind choice plus its parameters)
NEGATIVE_DRAWS = 8


def _span(u: torch.Tensor, lo: torch.Tensor | int, hi: torch.Tensor | int) -> torch.Tensor:
    """Integers uniform in lo..hi (inclusive) from uniforms ``u`` in [0, 1): int64, like u."""
    return (torch.as_tensor(lo) + (u * (torch.as_tensor(hi) - lo + 1)).floor().long()).minimum(torch.as_tensor(hi))


def _box_masks(top: torch.Tensor, left: torch.Tensor, bh: torch.Tensor, bw: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bool (n, H, W): True inside each image's box (rows top..top+bh-1, columns left..left+bw-1)."""
    ar_h, ar_w = torch.arange(h, device=top.device), torch.arange(w, device=top.device)
    rows = (ar_h[None] >= top[:, None]) & (ar_h[None] < (top + bh)[:, None])  # (n, H)
    cols = (ar_w[None] >= left[:, None]) & (ar_w[None] < (left + bw)[:, None])  # (n, W)
    return rows[:, :, None] & cols[:, None, :]


def _shifted(src: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """``src`` (n, C, H, W) read at (row + dy, column + dx) per image (clamped at the borders):
    pixel (r, c) of the result is src[:, :, r + dy, c + dx]. dy, dx int64 (n,)."""
    n, _, h, w = src.shape
    rows = (torch.arange(h, device=src.device)[None] + dy[:, None]).clamp(0, h - 1)  # (n, H)
    cols = (torch.arange(w, device=src.device)[None] + dx[:, None]).clamp(0, w - 1)  # (n, W)
    picked = src[torch.arange(n, device=src.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (n, H, W, C)
    return picked.permute(0, 3, 1, 2)


def _boxes(u: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, ...]:
    """Boxes of 1/4 to 1/2 of each side at random places from uniforms u (n, 4):
    (top, left, height, width), int64 (n,) each."""
    bh, bw = _span(u[:, 0], h // 4, h // 2), _span(u[:, 1], w // 4, w // 2)
    return _span(u[:, 2], 0, h - bh), _span(u[:, 3], 0, w - bw), bh, bw


def _local_defects(img: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One small defect per image of ``img`` (n, C, H, W, normalized), parameters from the
    uniforms u (n, 7): (altered images, bool masks (n, H, W)). Size: a radius of 1-5% of the
    side. Placed on image content (a pixel at least as bright as the image's median), one of: a
    blob of another grey level (hole, stain), a thin line (cut, scratch), a patch copied from
    elsewhere in the image, a darkened spot."""
    n, _, h, w = img.shape
    side = min(h, w)
    grey = img.mean(1).flatten(1)  # (n, H*W)
    cand = grey >= grey.median(dim=1, keepdim=True).values
    k = (u[:, 0] * cand.sum(1)).floor().long()  # the k-th candidate pixel (0-based) of each image
    pos = (cand.cumsum(1) <= k[:, None]).sum(1).clamp(max=h * w - 1)
    cy, cx = (pos // w).float(), (pos % w).float()
    r = ((0.01 + 0.04 * u[:, 1]) * side).clamp(min=1.0)[:, None, None]  # (n, 1, 1)
    yy = torch.arange(h, device=img.device, dtype=torch.float32)[None, :, None] - cy[:, None, None]  # (n, H, 1)
    xx = torch.arange(w, device=img.device, dtype=torch.float32)[None, None, :] - cx[:, None, None]  # (n, 1, W)
    kind = (u[:, 2] * 4).floor().long().clamp(max=3)
    a, b, c = u[:, 3, None, None], u[:, 4, None, None], u[:, 5, None, None]  # (n, 1, 1): per-kind parameters
    # 0: blob of another grey level, an ellipse of aspect 0.4-1.6
    blob = (yy / r) ** 2 + (xx / (r * (0.4 + 1.2 * a))) ** 2 <= 1.0
    blob_val = 0.7 * (2 * b[:, None] - 1) + 0.3 * img
    # 1: thin line of any angle, 0.5-1.2% of the side wide, dark or (30%) of any grey
    angle = a * torch.pi
    across = (yy * torch.cos(angle) - xx * torch.sin(angle)).abs()
    along = (yy * torch.sin(angle) + xx * torch.cos(angle)).abs()
    line = (across <= ((0.005 + 0.007 * b) * side).clamp(min=0.5)) & (along <= 2 * r)
    level = torch.where(c < 0.3, 2 * u[:, 6, None, None] - 1, torch.full_like(c, -0.8))
    line_val = img * 0.2 + level[:, None]
    # 2: a square patch of the same image copied from elsewhere onto the spot
    s = (2 * r[:, 0, 0]).long().clamp(min=2).clamp(max=min(h, w) - 1)  # (n,)
    sy, sx = _span(a[:, 0, 0], 0, h - s), _span(b[:, 0, 0], 0, w - s)
    ty = torch.minimum((cy.long() - s // 2).clamp(min=0), h - s)
    tx = torch.minimum((cx.long() - s // 2).clamp(min=0), w - s)
    patch = _box_masks(ty, tx, s, s, h, w)
    patch_val = _shifted(img, sy - ty, sx - tx)
    # 3: darkened spot, a disc brought 40-80% of the way to black
    spot = (yy / r) ** 2 + (xx / r) ** 2 <= 1.0
    spot_val = (img + 1.0) * (0.2 + 0.4 * c[:, None]) - 1.0
    pick = [kind[:, None, None] == i for i in range(4)]  # (n, 1, 1) each
    mask = (pick[0] & blob) | (pick[1] & line) | (pick[2] & patch) | (pick[3] & spot)  # (n, H, W)
    value = torch.where(pick[0][:, None], blob_val, torch.where(pick[1][:, None], line_val,
                        torch.where(pick[2][:, None], patch_val, spot_val)))
    return torch.where(mask[:, None], value, img), mask


def shape_negatives(
    x: torch.Tensor, kinds: tuple[str, ...], generator: torch.Generator | None = None,
    draws: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images made wrong in shape but not in texture, one of ``kinds`` per image: negative
    data augmentation (Sinha et al. 2021) that D must call fake. x: normalized (B, C, H, W).

    ``erase``: a box (1/4 to 1/2 of each side) filled with the image's median, its background
    (strokes go missing: an 8 becomes a 3). ``paste``: a box of the next image of the batch laid
    over another place, keeping the brighter pixel (strokes are added). ``swap``: the image
    rolled by half its height or width. ``rot``: turned by 90 or 270 degrees (square images).
    ``local``: one small defect (1-5% of the side: a blob, a thin line, a copied patch or a dark
    spot) on the image's content, as real defects on photographed parts are.

    Every random choice of image i comes from row i of ``draws`` (B, NEGATIVE_DRAWS) uniforms
    in [0, 1) (drawn from ``generator`` when not given), so an image's negative does not depend
    on which process holds it; ``paste`` takes its strokes from the next image of the same
    (local) batch. The whole batch is altered at once, kind by kind, on x's device.

    Returns (altered images, float masks (B, 1, H, W): 1 where the image was altered), so D's
    per-pixel head learns *where* an image is wrong.
    """
    unknown = [k for k in kinds if k not in NEGATIVE_KINDS]
    if unknown:
        raise ValueError(f"unknown negative kind {unknown[0]!r} (known: {', '.join(NEGATIVE_KINDS)})")
    b, _, h, w = x.shape
    if draws is None:
        draws = torch.rand(b, NEGATIVE_DRAWS, generator=generator)
    u = draws.to(x.device, torch.float32)
    choice = (u[:, 0] * len(kinds)).floor().long().clamp(max=len(kinds) - 1)
    out, masks = x.clone(), torch.zeros(b, h, w, dtype=torch.bool, device=x.device)
    for j, kind in enumerate(kinds):
        idx = (choice == j).nonzero()[:, 0]
        if len(idx) == 0:
            continue
        xi, ui = x[idx], u[idx, 1:]
        if kind in ("erase", "paste"):
            top, left, bh, bw = _boxes(ui, h, w)
            m = _box_masks(top, left, bh, bw, h, w)
            if kind == "erase":  # each channel's median: the background
                fill = xi.flatten(2).median(dim=2).values[:, :, None, None].expand_as(xi)
            else:  # the box of the next image from (st, sl), keeping the brighter pixel
                st, sl = _span(ui[:, 4], 0, h - bh), _span(ui[:, 5], 0, w - bw)
                fill = torch.maximum(xi, _shifted(x[(idx + 1) % b], st - top, sl - left))
            out[idx] = torch.where(m[:, None], fill, xi)
        elif kind in ("swap", "rot"):
            first = (ui[:, 0] < 0.5)[:, None, None, None]
            if kind == "swap":
                out[idx] = torch.where(first, torch.roll(xi, h // 2, dims=2), torch.roll(xi, w // 2, dims=3))
            else:
                out[idx] = torch.where(first, torch.rot90(xi, 1, dims=(2, 3)), torch.rot90(xi, 3, dims=(2, 3)))
            m = torch.ones(len(idx), h, w, dtype=torch.bool, device=x.device)
        else:  # local
            out[idx], m = _local_defects(xi, ui)
        masks[idx] = m
    return out, masks[:, None].to(x.dtype)


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
    hole_weight: float = 0.0,
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
            negatives, neg_masks = shape_negatives(x, d_negatives, draws=noise.uniforms(len(x), NEGATIVE_DRAWS))
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
        # one call per batch (D has no batch statistics, so this equals one call on their
        # concatenation): the real images' features are only a target, computed without a graph,
        # and the encoder's backward pass below reaches D's input on the reconstructions alone
        with torch.no_grad():
            _, feat_real, _ = D_plain(x, labels)  # (B, F)
        logit_rec, feat_rec, _ = D_plain(x_rec, labels)  # (B, 1), (B, F)
        logit_prior, _, _ = D_plain(x_prior, prior_labels)  # (B, 1)
        kl = losses.kl(mu.float(), logvar.float())
        rec_feature, rec_pixel = losses.recon(x, x_rec, feat_real, feat_rec)
        if mask is not None and hole_weight > 0:  # the pixel MSE inside the holes, on top
            hole_mse = ((x_rec.float() - x) ** 2 * mask).sum() / (_global_count(mask) * x.shape[1])
            rec_pixel = rec_pixel + hole_weight * hole_mse
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
