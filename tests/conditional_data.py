"""A labelled dataset the tests write themselves, for the conditional variant (--conditional):
a folder with one sub-folder per class of 28x28 grey images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COND_CLASSES = ("disc", "hstripes", "vstripes")  # sorted, as the folder reader numbers them
COND_PER_CLASS = 24


def conditional_image(cls: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 (28, 28) image of class ``cls`` of :data:`COND_CLASSES`: a bright disc,
    horizontal stripes or vertical stripes, with a random phase or offset and a little noise."""
    yy, xx = np.mgrid[:28, :28]
    phase = rng.uniform(0, 2 * np.pi)
    if cls == 0:
        a = np.where((yy - 14 - rng.integers(-3, 4)) ** 2 + (xx - 14 - rng.integers(-3, 4)) ** 2 < 60, 230.0, 30.0)
    elif cls == 1:
        a = 128 + 100 * np.sin(yy / 2 + phase)
    else:
        a = 128 + 100 * np.sin(xx / 2 + phase)
    return np.clip(a + rng.normal(0, 5, a.shape), 0, 255).astype(np.uint8)


def write_conditional_folder(root: Path, per_class: int = COND_PER_CLASS, seed: int = 0) -> Path:
    """A ``folder`` dataset of the three classes of :func:`conditional_image` under ``root``."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(COND_CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(conditional_image(c, rng)).save(root / name / f"{i:03d}.png")
    return root


