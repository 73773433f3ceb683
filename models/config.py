"""Model hyperparameters: one frozen dataclass, saved inside every checkpoint."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape and width of the three networks.

    The networks work on a square canvas of ``work_size`` pixels (the image size rounded up to a
    multiple of ``2**num_stages``); inputs are zero-padded to it and outputs cropped back, so any
    image size in 28..256 works with the same code.

    ``num_classes`` > 0 makes the conditional VAE-GAN (CVAE-GAN): the encoder and the
    discriminator see the class as K one-hot planes beside the image channels, the generator
    sees z concatenated with the one-hot class. 0 (the default) is the unconditional model, with
    the same parameter names and shapes as before the field existed.
    """

    num_channels: int = 3  # image channels: 1 (grey) or 3 (RGB)
    image_size: int = 32  # height == width, 28..256
    latent_dim: int = 64  # size of z
    base_width: int = 32  # channels of the first conv stage; doubled per stage, capped at 8x
    spectral_norm: bool = True  # spectral normalization on every discriminator layer
    # a per-pixel head on D (PatchGAN-style, at stride 8 then upsampled to the image): where an
    # image looks fake, the evidence behind the ``disc_local`` score component and map
    patch_head: bool = True
    num_classes: int = 0  # > 0: conditional on a class label in 0..num_classes-1 (CVAE-GAN)

    def __post_init__(self) -> None:
        if self.num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {self.num_channels}")
        if not 28 <= self.image_size <= 256:
            raise ValueError(f"image_size must be in 28..256, got {self.image_size}")
        if self.latent_dim < 1 or self.base_width < 1:
            raise ValueError("latent_dim and base_width must be positive")
        if self.num_classes < 0 or self.num_classes == 1:
            raise ValueError(f"num_classes must be 0 (unconditional) or >= 2, got {self.num_classes}")

    @property
    def conditional(self) -> bool:
        """Whether the networks take a class label (``num_classes`` > 0)."""
        return self.num_classes > 0

    @property
    def num_stages(self) -> int:
        """Stride-2 stages, so that the smallest feature map is about 4x4."""
        return max(2, math.ceil(math.log2(self.image_size / 4)))

    @property
    def work_size(self) -> int:
        """Canvas side: image_size rounded up to a multiple of 2**num_stages."""
        step = 2**self.num_stages
        return math.ceil(self.image_size / step) * step

    @property
    def bottom_size(self) -> int:
        """Side of the smallest feature map."""
        return self.work_size // 2**self.num_stages

    def stage_widths(self) -> list[int]:
        """Output channels of each stride-2 stage, from the image side inwards."""
        return [self.base_width * min(2**i, 8) for i in range(self.num_stages)]

    @property
    def feature_dim(self) -> int:
        """Length of the discriminator's feature vector (its last conv block, flattened)."""
        return self.stage_widths()[-1] * self.bottom_size**2

    @property
    def patch_stage(self) -> int:
        """Index of the D stage that feeds the patch head: stride 8, or the last stage."""
        return min(2, self.num_stages - 1)

    def to_dict(self) -> dict[str, int | bool]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Read a saved config; one written before the patch head existed has none, one written
        before ``num_classes`` existed is unconditional (the default 0)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d}, **({} if "patch_head" in d else {"patch_head": False}))
