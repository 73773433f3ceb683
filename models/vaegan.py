"""The VAE-GAN of Larsen et al. 2016: encoder, generator (decoder) and discriminator."""

from __future__ import annotations

import torch
from torch import nn

from vaegan.models.config import ModelConfig
from vaegan.models.discriminator import Discriminator
from vaegan.models.encoder import Encoder
from vaegan.models.generator import Generator

__all__ = ["VAEGAN", "reparameterize"]


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps, eps ~ N(0, I)."""
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


class VAEGAN(nn.Module):
    """Holds the three networks; ``reconstruct`` is the deterministic inference path."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.generator = Generator(cfg)
        self.discriminator = Discriminator(cfg)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x_hat = G(mu(x)): the posterior mean, no sampling."""
        mu, _ = self.encoder(x)
        return self.generator(mu)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images from the prior, z ~ N(0, I)."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.cfg.latent_dim, device=device, generator=generator)
        return self.generator(z)
