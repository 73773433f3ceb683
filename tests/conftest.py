"""Shared fixtures: a tiny VAE-GAN trained and exported by the test session itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conditional_data import write_conditional_folder

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Small enough to train in seconds on 2 CPU cores, big enough to separate synthetic defects.
TINY_MODEL = {"latent_dim": 16, "base_width": 16}
# BCE: in 3 tiny epochs it separates the synthetic defects better than the LSGAN default
# (0.69 vs the 0.7 floor); the fixture must give a real, useful bundle in seconds
TINY_TRAIN = {"epochs": 3, "batch_size": 32, "max_train": 768, "seed": 0, "adv_loss": "bce"}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """(TrainOutcome, TrainConfig, ModelConfig, ImageSpec) of a tiny synthetic run."""
    torch = pytest.importorskip("torch")
    from vaegan.models import ModelConfig
    from vaegan.trainer.config import TrainConfig
    from vaegan.trainer.pipeline import image_spec_for, train_and_export

    torch.set_num_threads(2)
    run_dir = tmp_path_factory.mktemp("tiny_run")
    cfg = TrainConfig(dataset="synthetic", **TINY_TRAIN)
    spec = image_spec_for("synthetic", 32, 3)
    model_cfg = ModelConfig(num_channels=3, image_size=32, **TINY_MODEL)
    outcome = train_and_export(cfg, model_cfg, spec, run_dir, name="tiny", progress=False)
    return outcome, cfg, model_cfg, spec


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run) -> Path:
    """Path to a calibrated bundle directory (32x32 RGB) trained on synthetic normals."""
    return tiny_run[0].bundle_dir


@pytest.fixture(scope="session")
def conditional_run(tmp_path_factory: pytest.TempPathFactory):
    """(TrainOutcome, TrainConfig) of a tiny --conditional run on
    :func:`~tests.conditional_data.write_conditional_folder` (3 classes, 72 images, one epoch):
    trains a step, exports, calibrates."""
    torch = pytest.importorskip("torch")
    from vaegan.models import ModelConfig
    from vaegan.trainer.config import TrainConfig
    from vaegan.trainer.pipeline import image_spec_for, train_and_export

    torch.set_num_threads(2)
    root = write_conditional_folder(tmp_path_factory.mktemp("conditional_data"))
    cfg = TrainConfig(dataset="folder", data_root=str(root), epochs=1, batch_size=16, seed=0, conditional=True,
                      adv_loss="bce")
    spec = image_spec_for("folder", None, None, root)
    model_cfg = ModelConfig(num_channels=spec.channels, image_size=spec.height, latent_dim=8, base_width=8)
    outcome = train_and_export(cfg, model_cfg, spec, tmp_path_factory.mktemp("conditional_run"), name="cond",
                               progress=False)
    return outcome, cfg


@pytest.fixture(scope="session")
def conditional_bundle(conditional_run) -> Path:
    """A calibrated conditional bundle (28x28 grey, 3 classes)."""
    return conditional_run[0].bundle_dir
