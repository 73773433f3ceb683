"""Training variants (denoising input, weight decay, conditional) and the pictures a run leaves
behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conditional_data import COND_CLASSES, conditional_image, write_conditional_folder
from vaegan.cli import main
from vaegan.models import VAEGAN, AdversarialLoss, KLDivergence, ModelConfig, ReconstructionLoss
from vaegan.service.runtime import Runtime
from vaegan.trainer.checkpoint import load_checkpoint
from vaegan.trainer.config import TrainConfig
from vaegan.trainer.data import load_dataset
from vaegan.trainer.loop import _build
from vaegan.trainer.pipeline import image_spec_for, train_and_export
from vaegan.trainer.step import Losses, Optimizers, StepNoise, train_step

TINY_MODEL = {"num_channels": 3, "image_size": 32, "latent_dim": 8, "base_width": 8}


def _step_setup(seed: int = 0, num_classes: int = 0) -> tuple[VAEGAN, Optimizers, Losses]:
    torch.manual_seed(seed)
    m = VAEGAN(ModelConfig(**TINY_MODEL, num_classes=num_classes))
    opt = Optimizers(*(torch.optim.Adam(n.parameters(), 1e-3) for n in (m.encoder, m.generator, m.discriminator)))
    losses = Losses(KLDivergence(1e-3), ReconstructionLoss(), AdversarialLoss("lsgan", 0.01))
    return m, opt, losses


def test_input_noise_reaches_the_encoder_only_and_the_losses_target_the_clean_image() -> None:
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    m, opt, losses = _step_setup()
    seen: dict[str, torch.Tensor] = {}
    m.encoder.register_forward_pre_hook(lambda _mod, args: seen.__setitem__("encoder", args[0].detach().clone()))
    targets: list[torch.Tensor] = []
    recon_forward = losses.recon.forward

    def spy(x_true, *rest):  # noqa: ANN001, ANN002, ANN202
        targets.append(x_true.detach().clone())
        return recon_forward(x_true, *rest)

    losses.recon.forward = spy  # type: ignore[method-assign]
    train_step(m, x, opt, losses, noise=StepNoise.seeded(0), input_noise=0.3)
    added = seen["encoder"] - x
    assert 0.25 < float(added.std()) < 0.35  # the encoder saw x plus noise of std 0.3
    assert all(torch.equal(t, x) for t in targets)  # the reconstruction loss targets the clean x
    # without the variant the encoder sees x itself
    m2, opt2, losses2 = _step_setup()
    m2.encoder.register_forward_pre_hook(lambda _mod, args: seen.__setitem__("plain", args[0].detach().clone()))
    train_step(m2, x, opt2, losses2, noise=StepNoise.seeded(0))
    assert torch.equal(seen["plain"], x)


def test_weight_decay_applies_to_encoder_and_generator_not_d() -> None:
    cfg = TrainConfig(weight_decay=1e-4)
    _, opt, _ = _build(ModelConfig(**TINY_MODEL), cfg, torch.device("cpu"))
    assert opt.encoder.param_groups[0]["weight_decay"] == opt.generator.param_groups[0]["weight_decay"] == 1e-4
    assert opt.discriminator.param_groups[0]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="weight_decay"):
        TrainConfig(weight_decay=-1.0)
    with pytest.raises(ValueError, match="input_noise"):
        TrainConfig(input_noise=-0.1)


@pytest.mark.parametrize("variant", [{"input_noise": 0.2}, {"weight_decay": 1e-4}])
def test_each_variant_trains_exports_and_scores(variant: dict, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    cfg = TrainConfig(dataset="synthetic", epochs=1, batch_size=32, max_train=64, seed=0, **variant)
    spec = image_spec_for("synthetic", 32, 3)
    out = train_and_export(cfg, ModelConfig(**TINY_MODEL), spec, tmp_path, progress=False)
    manifest = json.loads((out.bundle_dir / "manifest.json").read_text())
    for k, v in variant.items():
        assert manifest["training"]["train_config"][k] == v  # the variant is recorded in the bundle
    assert manifest["training"]["world_size"] == 1 and manifest["training"]["backend"] is None
    images = load_dataset("synthetic", None, "test", None, limit=8).images
    result = Runtime.load(out.bundle_dir, providers="cpu").score(images)
    assert result.score.shape == (8,) and np.isfinite(result.score).all()


def test_a_training_run_writes_its_pictures(tiny_run) -> None:
    outcome, cfg, _, spec = tiny_run
    run_dir = outcome.run.run_dir
    history = json.loads((run_dir / "history.json").read_text())
    for key in ("kl", "val_kl", "recon_pixel", "val_recon_pixel", "adv_d", "val_adv_d"):
        assert all(np.isfinite(r[key]) for r in history), key
    losses = Image.open(run_dir / "losses.png")
    assert losses.size[0] > 400 and losses.size[1] > 200
    samples = Image.open(run_dir / "samples.png")
    rows = len(list((run_dir / "samples").glob("epoch_*.png")))
    assert rows == cfg.epochs
    # a header, the held-out images' row, then one row per epoch of 8 samples + 8 reconstructions
    assert samples.size[1] == 16 + (spec.height + 2) * (rows + 1)
    assert samples.size[0] >= 16 * spec.width
    last = np.asarray(Image.open(run_dir / "samples" / f"epoch_{cfg.epochs:03d}.png"))
    assert last.shape[0] == spec.height and last.std() > 1.0  # real pictures, not a blank strip


# ---- the conditional variant (--conditional) ------------------------------------------------
def test_prior_labels_are_drawn_for_the_global_batch() -> None:
    """Rank r of 2 keeps rows r, r + 2, ... of the labels one process draws (DDP equality)."""
    one = StepNoise.seeded(5).labels(torch.zeros(8, 4), 3)
    two = [StepNoise.seeded(5, r, 2).labels(torch.zeros(4, 4), 3) for r in (0, 1)]
    assert one.dtype == torch.int64 and set(one.tolist()) <= {0, 1, 2}
    assert torch.equal(one[0::2], two[0]) and torch.equal(one[1::2], two[1])


def test_conditional_step_conditions_every_network_on_the_right_labels() -> None:
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    m, opt, losses = _step_setup(num_classes=3)
    seen: dict[str, list[torch.Tensor]] = {"encoder": [], "generator": [], "discriminator": []}
    for name in seen:
        getattr(m, name).register_forward_pre_hook(lambda _mod, args, name=name: seen[name].append(args[1]))
    terms = train_step(m, x, opt, losses, noise=StepNoise.seeded(0), labels=y, d_negatives=("erase",))
    assert all(np.isfinite(v) for v in terms.values())
    assert torch.equal(seen["encoder"][0], y)  # E sees the true classes
    rec, prior = seen["generator"][:2]
    assert torch.equal(rec, y) and prior.shape == (6,)  # G: the true classes, then drawn ones
    # D's own update: real, reconstruction, prior sample, shape negative (which keeps its class)
    assert torch.equal(seen["discriminator"][0], torch.cat([y, y, prior, y]))
    # E/G's pass, one call per batch: the real images (features only), reconstructions, samples
    assert [t.tolist() for t in seen["discriminator"][1:4]] == [y.tolist(), y.tolist(), prior.tolist()]
    with pytest.raises(ValueError, match="conditional on 3 classes; pass labels"):
        train_step(m, x, opt, losses, noise=StepNoise.seeded(0))
    plain, opt0, losses0 = _step_setup()
    with pytest.raises(ValueError, match="unconditional; it takes no labels"):
        train_step(plain, x, opt0, losses0, noise=StepNoise.seeded(0), labels=y)


def test_conditional_variant_trains_exports_and_scores(conditional_run) -> None:
    outcome, cfg = conditional_run
    manifest = json.loads((outcome.bundle_dir / "manifest.json").read_text())
    assert manifest["training"]["train_config"]["conditional"] is True  # the variant is recorded
    assert manifest["model_config"]["num_classes"] == len(COND_CLASSES)
    assert manifest["classes"] == list(COND_CLASSES)  # the folder's class names, by label
    for graph in ("encoder", "generator", "discriminator"):
        assert manifest["graphs"][graph]["inputs"]["label"] == [None]
    assert "pipeline.onnx" in manifest["files"] and manifest["calibration"] is not None
    assert load_checkpoint(outcome.run.checkpoint)["class_names"] == list(COND_CLASSES)
    rng = np.random.default_rng(7)
    images = np.stack([conditional_image(c, rng) for c in (0, 1, 2, 0, 1, 2)])  # (6, 28, 28) grey
    rt = Runtime.load(outcome.bundle_dir, providers="cpu")
    best = rt.score(images)
    assert best.score.shape == (6,) and np.isfinite(best.score).all()
    assert set(best.classes.tolist()) <= {0, 1, 2}
    claimed = rt.score(images, classes=[0, 1, 2, 0, 1, 2])
    assert claimed.classes.tolist() == [0, 1, 2, 0, 1, 2] and np.isfinite(claimed.score).all()
    assert (best.score <= claimed.score + 1e-9).all()  # the best class is never worse than the true one


def test_conditional_without_labels_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flat = tmp_path / "flat"  # one class of normals ("normal"): nothing to condition on
    flat.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(conditional_image(0, rng)).save(flat / f"{i}.png")
    cfg = TrainConfig(dataset="folder", data_root=str(flat), epochs=1, batch_size=4, conditional=True)
    spec = image_spec_for("folder", None, None, flat)
    with pytest.raises(ValueError, match=r"--conditional needs training images of at least 2 classes.*'normal'"):
        train_and_export(cfg, ModelConfig(num_channels=1, image_size=28, latent_dim=8, base_width=8), spec,
                         tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training
    code = main(["train", "--dataset", "folder", "--data-root", str(flat), "--conditional", "--epochs", "1",
                 "--out", str(tmp_path / "cli"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--conditional needs training images of at least 2 classes" in err and "sub-folder per class" in err
    # --normal-class keeps one class: refused as the configs are read
    with pytest.raises(ValueError, match="--normal-class 1 keeps one class only"):
        TrainConfig(conditional=True, normal_class=1)
    labelled = write_conditional_folder(tmp_path / "labelled", per_class=2)
    code = main(["train", "--dataset", "folder", "--data-root", str(labelled), "--conditional", "--normal-class", "1",
                 "--out", str(tmp_path / "cli2"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "drop one of the two flags" in err, err
