"""The `vaegan` command line: help, one-line errors, train/export/resume end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaegan.cli import main
from vaegan.service.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]
TINY = ["--latent-dim", "8", "--base-width", "8", "--batch-size", "32", "--max-train", "96", "--no-progress"]


def test_help_lists_the_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "vaegan", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for cmd in ("train", "export", "calibrate", "evaluate", "serve", "demo"):
        assert cmd in out.stdout


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--out", "x", "--epochs", "many"], "invalid int value"),
        (["train", "--out", "x", "--dataset", "imagenet"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
        (["export", "--out", "x"], "--checkpoint"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv: list[str], needle: str) -> None:
    out = subprocess.run([sys.executable, "-m", "vaegan", *argv], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert needle in lines[0] and "Traceback" not in out.stderr


def test_train_flags_default_to_the_train_config_defaults() -> None:
    """The CLI spells its defaults out (its parser must not import trainer); they must agree."""
    from vaegan.cli import _train_configs, build_parser
    from vaegan.trainer.config import TrainConfig

    cfg, _, _ = _train_configs(build_parser().parse_args(["train", "--out", "x"]))
    d = TrainConfig()
    for name in ("adv_loss", "adv_weight", "d_negatives", "d_noise", "d_lr_scale", "ema_decay", "mask_prob",
                 "kl_weight", "feature_weight", "pixel_weight", "val_fraction", "selection_fraction", "target_fpr",
                 "batch_size", "input_noise", "weight_decay", "hole_kinds", "hole_weight", "autocast",
                 "channels_last"):
        assert getattr(cfg, name) == getattr(d, name), name


def test_user_errors_exit_2_with_a_message(tmp_path: Path, capsys) -> None:
    assert main(["train", "--dataset", "mnist", "--out", str(tmp_path)]) == 2
    assert "--data-root is required" in capsys.readouterr().err
    assert main(["train", "--dataset", "mnist", "--data-root", str(tmp_path / "nope"), "--normal-class", "0",
                 "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--image-size", "20", *TINY]) == 2
    assert "image_size" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "b")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "nobundle"), "--dataset", "synthetic", "--out", str(tmp_path)]) == 2
    assert "no such bundle" in capsys.readouterr().err


def test_train_resume_and_export(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--epochs", "1", "--tensorboard", *TINY]) == 0
    assert (run / "bundle" / "manifest.json").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"train/recon_pixel", "train/adv_d", "val/val_pixel"} <= set(events.Tags()["scalars"])
    assert {"images/real", "images/reconstruction", "images/samples"} <= set(events.Tags()["images"])
    assert main(["train", "--out", str(run), "--epochs", "2", "--resume", *TINY]) == 0
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2]  # continued, not restarted
    assert (run / "checkpoints" / "epoch_001.pt").is_file()
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 2 and "val_selection_auroc" in history[0]

    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--out", str(out),
                 "--name", "again", "--version", "3"]) == 0
    rt = Runtime.load(out)
    assert rt.bundle.name == "again" and rt.bundle.version == "3"
    assert rt.bundle.calibration is not None  # calibrated on the run's held-out split
    assert rt.bundle.calibration.n == json.loads((run / "bundle" / "manifest.json").read_text())["calibration"]["n"]


def test_inpaint_cli_mask_and_auto(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    import numpy as np
    from PIL import Image

    from vaegan.service.runtime import Runtime
    from vaegan.trainer.data import load_dataset

    test = load_dataset("synthetic", None, "test", None, limit=24)
    rt = Runtime.load(tiny_bundle)
    # the defective image (odd indices) the model repairs most: a tiny model does not catch all
    defective = test.images[1::2]
    repaired = [int(m.sum()) for _, m in zip(*rt.repair(list(defective)), strict=True)]
    assert max(repaired) > 0, "the tiny model repairs none of 12 defective images"
    img = defective[int(np.argmax(repaired))]
    Image.fromarray(img).save(tmp_path / "in.png")
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert main(["inpaint", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "--model", str(tiny_bundle), "--out", str(tmp_path / "filled.png")]) == 0
    filled = np.asarray(Image.open(tmp_path / "filled.png"))
    assert filled.shape == img.shape
    assert np.array_equal(filled[mask == 0], img[mask == 0])
    assert main(["inpaint", str(tmp_path / "in.png"), "--auto", "--model", str(tiny_bundle),
                 "--out", str(tmp_path / "fixed.png"), "--save-mask", str(tmp_path / "used.png")]) == 0
    used = np.asarray(Image.open(tmp_path / "used.png")) > 0
    (fixed,), (expected,) = rt.repair([img])
    assert np.array_equal(used, expected) and used.any()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "fixed.png")), fixed)
    assert "repaired" in capsys.readouterr().out
    assert main(["inpaint", str(tmp_path / "missing.png"), "--auto", "--model", str(tiny_bundle),
                 "--out", str(tmp_path / "x.png")]) == 2


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG header that declares width x height grey pixels, with no pixel data: Pillow refuses
    it on open as a decompression bomb (more than twice Image.MAX_IMAGE_PIXELS)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_more_user_mistakes_are_one_line_and_exit_2(tmp_path: Path, tiny_bundle: Path, capsys) -> None:
    """Each of these printed a traceback: a manifest that is a JSON list, --out under a regular
    file, a decompression-bomb PNG in a training folder."""
    import shutil

    listed = tmp_path / "listed"
    shutil.copytree(tiny_bundle, listed)
    (listed / "manifest.json").write_text("[1, 2]")
    (tmp_path / "afile").write_text("x")
    bombs = tmp_path / "bombs"
    bombs.mkdir()
    (bombs / "huge.png").write_bytes(_png_declaring(30000, 30000))
    cases = [
        (["evaluate", "--model", str(listed), "--out", str(tmp_path / "r"), "--dataset", "synthetic"],
         "the manifest must be a JSON object"),
        (["train", "--out", str(tmp_path / "afile" / "run"), "--epochs", "1", "--max-train", "64", "--no-progress"],
         "Not a directory"),
        (["train", "--dataset", "folder", "--data-root", str(bombs), "--out", str(tmp_path / "run"), "--no-progress"],
         "too large to decode safely"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (argv, err)


def test_inpaint_cli_on_a_folder_with_a_mask_folder_in_one_model_load(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    """A folder of images and a folder of masks (matched by relative path, any extension): one
    model load, outputs mirror the folders as PNG; an image without a mask or that cannot be
    decoded is named and skipped (exit 3), the others are written."""
    import numpy as np
    from PIL import Image

    from vaegan.service.runtime import Runtime

    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "masks" / "sub").mkdir(parents=True)
    names = ["a.png", "sub/b.jpg", "sub/c.png"]
    imgs = {}
    for i, name in enumerate(names):
        img = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / "imgs" / name, quality=95)
        imgs[name] = np.asarray(Image.open(tmp_path / "imgs" / name))
        mask = np.zeros(img.shape[:2], np.uint8)
        mask[5:12, 6:20] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / (name.rsplit(".", 1)[0] + ".png"))
    (tmp_path / "imgs" / "nomask.png").write_bytes((tmp_path / "imgs" / "a.png").read_bytes())
    out = tmp_path / "out"
    code = main(["inpaint", str(tmp_path / "imgs"), "--mask", str(tmp_path / "masks"), "--model", str(tiny_bundle),
                 "--out", str(out), "--batch-size", "2"])
    err = capsys.readouterr().err
    assert code == 3 and "nomask.png: no mask" in err
    rt = Runtime.load(tiny_bundle)
    for name, img in imgs.items():
        got = np.asarray(Image.open(out / (name.rsplit(".", 1)[0] + ".png")))
        mask = np.asarray(Image.open(tmp_path / "masks" / (name.rsplit(".", 1)[0] + ".png"))) > 0
        (expected,) = rt.inpaint([img], [mask.astype(np.uint8)])
        assert np.array_equal(got, expected)  # as the runtime fills the image alone
        assert np.array_equal(got[~mask], img[~mask])
    assert not (out / "nomask.png").exists()
    # --auto over the folder, with the masks it used
    assert main(["inpaint", str(tmp_path / "masks"), "--auto", "--model", str(tiny_bundle), "--out", str(tmp_path / "fixed"),
                 "--save-mask", str(tmp_path / "used")]) == 0
    assert sorted(p.name for p in (tmp_path / "fixed").rglob("*.png")) == ["a.png", "b.png", "c.png"]
    assert sorted(p.name for p in (tmp_path / "used").rglob("*.png")) == ["a.png", "b.png", "c.png"]
    # a file of masks for a folder of images is a usage error in one line
    assert main(["inpaint", str(tmp_path / "imgs"), "--mask", str(tmp_path / "masks" / "a.png"),
                 "--model", str(tiny_bundle), "--out", str(out)]) == 2
    assert "give a folder of masks" in capsys.readouterr().err
