"""Training hyperparameters: one frozen dataclass, saved inside every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["HOLE_KINDS", "NEGATIVE_KINDS", "TrainConfig"]

# shape negatives for D (trainer.step.shape_negatives): real images made wrong in shape
NEGATIVE_KINDS = ("erase", "paste", "swap", "rot", "local")
# shapes of the training holes (trainer.step.hole_masks)
HOLE_KINDS = ("rects", "centre", "strokes")


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "synthetic"  # synthetic | mnist | fashion-mnist | cifar10 | folder
    data_root: str | None = None  # folder of the dataset files (not needed for synthetic)
    normal_class: int | None = None  # one-class protocol: train on this class only
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3  # Adam, the same for E, G and D
    beta1: float = 0.5
    beta2: float = 0.999
    kl_weight: float = 1.0  # KL per pixel element (so it compares with the per-element MSEs)
    feature_weight: float = 1.0  # Larsen's reconstruction in D's feature layer
    pixel_weight: float = 1.0  # plain pixel MSE
    adv_weight: float = 0.01  # adversarial term for G (and the scale of D's loss)
    adv_loss: str = "lsgan"  # lsgan | bce | none (plain VAE); lsgan: see README, MNIST benchmark
    d_lr_scale: float = 1.0  # D's learning rate = lr * d_lr_scale (a slower D saturates later)
    d_noise: float = 0.0  # std of Gaussian instance noise on D's inputs in its own update
    d_negatives: str = "erase,local"  # comma list of NEGATIVE_KINDS: altered real images D must call fake; "" = none
    patch_weight: float = 1.0  # D's per-pixel (patch head) loss relative to its image-level loss
    ema_decay: float = 0.0  # > 0: score/export an exponential moving average of the weights
    mask_prob: float = 0.5  # share of batches trained with random holes (inpainting)
    hole_kinds: str = "rects,centre,strokes"  # comma list of HOLE_KINDS (trainer.step.hole_masks), one per image
    hole_weight: float = 0.0  # extra pixel MSE inside the holes of a masked batch (its weight)
    input_noise: float = 0.0  # denoising variant: std of Gaussian noise on the encoder's input (normalized units)
    weight_decay: float = 0.0  # L2 weight decay on E and G (Adam's weight_decay), not on D
    # the conditional variant (CVAE-GAN): E, G and D take the image's class label (the dataset's
    # labels, >= 2 classes among the training images); the model config's num_classes follows
    conditional: bool = False
    # held-out normals, never trained on: share of the train split (plus the dataset's own
    # validation split where it has one), then cut into two parts of their own
    val_fraction: float = 0.2
    # share of the held-out normals in the *selection* part (per-epoch validation, checkpoint,
    # weights, component mean/std); the rest is the *calibration* part (threshold only)
    selection_fraction: float = 0.5
    max_train: int | None = None  # cap on training images (quick runs)
    target_fpr: float = 0.01  # calibration threshold: conformal, P(normal flagged) <= target_fpr
    select_checkpoint: str = "best"  # best (label-free selection signal) | last
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 0  # DataLoader workers
    # mixed precision: bf16 autocast for the networks' forward passes (weights and optimizer
    # state stay float32). auto: on CUDA only. bf16 on a CPU with native bf16 (AVX512-BF16, AMX)
    # trains 1.6x faster, at some cost in AUROC (README, training speed)
    autocast: str = "auto"  # auto | bf16 | off
    # channels-last memory format for the networks and batches (oneDNN and cuDNN run its
    # convolutions faster); False: NCHW, whose rounding makes N data-parallel processes end
    # bit-for-bit where one process does (tests/trainer/test_distributed.py)
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.adv_loss not in ("bce", "lsgan", "none"):
            raise ValueError(f"adv_loss must be bce, lsgan or none, got {self.adv_loss!r}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0.0 < self.selection_fraction < 1.0:
            raise ValueError(f"selection_fraction must be in (0, 1), got {self.selection_fraction}")
        if not 0.0 < self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in (0, 1), got {self.target_fpr}")
        if self.select_checkpoint not in ("best", "last"):
            raise ValueError(f"select_checkpoint must be best or last, got {self.select_checkpoint!r}")
        if self.d_lr_scale <= 0 or self.d_noise < 0 or self.patch_weight < 0:
            raise ValueError("d_lr_scale must be > 0, d_noise >= 0 and patch_weight >= 0")
        unknown = set(self.negative_kinds) - set(NEGATIVE_KINDS)
        if unknown:
            raise ValueError(f"d_negatives: unknown kind(s) {sorted(unknown)}; known: {', '.join(NEGATIVE_KINDS)}")
        if self.hole_weight < 0:
            raise ValueError(f"hole_weight must be >= 0, got {self.hole_weight}")
        bad = [k for k in self.hole_kind_list if k not in HOLE_KINDS]
        if bad or not self.hole_kind_list:
            raise ValueError(f"hole_kinds: unknown kind(s) {bad}; known: {', '.join(HOLE_KINDS)}")
        if self.input_noise < 0 or self.weight_decay < 0:
            raise ValueError(f"input_noise and weight_decay must be >= 0, got {self.input_noise} and {self.weight_decay}")
        if self.conditional and self.normal_class is not None:
            raise ValueError(
                f"--conditional trains on several normal classes, each image conditioned on its own, but "
                f"--normal-class {self.normal_class} keeps one class only: drop one of the two flags"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.autocast not in ("auto", "bf16", "off"):
            raise ValueError(f"autocast must be auto, bf16 or off, got {self.autocast!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def hole_kind_list(self) -> tuple[str, ...]:
        """``hole_kinds`` as a tuple (the shapes of the training holes)."""
        return tuple(k.strip() for k in self.hole_kinds.split(",") if k.strip())

    @property
    def negative_kinds(self) -> tuple[str, ...]:
        """``d_negatives`` as a tuple of kinds (empty: D sees no shape negatives)."""
        return tuple(k.strip() for k in self.d_negatives.split(",") if k.strip())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
