"""The moving average of the weights (``--ema-decay``): math, checkpoints, export path."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from vaegan.models import VAEGAN, ModelConfig  # noqa: E402
from vaegan.trainer.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from vaegan.trainer.loop import update_ema  # noqa: E402


def _pair() -> tuple[VAEGAN, VAEGAN]:
    cfg = ModelConfig(num_channels=1, image_size=28, latent_dim=4, base_width=4)
    torch.manual_seed(0)
    a = VAEGAN(cfg)
    torch.manual_seed(1)
    return a, VAEGAN(cfg)


def test_update_ema_averages_parameters_and_copies_buffers() -> None:
    ema, model = _pair()
    with torch.no_grad():
        for b in model.buffers():
            b.add_(1)  # float statistics and the integer batch counter alike
    before = [p.clone() for p in ema.parameters()]
    update_ema(ema, model, decay=0.5, step=10_000)  # warm-up over: d = 0.5
    for e, old, new in zip(ema.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(e, (old + new) / 2)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        assert torch.equal(e, b)


def test_update_ema_warms_up() -> None:
    """At step 0 the average moves 90% of the way (d = 1/10), not (1 - decay)."""
    ema, model = _pair()
    before = [p.clone() for p in ema.parameters()]
    update_ema(ema, model, decay=0.999, step=0)
    for e, old, new in zip(ema.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.1 * old + 0.9 * new)


def test_training_with_ema_checkpoints_both_and_exports_the_average(tmp_path: Path) -> None:
    from vaegan.trainer.config import TrainConfig
    from vaegan.trainer.pipeline import image_spec_for, train_and_export

    cfg = TrainConfig(dataset="synthetic", epochs=2, batch_size=32, max_train=128, ema_decay=0.9)
    spec = image_spec_for("synthetic", 32, 3)
    model_cfg = ModelConfig(num_channels=3, image_size=32, latent_dim=8, base_width=8)
    out = train_and_export(cfg, model_cfg, spec, tmp_path / "run", name="ema", progress=False)
    ckpt = load_checkpoint(out.run.checkpoint)
    assert ckpt["ema_state"] is not None
    scoring, training = model_from_checkpoint(ckpt), model_from_checkpoint(ckpt, weights="training")
    w_s = scoring.encoder.state_dict()
    w_t = training.encoder.state_dict()
    assert any(not torch.equal(w_s[k], w_t[k]) for k in w_s)  # two different sets of weights
    for k, v in ckpt["ema_state"]["encoder"].items():
        assert torch.equal(w_s[k], v)  # scoring = the average
    with pytest.raises(ValueError, match="weights"):
        model_from_checkpoint(ckpt, weights="other")
    assert (out.bundle_dir / "encoder.onnx").is_file()
