"""Generator / decoder p(x|z): z -> image in [-1, 1]."""

from __future__ import annotations

import torch
from torch import nn

from vaegan.models.config import ModelConfig
from vaegan.models.layers import crop_from_canvas

__all__ = ["Generator"]


class Generator(nn.Module):
    """Linear projection to the bottom feature map, then transposed-conv stages and tanh."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = cfg.stage_widths()[::-1]  # widest first
        self.bottom_ch = widths[0]
        self.fc = nn.Sequential(
            nn.Linear(cfg.latent_dim, widths[0] * cfg.bottom_size**2, bias=False),
            nn.BatchNorm1d(widths[0] * cfg.bottom_size**2),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        for in_ch, out_ch in zip(widths[:-1], widths[1:], strict=True):
            layers += [
                nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
        layers += [
            nn.ConvTranspose2d(widths[-1], cfg.num_channels, 4, stride=2, padding=1),
            nn.Tanh(),
        ]
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        s = self.cfg.bottom_size
        h = self.fc(z).view(-1, self.bottom_ch, s, s)  # (B, C', s, s)
        x = self.deconv(h)  # (B, C, work, work)
        return crop_from_canvas(x, self.cfg.image_size, self.cfg.work_size)  # (B, C, H, W)
