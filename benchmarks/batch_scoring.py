"""Batch scoring throughput and memory: ``vaegan score`` against bare ONNX Runtime, in one run.

    python benchmarks/batch_scoring.py --mnist-root /data/mnist --mnist-model runs/mnist0/bundle

Data, written once into ``--work-dir`` (default ``runs/batch_bench``) and reused after:

  * 28x28 grey: the first 20,000 MNIST training images as PNGs, in sub-folders of 1,000
    (``data/mnist28/png/NN/NNNNN.png``); smaller inputs (2,000 for the memory comparison,
    4,000 with ``--quick``) are folders of hard links to the first files, same layout.
  * 64x64 RGB: 2,000 JPEGs (quality 90) of the built-in synthetic dataset (its ``train``
    split rendered at 64x64: textured surfaces; the ``test`` split has only 1,000 images).
    Without ``--rgb-model``, a small 64x64 RGB model is trained once on the same dataset with
    ``vaegan train --dataset synthetic --image-size 64 --epochs 1 --max-train 512`` into
    ``WORK/rgb64`` (a model that scores badly is fine: only its speed matters here).

Method, per setting (28x28 grey PNGs, 64x64 RGB JPEGs):

  * job: ``vaegan score DIR --model BUNDLE --out OUT.parquet --overwrite --no-progress
    --providers cpu`` as a subprocess (``--workers`` / ``--threads`` passed through when given).
    Images/s two ways: the subprocess's wall time (start-up, model load and the final table
    included) and the rate the job prints itself (from inputs to finished table). CPU time is
    that of the whole process tree, from ``getrusage(RUSAGE_CHILDREN)`` deltas; this process
    makes itself a child subreaper (``prctl``), so the forkserver that the job leaves behind is
    reaped here and the decode workers it reaped count too (without it their CPU time is lost).
  * bare: :meth:`Runtime.forward_images` (one ONNX Runtime call of the composed graph,
    normalization included; ``Runtime.load(bundle, providers="cpu")``) in this process, over the
    same images already decoded to uint8 at model size (decoded once, with the job's own
    :func:`~service.batch.decode.decode_chunk`), in batches of 64; CPU from
    ``getrusage(RUSAGE_SELF)``. No scoring, decoding or writing: the ceiling for the job.
  * each job run is bracketed by a bare run just before and just after it and compared with
    their mean (this machine's speed drifts over minutes); ``--repeats`` pairs (default 3); the
    reported ratio job/bare is the median over the repeats. Targets: >= 0.8 at 28x28 grey,
    >= 0.7 at 64x64 RGB.
  * memory: every job run's process tree (the job, its forkserver and decode workers, found by
    walking ``/proc/<pid>/task/<tid>/children``) is sampled every 50 ms; peak of the summed
    ``VmRSS`` (shared pages count once per process, so it overstates what the tree really
    holds) and the main process's own peak. The 28x28 job also runs ``--repeats`` times on the
    2,000-image input; target: the tree's peak on 20,000 images within 10% of that on 2,000
    (medians over the repeats).

``--quick``: 4,000 MNIST images instead of 20,000 and one repeat, for a fast check.
Prints a table, writes JSON (default ``benchmarks/results/batch_scoring.json``, ``..._quick.json``
with ``--quick``) and a plot next to it (same name, ``.png``).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vaegan.service.batch.decode import decode_chunk  # noqa: E402
from vaegan.service.runtime import Runtime  # noqa: E402
from vaegan.service.runtime.preprocess import ImageSpec  # noqa: E402

MNIST_IMAGES = 20_000
MNIST_QUICK = 4_000
MEMORY_SMALL = 2_000
RGB_IMAGES = 2_000
PER_FOLDER = 1_000
BATCH = 64
TARGETS = {"mnist28": 0.8, "rgb64": 0.7, "rss_within": 0.10}


# ---- data, written once -------------------------------------------------------------------------
def _names(n: int, ext: str) -> list[str]:
    return [f"{i // PER_FOLDER:02d}/{i:05d}.{ext}" for i in range(n)]


def _write_images(folder: Path, images: np.ndarray, ext: str, **save: Any) -> None:
    from PIL import Image

    for name, img in zip(_names(len(images), ext), images, strict=True):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(path, **save)


def _done(marker: Path, count: int) -> bool:
    return marker.exists() and json.loads(marker.read_text()).get("count") == count


def _prepare(work: Path, name: str, count: int, dataset: str, root: Path | None, spec: ImageSpec,
             ext: str, source: str, **save: Any) -> Path:
    """``count`` images of ``dataset``'s train split at ``spec``'s size, written once as
    ``WORK/data/<name>/<ext>/...`` (``save``: Pillow's format and options)."""
    folder = work / "data" / name
    marker = folder / "done.json"
    if not _done(marker, count):
        from vaegan.trainer.data import load_dataset

        print(f"writing {count:,} {dataset} images to {folder / ext} ...", flush=True)
        data = load_dataset(dataset, root, "train", spec, limit=count)
        assert data.images.shape == (count, spec.height, spec.width, spec.channels), data.images.shape
        _write_images(folder / ext, data.images, ext, **save)
        marker.write_text(json.dumps({"count": count, "source": source}) + "\n")
    return folder / ext


def prepare_mnist(work: Path, root: Path) -> Path:
    """20,000 MNIST training images as PNGs under ``WORK/data/mnist28/png`` (once)."""
    return _prepare(work, "mnist28", MNIST_IMAGES, "mnist", root, ImageSpec(1, 28, 28), "png",
                    f"mnist train, {root}", format="PNG")


def mnist_input(work: Path, full: Path, n: int) -> Path:
    """A folder with the first ``n`` MNIST PNGs (hard links to them, same layout)."""
    if n == MNIST_IMAGES:
        return full
    folder = work / "data" / f"mnist28_{n // 1000}k"
    marker = work / "data" / f"mnist28_{n // 1000}k.json"
    if not _done(marker, n):
        for name in _names(n, "png"):
            dst = folder / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.unlink(missing_ok=True)
            try:
                dst.hardlink_to(full / name)
            except OSError:
                dst.write_bytes((full / name).read_bytes())
        marker.write_text(json.dumps({"count": n}) + "\n")
    return folder


def prepare_rgb(work: Path) -> Path:
    """2,000 64x64 RGB JPEGs (quality 90) of the synthetic dataset under ``WORK/data/rgb64/jpg``."""
    return _prepare(work, "rgb64", RGB_IMAGES, "synthetic", None, ImageSpec(3, 64, 64), "jpg",
                    "synthetic train, seed 0", format="JPEG", quality=90)


def _vaegan() -> list[str]:
    script = Path(sys.executable).parent / "vaegan"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vaegan"]


def ensure_rgb_model(work: Path) -> Path:
    """A small 64x64 RGB bundle trained once into ``WORK/rgb64``."""
    run = work / "rgb64"
    bundle = run / "bundle"
    if not (bundle / "manifest.json").exists():
        print(f"training a small 64x64 RGB model into {run} ...", flush=True)
        cmd = [*_vaegan(), "train", "--dataset", "synthetic", "--image-size", "64", "--epochs", "1",
               "--max-train", "512", "--batch-size", "32", "--no-progress", "--out", str(run)]
        subprocess.run(cmd, cwd=REPO, env=_env(), check=True)
    return bundle


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


# ---- the job's process tree ---------------------------------------------------------------------
def _set_subreaper() -> bool:
    """Orphaned descendants (the job's forkserver) become our children, so that reaping them
    adds their CPU time, and that of the workers they reaped, to RUSAGE_CHILDREN. Linux only."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _reap_orphans(timeout: float = 10.0) -> int:
    """Wait for the descendants left to us (the job's forkserver); how many were reaped."""
    reaped, deadline = 0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.02)
        else:
            reaped += 1
    return reaped


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from ``/proc/<pid>/task/<tid>/children``."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return out


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0  # gone, or a zombie (no VmRSS line)


class TreeSampler:
    """Peak summed VmRSS of a process tree and of its root, sampled every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.peak_tree_kib = self.peak_main_kib = self.max_processes = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            pids = _tree(self.pid)
            rss = {p: _rss_kib(p) for p in pids}
            self.peak_tree_kib = max(self.peak_tree_kib, sum(rss.values()))
            self.peak_main_kib = max(self.peak_main_kib, rss.get(self.pid, 0))
            self.max_processes = max(self.max_processes, sum(1 for v in rss.values() if v))
            self.samples += 1
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


_LINE = re.compile(r"scored ([\d,]+), failed ([\d,]+).* in ([\d.]+) s \(([\d,.]+) images/s\)")


def run_job(inputs: list[Path], bundle: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One ``vaegan score`` run as a subprocess: wall time, its own rate, tree CPU and peak RSS."""
    cmd = [*_vaegan(), "score", *map(str, inputs), "--model", str(bundle), "--out", str(out),
           "--overwrite", "--no-progress", "--providers", "cpu", "--threads", str(args.threads)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as err:
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=err, text=True)
        sampler = TreeSampler(proc.pid)
        stdout, _ = proc.communicate()
        wall = time.perf_counter() - t0
        sampler.stop()
    orphans = _reap_orphans()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"vaegan score exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    lines = stdout.strip().splitlines()
    m = _LINE.search(lines[-1] if lines else "")
    if m is None:
        raise RuntimeError(f"cannot read the job's summary line from {stdout!r}")
    scored, failed = (int(g.replace(",", "")) for g in m.group(1, 2))
    n = scored + failed
    cpu = _cpu(ru1) - _cpu(ru0)
    return {
        "images": n, "failed": failed, "wall_s": wall, "images_per_s": n / wall,
        "job_seconds": float(m.group(3)), "job_images_per_s": float(m.group(4).replace(",", "")),
        "cpu_s": cpu, "cpu_ms_per_image": 1e3 * cpu / n,
        "peak_rss_tree_mib": sampler.peak_tree_kib / 1024, "peak_rss_main_mib": sampler.peak_main_kib / 1024,
        "max_processes": sampler.max_processes, "rss_samples": sampler.samples, "orphans_reaped": orphans,
        "summary_line": lines[-1],
    }


# ---- bare ONNX Runtime --------------------------------------------------------------------------
def decode_all(folder: Path, n: int, ext: str, spec: ImageSpec) -> np.ndarray:
    """The job's images, decoded once here as the job's workers decode them."""
    d = decode_chunk([str(folder / name) for name in _names(n, ext)], spec)
    if d.errors:
        raise RuntimeError(f"{len(d.errors)} images did not decode, e.g. {next(iter(d.errors.values()))}")
    return d.batch


def bare(rt: Runtime, images: np.ndarray) -> dict[str, Any]:
    rt.forward_images(images[:BATCH])  # warm-up
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for i in range(0, len(images), BATCH):
        rt.forward_images(images[i : i + BATCH])
    wall = time.perf_counter() - t0
    cpu = _cpu(resource.getrusage(resource.RUSAGE_SELF)) - _cpu(ru0)
    n = len(images)
    return {"images": n, "wall_s": wall, "images_per_s": n / wall, "cpu_s": cpu, "cpu_ms_per_image": 1e3 * cpu / n}


# ---- one setting --------------------------------------------------------------------------------
def measure(name: str, folder: Path, n: int, ext: str, bundle: Path, args: argparse.Namespace,
            with_bare: bool = True) -> dict[str, Any]:
    """``--repeats`` job runs on ``folder`` (the first ``n`` images), each bracketed by bare runs."""
    out = args.work_dir / "out" / f"{name}.parquet"
    rt = images = None
    if with_bare:
        rt = Runtime.load(bundle, providers="cpu", intra_op_threads=args.threads)
        images = decode_all(folder, n, ext, rt.spec)
    runs = []
    for r in range(args.repeats):
        before = bare(rt, images) if rt is not None else None
        job = run_job([folder], bundle, out, args)
        after = bare(rt, images) if rt is not None else None
        if job["images"] != n:
            raise RuntimeError(f"{name}: the job scored {job['images']} images, expected {n}")
        run: dict[str, Any] = {"job": job}
        if before is not None and after is not None:
            b = (before["images_per_s"] + after["images_per_s"]) / 2
            run.update(bare_before=before, bare_after=after, bare_images_per_s=b,
                       bare_cpu_ms_per_image=(before["cpu_ms_per_image"] + after["cpu_ms_per_image"]) / 2,
                       ratio=job["images_per_s"] / b, ratio_job_rate=job["job_images_per_s"] / b)
        runs.append(run)
        line = f"  {name} run {r + 1}/{args.repeats}: job {job['images_per_s']:.0f} img/s (wall), " \
               f"{job['job_images_per_s']:.0f} (own), peak RSS {job['peak_rss_tree_mib']:.0f} MiB"
        if "ratio" in run:
            line += f"; bare {run['bare_images_per_s']:.0f} img/s, ratio {run['ratio']:.2f}"
        print(line, flush=True)

    def med(key: str, where: str | None = None) -> float:
        return float(statistics.median((r[where] if where else r)[key] for r in runs))

    row: dict[str, Any] = {
        "setting": name, "images": n, "input": str(folder), "bundle": str(bundle), "runs": runs,
        "job_images_per_s": med("images_per_s", "job"), "job_own_images_per_s": med("job_images_per_s", "job"),
        "job_cpu_ms_per_image": med("cpu_ms_per_image", "job"),
        "peak_rss_tree_mib": med("peak_rss_tree_mib", "job"), "peak_rss_main_mib": med("peak_rss_main_mib", "job"),
        "peak_rss_tree_mib_max": max(r["job"]["peak_rss_tree_mib"] for r in runs),
    }
    if with_bare:
        row.update(bare_images_per_s=med("bare_images_per_s"), bare_cpu_ms_per_image=med("bare_cpu_ms_per_image"),
                   ratio=med("ratio"), ratio_job_rate=med("ratio_job_rate"))
    return row


# ---- report -------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'setting':<22}{'images':>8}{'job img/s':>11}{'(own)':>8}{'bare img/s':>12}{'ratio':>7}{'(own)':>7}"
            f"{'CPU ms/img job':>16}{'bare':>7}{'peak RSS MiB':>14}{'main':>7}")
    lines = [head, "-" * len(head)]

    def f(v: float | None, spec: str) -> str:
        return "" if v is None else format(v, spec)

    for r in rows:
        lines.append(
            f"{r['setting']:<22}{r['images']:>8,}{r['job_images_per_s']:>11.0f}{r['job_own_images_per_s']:>8.0f}"
            f"{f(r.get('bare_images_per_s'), '.0f'):>12}{f(r.get('ratio'), '.2f'):>7}{f(r.get('ratio_job_rate'), '.2f'):>7}"
            f"{r['job_cpu_ms_per_image']:>16.3f}{f(r.get('bare_cpu_ms_per_image'), '.3f'):>7}"
            f"{r['peak_rss_tree_mib']:>14.0f}{r['peak_rss_main_mib']:>7.0f}"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [r for r in rows if "ratio" in r]
    memory = [r for r in rows if r["setting"].startswith("mnist28")]
    fig, axes = plt.subplots(1, len(speed) + 1, figsize=(4 * (len(speed) + 1), 4))
    for a, r in zip(axes, speed, strict=False):  # one panel per setting: their scales differ
        values = [r["job_images_per_s"], r["job_own_images_per_s"], r["bare_images_per_s"]]
        a.bar([0, 1, 2], values, color=["C0", "C9", "C1"])
        for i, v in enumerate(values):
            a.text(i, v, f"{v:.0f}", ha="center", va="bottom")
        a.set_xticks([0, 1, 2], ["job (wall)", "job (own rate)", "bare ORT"])
        a.set_ylabel("images/s")
        a.set_title(f"{r['setting']}, {r['images']:,} images\nratio {r['ratio']:.2f} (own rate {r['ratio_job_rate']:.2f})")
    b = axes[-1]
    x = np.arange(len(memory))
    b.bar(x - 0.2, [r["peak_rss_tree_mib"] for r in memory], 0.4, label="process tree")
    b.bar(x + 0.2, [r["peak_rss_main_mib"] for r in memory], 0.4, label="main process")
    b.set_xticks(x, [f"{r['images']:,} images" for r in memory])
    b.set_ylabel("peak RSS (MiB)")
    b.set_title("28x28 grey job: peak RSS")
    b.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mnist-root", type=Path, required=True, help="folder with the MNIST idx files")
    p.add_argument("--mnist-model", type=Path, required=True, help="28x28 grey bundle directory")
    p.add_argument("--rgb-model", type=Path, help="64x64 RGB bundle (default: train a small one into the work dir)")
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "batch_bench",
                   help="images, the trained model and outputs; reused if already there")
    p.add_argument("--workers", type=int, help="vaegan score --workers (default: the job's, cores - 1)")
    p.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads, job and bare alike (default 0: ONNX Runtime's)")
    p.add_argument("--repeats", type=int, help="job runs per setting, each bracketed by bare runs (default 3)")
    p.add_argument("--quick", action="store_true", help=f"{MNIST_QUICK:,} MNIST images, one repeat")
    p.add_argument("--json", type=Path, help="where the JSON goes (default: benchmarks/results/batch_scoring.json, "
                                             "batch_scoring_quick.json with --quick); the plot goes next to it")
    args = p.parse_args(argv)
    args.json = args.json or REPO / "benchmarks" / "results" / f"batch_scoring{'_quick' if args.quick else ''}.json"
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.work_dir = args.work_dir.resolve()
    n_mnist = MNIST_QUICK if args.quick else MNIST_IMAGES

    subreaper = _set_subreaper()
    load_before = os.getloadavg()
    t0 = time.monotonic()
    full = prepare_mnist(args.work_dir, args.mnist_root)
    mnist_big, mnist_small = mnist_input(args.work_dir, full, n_mnist), mnist_input(args.work_dir, full, MEMORY_SMALL)
    rgb = prepare_rgb(args.work_dir)
    rgb_model = args.rgb_model or ensure_rgb_model(args.work_dir)

    rows = [
        measure("mnist28_grey_png", mnist_big, n_mnist, "png", args.mnist_model, args),
        measure("rgb64_jpeg", rgb, RGB_IMAGES, "jpg", rgb_model, args),
        measure("mnist28_grey_png_2k", mnist_small, MEMORY_SMALL, "png", args.mnist_model, args, with_bare=False),
    ]
    big, small = rows[0], rows[2]
    rss_ratio = big["peak_rss_tree_mib"] / small["peak_rss_tree_mib"]
    main_ratio = big["peak_rss_main_mib"] / small["peak_rss_main_mib"]

    print()
    print(table(rows))
    print(f"\nratio job/bare (wall; median of {args.repeats}): 28x28 grey {rows[0]['ratio']:.2f} "
          f"(target >= {TARGETS['mnist28']}), 64x64 RGB {rows[1]['ratio']:.2f} (target >= {TARGETS['rgb64']})")
    print(f"ratio with the job's own rate: 28x28 grey {rows[0]['ratio_job_rate']:.2f}, "
          f"64x64 RGB {rows[1]['ratio_job_rate']:.2f}")
    print(f"peak RSS {n_mnist:,} / {MEMORY_SMALL:,} images: tree {rss_ratio:.3f}, main process {main_ratio:.3f} "
          f"(target within {TARGETS['rss_within']:.0%})")
    if not subreaper:
        print("note: could not become a child subreaper: job CPU misses the decode workers")

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": _git_rev(),
        "machine": {
            "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": __import__("onnxruntime").__version__,
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rgb_model": str(rgb_model), "rgb_data": "synthetic train split at 64x64, JPEG quality 90",
        "cpu_accounting": "process tree (subreaper)" if subreaper else "job process and waited children only",
        "rows": rows,
        "ratios": {"mnist28": rows[0]["ratio"], "rgb64": rows[1]["ratio"],
                   "mnist28_job_rate": rows[0]["ratio_job_rate"], "rgb64_job_rate": rows[1]["ratio_job_rate"]},
        "peak_rss_ratio": {"tree": rss_ratio, "main": main_ratio, "images": [n_mnist, MEMORY_SMALL]},
        "targets": TARGETS,
        "seconds": time.monotonic() - t0,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    png = args.json.with_suffix(".png")
    plot(rows, png)
    print(f"wrote {args.json} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
