"""Data-parallel training under torchrun: real processes, gloo on CPU.

The central claim (trainer/distributed.py): N processes with ``--batch-size B`` end with the
parameters of one process with ``--batch-size B``. Tolerance 1e-4 per parameter after two Adam
steps at lr 1e-3 (measured: about 2e-6; the differences come from float summation order in
the gradient average and the global BatchNorm statistics).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
# two global batches of 16: two steps
# NCHW: channels-last convolutions round differently at batch 8 than at 16, and two Adam steps
# turn those last-bit differences into lr-sized ones on near-zero gradients (1.3% of the weights
# differ by > 1e-4), which would hide a real error; the gradients themselves are the same
# (tests/trainer/test_speed_options.py)
TINY = ["--dataset", "synthetic", "--epochs", "1", "--batch-size", "16", "--max-train", "32", "--image-size", "32",
        "--latent-dim", "8", "--base-width", "8", "--device", "cpu", "--no-progress", "--no-channels-last"]
TOL = 1e-4


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun(nproc: int, *args: str, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "vaegan", "train", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _states(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["state"]


def _max_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for net in a:
        assert a[net].keys() == b[net].keys(), net  # the global BatchNorm keeps BatchNorm's keys
        for k, v in a[net].items():
            if v.dtype.is_floating_point:
                worst = max(worst, float((v - b[net][k]).abs().max()))
    return worst


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    res = _torchrun(2, *TINY, "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    # rank 0 alone reports (and logs: rank 1 is quiet below warnings)
    assert res.stdout.count("trained 1 epochs") == 1, res.stdout
    return out


def test_two_processes_end_with_the_parameters_of_one(two_process_run: Path, tmp_path: Path) -> None:
    from vaegan.cli import main

    torch.set_num_threads(1)
    one = tmp_path / "one"
    assert main(["train", *TINY, "--out", str(one)]) == 0
    diff = _max_diff(_states(one), _states(two_process_run))
    assert diff < TOL, f"2 processes differ from 1 by {diff:.3g} (tolerance {TOL})"
    # and the comparison has teeth: a different seed is far away
    other = tmp_path / "other"
    assert main(["train", *TINY, "--out", str(other), "--seed", "1"]) == 0
    assert _max_diff(_states(one), _states(other)) > 100 * TOL


def test_rank_0_alone_writes_and_the_manifest_records_the_world(two_process_run: Path) -> None:
    ckpts = sorted(p.name for p in (two_process_run / "checkpoints").iterdir())
    assert ckpts == ["epoch_001.pt", "last.pt"]  # no second copy, no temp file left by another rank
    ckpt = torch.load(two_process_run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["distributed"] == {"world_size": 2, "backend": "gloo"}
    training = json.loads((two_process_run / "bundle" / "manifest.json").read_text())["training"]
    assert training["world_size"] == 2 and training["backend"] == "gloo"
    assert len(ckpt["history"]) == 1 and "val_selection_auroc" in ckpt["history"][0]  # rank 0's validation


def test_resume_under_torchrun_continues_from_the_last_epoch(two_process_run: Path) -> None:
    args = [a if a != "1" or i == 0 or TINY[i - 1] != "--epochs" else "2" for i, a in enumerate(TINY)]
    res = _torchrun(2, *args, "--out", str(two_process_run), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from epoch 1" in res.stderr
    ckpt = torch.load(two_process_run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and [r["epoch"] for r in ckpt["history"]] == [1, 2]
    assert (two_process_run / "checkpoints" / "epoch_002.pt").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_that_disagree_stop_with_one_clear_line(tmp_path: Path) -> None:
    """Two ranks started by hand (as a multi-node launch could) with different seeds."""
    port = _free_port()
    procs = []
    for rank, seed in ((0, "0"), (1, "1")):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, "-m", "vaegan", "train", *TINY, "--out", str(tmp_path / "run"), "--seed", seed]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 2, err[-2000:]
        lines = [ln for ln in err.splitlines() if "error:" in ln]
        assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
        assert "disagree" in lines[0] and "train_config.seed" in lines[0], lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_global_batch_that_does_not_divide_is_refused(tmp_path: Path) -> None:
    args = [a if a != "16" else "15" for a in TINY]
    res = _torchrun(2, *args, "--out", str(tmp_path / "run"))
    assert res.returncode != 0
    assert "--batch-size 15 is the global batch and must divide evenly over the 2 training processes" in res.stderr
    # torchrun prints its own ChildFailedError traceback; none comes from the project's code
    frames = [ln for ln in res.stderr.splitlines() if 'File "' in ln]
    assert all("site-packages" in ln or "<frozen" in ln for ln in frames), frames


def test_conditional_two_processes_end_with_the_parameters_of_one(tmp_path: Path) -> None:
    """--conditional: the labels travel with their rows and the prior samples' labels are drawn
    for the global batch, so 2 processes still end where 1 does."""
    from tests.conditional_data import write_conditional_folder
    from vaegan.cli import main

    torch.set_num_threads(1)
    root = write_conditional_folder(tmp_path / "data")
    image_size = TINY.index("--image-size")  # the folder's own 28x28 instead
    args = ["--dataset", "folder", "--data-root", str(root), "--conditional",
            *TINY[2:image_size], *TINY[image_size + 2 :]]
    res = _torchrun(2, *args, "--out", str(tmp_path / "two"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    ckpt = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["model_config"]["num_classes"] == 3
    diff = _max_diff(_states(tmp_path / "one"), _states(tmp_path / "two"))
    assert diff < TOL, f"2 processes differ from 1 by {diff:.3g} (tolerance {TOL})"
