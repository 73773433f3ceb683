"""Generator / decoder p(x|z): z -> image in [-1, 1]."""

from __future__ import annotations

import torch
from torch import nn

from vaegan.models.config import ModelConfig
from vaegan.models.layers import check_labels, crop_from_canvas, one_hot

__all__ = ["Generator"]


class Generator(nn.Module):
    """Linear projection to the bottom feature map, then transposed-conv stages and tanh. A
    conditional config (``num_classes`` K > 0) projects z concatenated with the one-hot label."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = cfg.stage_widths()[::-1]  # widest first
        self.bottom_ch = widths[0]
        self.fc = nn.Sequential(
            nn.Linear(cfg.latent_dim + cfg.num_classes, widths[0] * cfg.bottom_size**2, bias=False),
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

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, Z), labels int64 (B,) for a conditional model -> images (B, C, H, W) in [-1, 1]."""
        check_labels(labels, self.cfg.num_classes, "generator")
        if labels is not None:
            z = torch.cat([z, one_hot(labels, self.cfg.num_classes, z.dtype)], dim=1)  # (B, Z + K)
        s = self.cfg.bottom_size
        h = self.fc(z).view(-1, self.bottom_ch, s, s)  # (B, C', s, s)
        x = self.deconv(h)  # (B, C, work, work)
        return crop_from_canvas(x, self.cfg.image_size, self.cfg.work_size)  # (B, C, H, W)
