"""The VAE-GAN of Larsen et al. 2016: encoder, generator (decoder) and discriminator."""

from __future__ import annotations

import torch
from torch import nn

from vaegan.models.config import ModelConfig
from vaegan.models.discriminator import Discriminator
from vaegan.models.encoder import Encoder
from vaegan.models.generator import Generator

__all__ = ["VAEGAN", "reparameterize", "round_robin"]


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps, eps ~ N(0, I)."""
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


class VAEGAN(nn.Module):
    """Holds the three networks; ``reconstruct`` is the deterministic inference path.

    ``labels``: int64 (N,) class ids in 0..num_classes-1, required by a conditional model
    (``cfg.num_classes`` > 0) and refused by an unconditional one (ValueError).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.generator = Generator(cfg)
        self.discriminator = Discriminator(cfg)

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x, labels)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.generator(z, labels)

    def reconstruct(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x_hat = G(mu(x)): the posterior mean, no sampling."""
        mu, _ = self.encoder(x, labels)
        return self.generator(mu, labels)

    def sample(
        self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Images from the prior, z ~ N(0, I); a conditional model without ``labels`` draws the
        classes round-robin (0, 1, ..., K-1, 0, ...)."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.cfg.latent_dim, device=device, generator=generator)
        if labels is None and self.cfg.conditional:
            labels = round_robin(n, self.cfg.num_classes, device)
        return self.generator(z, labels)


def round_robin(n: int, num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 (n,) labels 0, 1, ..., num_classes-1, 0, 1, ...: every class in turn."""
    return torch.arange(n, device=device) % num_classes
