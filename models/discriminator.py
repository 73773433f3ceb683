"""Discriminator: image -> (logit, features of an inner layer).

The features are Larsen et al.'s learned similarity metric (the reconstruction loss is taken in
this layer) and f-AnoGAN's feature residual at scoring time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from models.config import ModelConfig
from models.layers import pad_to_canvas

__all__ = ["Discriminator"]


class Discriminator(nn.Module):
    """Stride-2 conv stages with LeakyReLU (optionally spectral-normalized), then a linear logit."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg

        def sn(m: nn.Module) -> nn.Module:
            return spectral_norm(m) if cfg.spectral_norm else m

        layers: list[nn.Module] = []
        in_ch = cfg.num_channels
        for out_ch in cfg.stage_widths():
            layers += [sn(nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.head = sn(nn.Linear(cfg.feature_dim, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(pad_to_canvas(x, self.cfg.image_size, self.cfg.work_size)).flatten(1)  # (B, F)
        return self.head(f), f  # (B, 1), (B, F)
