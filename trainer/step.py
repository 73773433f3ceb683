"""One VAE-GAN training step as a plain function returning named loss terms.

Larsen et al. 2016, section 2.3: D learns to tell real images from reconstructions and prior
samples; the encoder minimizes KL + the learned-similarity reconstruction; the generator
minimizes the reconstruction + the adversarial term. D is updated first, on detached fakes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models import VAEGAN, AdversarialLoss, KLDivergence, ReconstructionLoss, reparameterize

__all__ = ["Losses", "Optimizers", "random_masks", "train_step"]


@dataclass
class Losses:
    kl: KLDivergence
    recon: ReconstructionLoss
    adv: AdversarialLoss


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


def _zero_grad(*modules: nn.Module) -> None:
    for m in modules:
        for p in m.parameters():
            p.grad = None


def train_step(
    model: VAEGAN,
    x: torch.Tensor,
    opt: Optimizers,
    losses: Losses,
    mask: torch.Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
    d_noise: float = 0.0,
) -> dict[str, float]:
    """One update of D, then of E and G, on a normalized batch x (B, C, H, W).

    With ``mask`` (B, 1, H, W), 1 = hole, the encoder sees the image with the holes filled with
    zeros (the normalized dataset mean) and the loss targets the whole image, which teaches the
    model to complete holes in one pass. ``d_noise`` > 0 adds Gaussian instance noise of that
    std to every input of D's own update (not to E/G's pass), so D cannot win on fine texture
    alone. Returns the named loss terms as floats.
    """
    E, G, D = model.encoder, model.generator, model.discriminator
    device_type = x.device.type
    amp = torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    x_in = x * (1 - mask) if mask is not None else x

    # ---- discriminator: real vs reconstruction vs prior sample -------------------------
    with amp:
        mu, logvar = E(x_in)
        z = reparameterize(mu, logvar)
        x_rec = G(z)
        x_prior = G(torch.randn_like(mu))
        # D has no batch statistics, so one call on the three batches equals three calls
        d_in = torch.cat([x, x_rec.detach(), x_prior.detach()])  # (3B, C, H, W)
        if d_noise > 0:
            d_in = d_in + d_noise * torch.randn_like(d_in)
        logits, _ = D(d_in)  # (3B, 1)
        logit_real, logit_rec, logit_prior = logits.chunk(3)
        loss_d = losses.adv.discriminator_loss(logit_real, logit_rec, logit_prior)
    _zero_grad(D)
    loss_d.float().backward()
    opt.discriminator.step()

    # ---- encoder and generator -----------------------------------------------------------
    with amp:
        logits, feats = D(torch.cat([x, x_rec, x_prior]))  # (3B, 1), (3B, F)
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
    }
