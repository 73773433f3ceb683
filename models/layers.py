"""Small shared pieces: padding to the work canvas and cropping back.

Both take static sizes from the config (never ``x.shape``), so exported graphs keep fixed
spatial dimensions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["check_labels", "crop_from_canvas", "label_planes", "one_hot", "pad_to_canvas"]


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


def check_labels(labels: torch.Tensor | None, num_classes: int, who: str) -> None:
    """A clear ValueError when a conditional network (``num_classes`` > 0) gets no labels, or an
    unconditional one gets some."""
    if num_classes > 0 and labels is None:
        raise ValueError(f"{who}: this model is conditional on {num_classes} classes; pass labels (N,) int64")
    if num_classes == 0 and labels is not None:
        raise ValueError(f"{who}: this model is unconditional; it takes no labels")


def one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """int64 (B,) -> (B, num_classes) of ``dtype``; a label outside 0..num_classes-1 gives a row
    of zeros. Written as a comparison with a constant range, so it exports to ONNX as Equal +
    Cast (the graphs take the label itself and one-hot it inside)."""
    classes = torch.arange(num_classes, device=labels.device)
    return (labels.reshape(-1, 1) == classes.reshape(1, -1)).to(dtype)


def label_planes(x: torch.Tensor, labels: torch.Tensor, num_classes: int, size: int) -> torch.Tensor:
    """x (B, C, size, size) with the one-hot labels appended as ``num_classes`` constant planes:
    (B, C + num_classes, size, size)."""
    planes = one_hot(labels, num_classes, x.dtype)[:, :, None, None].expand(-1, -1, size, size)
    return torch.cat([x, planes], dim=1)
