"""Convolutional encoder q(z|x): image -> (mu, logvar)."""

from __future__ import annotations

import torch
from torch import nn

from vaegan.models.config import ModelConfig
from vaegan.models.layers import check_labels, label_planes, pad_to_canvas

__all__ = ["Encoder"]


class Encoder(nn.Module):
    """Stride-2 conv stages with batch norm, then two linear heads for mu and logvar. A
    conditional config (``num_classes`` K > 0) takes K one-hot label planes beside the image."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        in_ch = cfg.num_channels + cfg.num_classes
        for i, out_ch in enumerate(cfg.stage_widths()):
            layers.append(nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1, bias=i == 0))
            if i > 0:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        flat = in_ch * cfg.bottom_size**2
        self.fc_mu = nn.Linear(flat, cfg.latent_dim)
        self.fc_logvar = nn.Linear(flat, cfg.latent_dim)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W), labels int64 (B,) for a conditional model -> (mu, logvar), each (B, Z)."""
        cfg = self.cfg
        check_labels(labels, cfg.num_classes, "encoder")
        if labels is not None:
            x = label_planes(x, labels, cfg.num_classes, cfg.image_size)  # (B, C + K, H, W)
        h = self.features(pad_to_canvas(x, cfg.image_size, cfg.work_size))  # (B, C', s, s)
        h = h.flatten(1)  # (B, C' * s * s)
        return self.fc_mu(h), self.fc_logvar(h).clamp(-30.0, 20.0)
