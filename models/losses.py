"""Loss terms of the VAE-GAN, each a small module with its weights as constructor arguments."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdversarialLoss", "KLDivergence", "ReconstructionLoss"]

AdvKind = Literal["bce", "lsgan", "none"]


class KLDivergence(nn.Module):
    """KL(q(z|x) || N(0, I)), summed over z and averaged over the batch, times ``weight``."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)  # (B,)
        return self.weight * kl.mean()


class ReconstructionLoss(nn.Module):
    """Larsen's learned similarity (MSE in D's feature layer) plus an optional pixel MSE.

    Both terms are per-element means, so their scale does not depend on image size.
    Returns ``(feature_term, pixel_term)``, weights already applied.
    """

    def __init__(self, feature_weight: float = 1.0, pixel_weight: float = 1.0) -> None:
        super().__init__()
        self.feature_weight = feature_weight
        self.pixel_weight = pixel_weight

    def forward(
        self,
        x: torch.Tensor,
        x_rec: torch.Tensor,
        feat_real: torch.Tensor,
        feat_rec: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        feature = F.mse_loss(feat_rec, feat_real.detach())
        pixel = F.mse_loss(x_rec, x)
        return self.feature_weight * feature, self.pixel_weight * pixel


class AdversarialLoss(nn.Module):
    """GAN loss with the standard (BCE, non-saturating) or least-squares (LSGAN) objective.

    ``discriminator_loss`` takes the logits of real images and of any number of fake batches
    (Larsen's D sees reconstructions and prior samples); ``generator_loss`` the logits of the
    fakes that should pass as real. ``kind='none'`` turns the model into a plain VAE.
    """

    def __init__(self, kind: AdvKind = "bce", weight: float = 1.0) -> None:
        super().__init__()
        if kind not in ("bce", "lsgan", "none"):
            raise ValueError(f"unknown adversarial loss {kind!r}")
        self.kind = kind
        self.weight = weight

    def _target(self, logits: torch.Tensor, real: bool) -> torch.Tensor:
        t = torch.ones_like(logits) if real else torch.zeros_like(logits)
        if self.kind == "bce":
            return F.binary_cross_entropy_with_logits(logits, t)
        return F.mse_loss(logits, t)

    def discriminator_loss(self, real: torch.Tensor, *fakes: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return real.sum() * 0.0
        fake = sum(self._target(f, real=False) for f in fakes) / max(len(fakes), 1)
        return self.weight * (self._target(real, real=True) + fake)

    def generator_loss(self, *fakes: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return fakes[0].sum() * 0.0
        return self.weight * sum(self._target(f, real=True) for f in fakes) / len(fakes)
