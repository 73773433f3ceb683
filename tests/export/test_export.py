"""ONNX export: parity, manifest contract, dynamic batch, checkpoint round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from vaegan.export import write_bundle
from vaegan.export.onnx_export import IR_VERSION, OPSET, PARITY_TOLERANCE
from vaegan.models import VAEGAN, ModelConfig
from vaegan.service.runtime import Runtime
from vaegan.service.runtime.bundle import GRAPHS, load_bundle, sha256_file
from vaegan.service.runtime.preprocess import ImageSpec, normalize
from vaegan.trainer.checkpoint import load_checkpoint, model_from_checkpoint


def test_manifest_follows_the_contract(tiny_bundle: Path) -> None:
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    for key in ("format_version", "name", "version", "created_at", "image", "latent_dim",
                "feature_dim", "onnx", "files", "calibration", "training"):
        assert key in m, key
    assert set(m["image"]) >= {"channels", "height", "width", "mean", "std", "resize"}
    assert m["onnx"]["opset"] == OPSET
    for f in GRAPHS.values():
        assert m["files"][f] == sha256_file(tiny_bundle / f)
        proto = onnx.load(str(tiny_bundle / f))
        assert proto.ir_version <= IR_VERSION
        onnx.checker.check_model(proto)
    assert all(v <= PARITY_TOLERANCE for v in m["onnx"]["parity_max_abs_error"].values())
    t = m["training"]
    assert t["dataset"] == "synthetic" and t["epochs"] == 3 and "recon_pixel" in t["losses"]


def test_runtime_reconstruction_matches_torch(tiny_run) -> None:
    outcome, _, _, spec = tiny_run
    model = model_from_checkpoint(load_checkpoint(outcome.run.checkpoint))
    rt = Runtime.load(outcome.bundle_dir, providers="cpu")
    imgs = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    x = normalize(imgs, rt.spec)
    with torch.no_grad():
        ref = model.reconstruct(torch.from_numpy(x)).numpy()
        logit, feats, patch = model.discriminator(torch.from_numpy(x))
    fwd = rt.forward(x)
    assert np.max(np.abs(fwd.x_hat - ref)) < 1e-4
    assert np.max(np.abs(fwd.logit - logit.numpy())) < 1e-4
    assert np.max(np.abs(fwd.feat_x - feats.numpy())) < 1e-4
    assert fwd.patch is not None and np.max(np.abs(fwd.patch - patch.numpy())) < 1e-4
    # the composed pipeline gives the same per-pixel logits as the three graphs
    fused = rt.forward_images(imgs)
    assert fused.patch is not None and np.max(np.abs(fused.patch - fwd.patch)) < 1e-4
    # every batch size works (dynamic batch axis)
    assert rt.forward(x[:1]).x_hat.shape == (1, 3, 32, 32)


def test_tampered_onnx_is_refused_naming_the_file(tiny_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from vaegan.service.runtime import BundleError

    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    data = bytearray((bad / "generator.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bad / "generator.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"generator\.onnx: sha256 mismatch"):
        load_bundle(bad)
    (bad / "generator.onnx").unlink()
    with pytest.raises(BundleError, match=r"generator\.onnx: file missing"):
        load_bundle(bad)


def test_wrong_shape_in_manifest_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from vaegan.service.runtime import BundleError

    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["latent_dim"] += 1
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"encoder\.onnx: output 'mu' has shape"):
        Runtime.load(bad)
    m["calibration"]["target_fpr"] = 0.5
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="calibration block"):
        load_bundle(bad)
    m["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format_version 99"):
        load_bundle(bad)


def test_checkpoint_round_trip_weights_only(tiny_run) -> None:
    outcome, cfg, model_cfg, _ = tiny_run
    ckpt = torch.load(outcome.run.checkpoint, weights_only=True)
    assert ckpt["epoch"] == cfg.epochs
    assert ckpt["model_config"] == model_cfg.to_dict()
    assert ckpt["train_config"]["dataset"] == "synthetic"
    assert len(ckpt["history"]) == cfg.epochs
    model = model_from_checkpoint(ckpt)
    for k, v in ckpt["state"]["generator"].items():
        assert torch.equal(model.generator.state_dict()[k], v)


def test_export_grey_odd_size(tmp_path: Path) -> None:
    cfg = ModelConfig(num_channels=1, image_size=28, latent_dim=8, base_width=8)
    manifest = write_bundle(VAEGAN(cfg).eval(), ImageSpec(1, 28, 28), tmp_path / "b", name="grey")
    assert manifest["graphs"]["generator"]["outputs"]["x_hat"] == [None, 1, 28, 28]
    rt = Runtime.load(tmp_path / "b")
    assert rt.reconstruct(np.zeros((2, 28, 28), np.uint8)).shape == (2, 28, 28, 1)
