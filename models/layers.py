"""Small shared pieces: padding to the work canvas and cropping back.

Both take static sizes from the config (never ``x.shape``), so exported graphs keep fixed
spatial dimensions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["crop_from_canvas", "pad_to_canvas"]


def pad_to_canvas(x: torch.Tensor, image_size: int, work_size: int) -> torch.Tensor:
    """Zero-pad (B, C, image_size, image_size) centrally to (B, C, work_size, work_size)."""
    pad = work_size - image_size
    if pad == 0:
        return x
    lo = pad // 2
    return F.pad(x, (lo, pad - lo, lo, pad - lo))


def crop_from_canvas(x: torch.Tensor, image_size: int, work_size: int) -> torch.Tensor:
    """Central crop of (B, C, work_size, work_size) to (B, C, image_size, image_size)."""
    pad = work_size - image_size
    if pad == 0:
        return x
    lo = pad // 2
    return x[:, :, lo : lo + image_size, lo : lo + image_size]
