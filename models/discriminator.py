"""Discriminator: image -> (logit, features of an inner layer, per-pixel logits).

The features are Larsen et al.'s learned similarity metric (the reconstruction loss is taken in
this layer) and f-AnoGAN's feature residual at scoring time. The per-pixel logits come from a
small head on a stride-8 stage (PatchGAN-style): trained to call small local defects fake where
they are, they localize evidence that one image-level logit averages away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from vaegan.models.config import ModelConfig
from vaegan.models.layers import check_labels, crop_from_canvas, label_planes, pad_to_canvas

__all__ = ["Discriminator"]


class Discriminator(nn.Module):
    """Stride-2 conv stages with LeakyReLU (optionally spectral-normalized), then a linear logit;
    with ``cfg.patch_head``, a 3x3 + 1x1 conv head on stage ``cfg.patch_stage`` whose logit map
    is upsampled (bilinear) to the image. A conditional config (``num_classes`` K > 0) takes K
    one-hot label planes beside the image: D judges an image as an image of its class."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg

        def sn(m: nn.Module) -> nn.Module:
            return spectral_norm(m) if cfg.spectral_norm else m

        layers: list[nn.Module] = []
        in_ch = cfg.num_channels + cfg.num_classes
        for out_ch in cfg.stage_widths():
            layers += [sn(nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.head = sn(nn.Linear(cfg.feature_dim, 1))
        self.patch_head: nn.Module | None = None
        if cfg.patch_head:
            ch = cfg.stage_widths()[cfg.patch_stage]
            self.patch_head = nn.Sequential(sn(nn.Conv2d(ch, ch, 3, padding=1)), nn.LeakyReLU(0.2), sn(nn.Conv2d(ch, 1, 1)))

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x (B, C, H, W), labels int64 (B,) for a conditional model -> (logit (B, 1), features
        (B, F), per-pixel logits (B, 1, H, W) or None without a patch head)."""
        cfg = self.cfg
        check_labels(labels, cfg.num_classes, "discriminator")
        if labels is not None:
            x = label_planes(x, labels, cfg.num_classes, cfg.image_size)  # (B, C + K, H, W)
        h = pad_to_canvas(x, cfg.image_size, cfg.work_size)  # (B, C, work, work)
        tap = 2 * cfg.patch_stage + 1  # output of that stage's activation in self.features
        patch = None
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == tap and self.patch_head is not None:
                p = self.patch_head(h)  # (B, 1, work / 2^(stage+1), ...)
                p = F.interpolate(p, size=(cfg.work_size, cfg.work_size), mode="bilinear", align_corners=False)
                patch = crop_from_canvas(p, cfg.image_size, cfg.work_size)  # (B, 1, H, W)
        f = h.flatten(1)  # (B, F)
        return self.head(f), f, patch
