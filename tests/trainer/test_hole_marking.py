"""Training and the runtime mark a hole the same way: the encoder meets holes at inference as
it learned them (they differed: 0 in training, the data's mean at inference, which cost
0.4-1.4 dB of hole PSNR on MNIST)."""

from __future__ import annotations

import numpy as np
import torch

from vaegan.service.runtime.inpaint import hole_start
from vaegan.trainer.step import masked_input


def test_the_runtime_starts_holes_as_training_marks_them() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2, 9, 7)).astype(np.float32)  # a normalized batch (N, C, H, W)
    mask = rng.random((3, 9, 7)) < 0.3  # (N, H, W), True = hole
    trained = masked_input(torch.from_numpy(x), torch.from_numpy(mask[:, None].astype(np.float32))).numpy()
    np.testing.assert_array_equal(hole_start(x, mask), trained)
    assert np.all(hole_start(x, mask)[np.broadcast_to(mask[:, None], x.shape)] == 0)  # the normalization mean
    np.testing.assert_array_equal(hole_start(x, mask)[np.broadcast_to(~mask[:, None], x.shape)],
                                  x[np.broadcast_to(~mask[:, None], x.shape)])  # known pixels as they were
