"""Training speed: images per second and per CPU-second of the training step and loop, with and
without each speed option, in one run.

    python benchmarks/training_speed.py                  # both shapes, 15 rounds of 4 steps
    python benchmarks/training_speed.py --rounds 25 --block 4 --loader-rounds 5

What is timed is :func:`trainer.step.train_step` as ``vaegan train`` runs it (batch 64, the
default ``erase,local`` shape negatives), on the built-in synthetic textures at two shapes: the
demo's (32x32 RGB, latent 128) and MNIST's (28x28 grey, latent 32). Validation and
checkpointing are not included. The machine is shared and noisy, so every row keeps its own
model and the rows take turns, a block of ``--block`` steps each, for ``--rounds`` rounds; the
median per-block rate is kept and compared with the first row's:

- ``before``: the training step of commit 50b71a9 (``git show``, imported as a module of its
  own; left out without git history), NCHW: shape negatives made one image at a time, and D's
  second pass run on [x, x_rec, x_prior] with a graph for all three;
- that step in channels-last memory format (oneDNN's convolutions run it faster on CPU too);
- this step (negatives made for the whole batch at once; the real images' features, a mere
  target, computed without a graph, so the backward passes reach D's input on the fakes only),
  NCHW and channels-last (the default);
- the default plus ``--autocast bf16`` (opt-in on CPU; fast where the CPU has native bf16,
  AVX512-BF16 or AMX).

Then the DataLoader settings, on the default step: whole epochs of ``--steps`` steps through a
DataLoader built per epoch (as ``vaegan train`` does) with ``num_workers`` 0, 1 and 2, in turn
for ``--loader-rounds`` rounds. Per CPU-second counts this process and the finished worker
processes, so a worker setting cannot hide its cost.

Prints a table and writes ``benchmarks/results/training_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vaegan.models import ModelConfig  # noqa: E402
from vaegan.trainer import step as step_module  # noqa: E402
from vaegan.trainer.config import TrainConfig  # noqa: E402
from vaegan.trainer.data import load_dataset  # noqa: E402
from vaegan.trainer.loop import _build, to_tensor  # noqa: E402
from vaegan.trainer.pipeline import image_spec_for  # noqa: E402

SHAPES = {  # name: (image size, channels, latent dim)
    "32x32 RGB (demo)": (32, 3, 128),
    "28x28 grey (MNIST)": (28, 1, 32),
}


# ---- the baseline: the training step of an earlier commit, loaded from git ------------------
BASELINE_COMMIT = "50b71a9"  # before this work: NCHW, per-image negatives, D on [x, x_rec, x_prior]


def baseline_step_module(commit: str = BASELINE_COMMIT) -> ModuleType | None:
    """``trainer/step.py`` as it was at ``commit`` (``git show``), imported as a module of its
    own; None where git or the commit is not available (a copy of the project without history)."""
    try:
        src = subprocess.run(["git", "show", f"{commit}:trainer/step.py"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = ModuleType(f"step_{commit}")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(src, f"{commit}:trainer/step.py", "exec"), mod.__dict__)  # noqa: S102 - the project's own file
    return mod


# ---- timing ---------------------------------------------------------------------------------
def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader's workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class _Trainer:
    """A model, its optimizers and its options, trained step by step on batches of ``x_train``."""

    def __init__(self, x_train: torch.Tensor, size: int, channels: int, latent: int, *, channels_last: bool,
                 step: ModuleType, bf16: bool = False) -> None:
        self.cfg = TrainConfig(batch_size=64, kl_weight=0.1 if channels == 3 else 1.0)
        torch.manual_seed(0)
        self.model, self.opt, self.losses = _build(
            ModelConfig(num_channels=channels, image_size=size, latent_dim=latent, base_width=32), self.cfg, torch.device("cpu"))
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.fmt)
        self.module = step
        self.autocast = torch.bfloat16 if bf16 else None
        self.x_train, self.i = x_train, 0

    def step(self, x: torch.Tensor) -> None:
        self.module.train_step(self.model, x.contiguous(memory_format=self.fmt), self.opt, self.losses,
                               d_negatives=self.cfg.negative_kinds, noise=self.module.StepNoise.seeded(self.i),
                               autocast_dtype=self.autocast)
        self.i += 1

    def steps(self, n: int) -> tuple[float, float]:
        """(seconds, CPU seconds) of ``n`` steps on the next batches of the training tensor."""
        b = self.cfg.batch_size
        batches = [self.x_train[(j % (len(self.x_train) // b)) * b:][:b] for j in range(self.i, self.i + n)]
        wall, cpu = time.perf_counter(), _cpu_seconds()
        for x in batches:
            self.step(x)
        return time.perf_counter() - wall, _cpu_seconds() - cpu

    def epoch(self, steps: int, workers: int) -> tuple[float, float]:
        """(seconds, CPU seconds) of one epoch of ``steps`` steps through a DataLoader built for
        it, as ``vaegan train`` builds one per epoch."""
        data = torch.utils.data.TensorDataset(self.x_train[: steps * self.cfg.batch_size])
        wall, cpu = time.perf_counter(), _cpu_seconds()
        loader = torch.utils.data.DataLoader(data, batch_size=self.cfg.batch_size, shuffle=True, drop_last=True,
                                             num_workers=workers)
        for (x,) in loader:
            self.step(x)
        del loader
        return time.perf_counter() - wall, _cpu_seconds() - cpu


def step_rows(baseline: ModuleType | None) -> dict[str, dict[str, Any]]:
    """name: options of the training step (the step module, channels-last, bf16)."""
    rows: dict[str, dict[str, Any]] = {}
    if baseline is not None:
        rows[f"before ({BASELINE_COMMIT}'s step, NCHW)"] = {"step": baseline, "channels_last": False}
        rows[f"{BASELINE_COMMIT}'s step, channels-last"] = {"step": baseline, "channels_last": True}
    rows["this step, NCHW (--no-channels-last)"] = {"step": step_module, "channels_last": False}
    rows["this step, channels-last (the default)"] = {"step": step_module, "channels_last": True}
    rows["the default + --autocast bf16 (opt-in)"] = {"step": step_module, "channels_last": True, "bf16": True}
    return rows


LOADER_ROWS = {"default, DataLoader in-process (the default)": 0, "default, 1 loader worker": 1, "default, 2 loader workers": 2}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="rounds of the step options, a block of steps each")
    ap.add_argument("--block", type=int, default=4, help="training steps (batches of 64) per block")
    ap.add_argument("--loader-rounds", type=int, default=3, help="rounds of whole epochs per DataLoader setting")
    ap.add_argument("--steps", type=int, default=30, help="training steps per epoch in the DataLoader rows")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "training_speed.json")
    a = ap.parse_args(argv)
    baseline = baseline_step_module()
    if baseline is None:
        print(f"no git history here: the {BASELINE_COMMIT} baseline rows are left out", file=sys.stderr)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for shape, (size, channels, latent) in SHAPES.items():
        spec = image_spec_for("synthetic", size, channels)
        x_train = to_tensor(load_dataset("synthetic", None, "train", spec, seed=0, limit=a.steps * 64).images, spec)
        n_img = 64 * a.block
        # the step options: one model each, a block of steps each in turn, many rounds (the median
        # of per-block rates, so all rows see the same machine)
        rows = step_rows(baseline)
        trainers = {name: _Trainer(x_train, size, channels, latent, **opts) for name, opts in rows.items()}
        for t in trainers.values():
            t.steps(2)  # warm-up
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in [*rows, *LOADER_ROWS]}
        for _ in range(a.rounds):
            for name, t in trainers.items():
                w, c = t.steps(a.block)
                runs[name].append((n_img / w, n_img / c))
        # the DataLoader settings: whole epochs (workers start with each epoch), on the default step
        default = trainers["this step, channels-last (the default)"]
        for _ in range(a.loader_rounds):
            for name, workers in LOADER_ROWS.items():
                w, c = default.epoch(a.steps, workers)
                runs[name].append((64 * a.steps / w, 64 * a.steps / c))
        base = float(np.median([c for _, c in runs[next(iter(rows))]]))
        results[shape] = {
            name: {"images_per_s": float(np.median([w for w, _ in v])), "images_per_cpu_s": float(np.median([c for _, c in v])),
                   "ratio_per_cpu_s": float(np.median([c for _, c in v])) / base, "samples": len(v)}
            for name, v in runs.items()
        }
        for name, v in results[shape].items():
            print(f"  [{shape}] {name}: {v['images_per_s']:.0f} img/s, {v['images_per_cpu_s']:.0f} per CPU-s", flush=True)
    print(f"\n{'shape':<20} {'row':<46} {'img/s':>7} {'img/CPU-s':>10} {'vs before':>10}")
    for shape, rows in results.items():
        for name, v in rows.items():
            print(f"{shape:<20} {name:<46} {v['images_per_s']:>7.0f} {v['images_per_cpu_s']:>10.0f} {v['ratio_per_cpu_s']:>9.2f}x")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"baseline_commit": BASELINE_COMMIT if baseline is not None else None, "threads": torch.get_num_threads(), "block": a.block, "rounds": a.rounds,
                                 "loader_rounds": a.loader_rounds, "steps": a.steps, "results": results}, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
