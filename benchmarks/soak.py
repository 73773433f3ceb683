"""Soak: many clients for many minutes of mixed requests against a real server, RSS sampled.

    python benchmarks/soak.py --model runs/demo/bundle --clients 64 --minutes 10

Method: ``python -m vaegan.service.server`` in a subprocess (server defaults, ``--providers cpu``,
``--log-level WARNING``, its log kept aside and scanned for errors), driven from this process by
``--clients`` grpc.aio loops (one channel, i.e. one connection, per 8 clients) for ``--minutes``.
Each loop picks its next request at random from a fixed mix, all built once up front:

  single 40%     Score, 1 raw uint8 image at model size
  batch16 15%    Score, 16 raw images at model size
  png_odd 15%    Score, 4 PNGs of odd sizes (37x91, 300x200, 91x37, 128x77)
  maps 10%       Score, 2 PNGs with anomaly maps at input size (raw float32 maps)
  stream 10%     ScoreStream of 4 requests of 2 raw images
  inpaint 5%     Inpaint, 2 images of odd sizes with rectangular masks
  hostile 5%     1% each: garbage bytes as an image (INVALID_ARGUMENT), a GIF (INVALID_ARGUMENT:
                 not an accepted format), 8 solid-colour 4096x4096 PNGs (RESOURCE_EXHAUSTED:
                 over --max-request-pixels), unparsable protobuf bytes sent with a raw call
                 (INVALID_ARGUMENT), a 256-image batch with a 0.05 s deadline (DEADLINE_EXCEEDED)

Every call's status code is counted per kind; a code other than the one its kind is meant to
get (OK for the normal kinds) is an unexpected error, and so is an OK answer whose shape is
wrong. Latency is per call (p50/p99 per kind, and over the normal kinds together, per minute).
The server's VmRSS is sampled every second (with VmHWM, threads, open fds and CPU time). RSS
"after warm-up" is the median over a window after the first 10% of the run (at most a minute),
RSS "at the end" the median over the same length of window at the end: growth = end / after
warm-up - 1 (medians, because the over-budget requests make RSS jump for a moment).

After the soak: each kind is sent alone (3 times) with the server's peak RSS reset before it
(``/proc/PID/clear_refs``), which gives each request's peak RSS growth; then health must be
SERVING, a good Score must give the score it gave before the soak, and SIGTERM must end the
server with exit code 0.

Targets (README): 64 clients, 10 minutes: 0 unexpected errors, RSS growth < 5%.

Prints a table, writes ``benchmarks/results/soak.json`` and ``soak.png`` (RSS over time, and
p99 latency per minute).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import math
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb  # noqa: E402
from vaegan.protos.vaegan.v1 import outlier_service_pb2_grpc as pb_grpc  # noqa: E402
from vaegan.service.server.codec import array_to_tensor  # noqa: E402

SERVICE = "vaegan.v1.OutlierService"
MIB = 1024.0  # /proc reports kB
CLIENTS_PER_CHANNEL = 8
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.use_local_subchannel_pool", 1),  # a connection per channel, not one shared by all
]


# ---- the server -----------------------------------------------------------------------------
class Server:
    """``python -m vaegan.service.server`` in a subprocess; its stderr goes to a log file."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="vaegan-soak-")
        ready = Path(self.tmp.name) / "ready.json"
        self.log_path = Path(self.tmp.name) / "server.log"
        self.cmd = [
            sys.executable, "-m", "vaegan.service.server", "--model", str(args.model), "--host", "127.0.0.1",
            "--port", "0", "--metrics-port", "0", "--ready-file", str(ready),
            "--providers", args.providers, "--log-level", args.server_log_level,
            *args.server_args,
        ]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.update(kv.split("=", 1) for kv in args.server_env)
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 180
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the server did not start:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        ports = json.loads(ready.read_text())
        self.target = f"127.0.0.1:{ports['port']}"
        self.metrics_port = ports.get("metrics_port")

    def status(self) -> dict[str, int]:
        """VmRSS, VmHWM (kB), threads, open fds and CPU ticks of the server process."""
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
        out["fds"] = sum(1 for _ in Path(f"/proc/{self.pid}/fd").iterdir())
        stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        out["cpu_ticks"] = int(stat[11]) + int(stat[12])  # utime + stime
        return out

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM, then the exit code (None: still running after ``timeout`` s, killed)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        self.tmp.cleanup()


class Sampler(threading.Thread):
    """The server's /proc numbers every ``interval`` s, from a thread (the event loop is busy)."""

    def __init__(self, server: Server, interval: float = 1.0) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.server, self.interval = server, interval
        self.t0 = time.monotonic()
        self.samples: list[dict[str, float]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                s = self.server.status()
            except OSError:  # the process is gone
                return
            self.samples.append({"t": round(time.monotonic() - self.t0, 3), **s})
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


# ---- the request mix ------------------------------------------------------------------------
class BadResponse(Exception):
    """An OK answer that does not fit its request (wrong count or shape)."""


@dataclass
class Kind:
    name: str
    weight: float  # percent of calls
    expected: str  # the status code this kind is meant to get
    call: Callable[[Any], Awaitable[None]]  # (stubs of one channel) -> None; raises on failure
    normal: bool = True
    note: str = ""


@dataclass
class Stats:
    codes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, every call
    ends: list[float] = field(default_factory=list)  # when each call ended, s after the start
    samples: dict[str, str] = field(default_factory=dict)  # first message per unexpected code


@dataclass
class Stubs:
    channel: grpc.aio.Channel
    service: pb_grpc.OutlierServiceStub
    raw_score: Any  # Score with no serializers: bytes in, bytes out


def _png(arr: np.ndarray, **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **kw)
    return buf.getvalue()


def _model_images(rng: np.random.Generator, n: int, h: int, w: int, c: int) -> list[pb.Image]:
    x = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    return [pb.Image(id=f"raw{i}", tensor=array_to_tensor(a)) for i, a in enumerate(x)]


def _picture(rng: np.random.Generator, h: int, w: int, rgb: bool) -> np.ndarray:
    """A smooth picture with some noise (PNGs of pure noise are unlike anything served)."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 100 * np.sin(xx / max(w, 1) * 6.0) * np.cos(yy / max(h, 1) * 4.0)
    img = np.clip(base[..., None] + rng.normal(0, 12, (h, w, 3 if rgb else 1)), 0, 255).astype(np.uint8)
    return img if rgb else img[..., 0]


def check_score(resp: pb.ScoreResponse, n: int, sizes: list[tuple[int, int]] | None = None,
                maps: bool = False) -> None:
    if len(resp.results) != n:
        raise BadResponse(f"{len(resp.results)} results for {n} images")
    for i, r in enumerate(resp.results):
        if not math.isfinite(r.score):
            raise BadResponse(f"result {i}: score {r.score}")
        if sizes is not None and (r.input_height, r.input_width) != sizes[i]:
            raise BadResponse(f"result {i}: input size {(r.input_height, r.input_width)}, sent {sizes[i]}")
        if maps:
            shape = tuple(r.anomaly_map.tensor.shape)
            if sizes is not None and shape != sizes[i]:
                raise BadResponse(f"result {i}: anomaly map {shape}, input {sizes[i]}")


def build_mix(info: pb.ModelInfo, args: argparse.Namespace) -> tuple[list[Kind], dict[str, Any]]:
    """Every request message of the mix, built once, and the kinds that send them."""
    rng = np.random.default_rng(0)
    h, w, c = info.image.height, info.image.width, info.image.channels
    rgb = c == 3
    timeout = args.call_timeout

    single = pb.ScoreRequest(images=_model_images(rng, 1, h, w, c))
    batch16 = pb.ScoreRequest(images=_model_images(rng, 16, h, w, c))
    odd = [(37, 91), (300, 200), (91, 37), (128, 77)]
    png_odd = pb.ScoreRequest(images=[
        pb.Image(id=f"png{i}", encoded=_png(_picture(rng, hh, ww, rgb=i % 2 == 0)))
        for i, (hh, ww) in enumerate(odd)
    ])
    map_sizes = [(300, 200), (37, 91)]
    maps = pb.ScoreRequest(
        images=[pb.Image(id=f"map{i}", encoded=_png(_picture(rng, hh, ww, rgb))) for i, (hh, ww) in enumerate(map_sizes)],
        options=pb.ScoreOptions(return_anomaly_map=True, anomaly_map_input_size=True,
                                image_format=pb.IMAGE_FORMAT_RAW),
    )
    stream = [pb.ScoreRequest(images=_model_images(rng, 2, h, w, c)) for _ in range(4)]

    inpaint_sizes = [(48, 64), (91, 37)]
    pictures = [_picture(rng, hh, ww, rgb) for hh, ww in inpaint_sizes]
    masks = []
    for hh, ww in inpaint_sizes:
        m = np.zeros((hh, ww), np.uint8)
        m[hh // 4: hh // 2, ww // 3: 2 * ww // 3] = 255
        masks.append(m)
    inpaint = pb.InpaintRequest(
        images=[pb.Image(id="inp0", tensor=array_to_tensor(pictures[0])), pb.Image(id="inp1", encoded=_png(pictures[1]))],
        masks=[pb.Image(tensor=array_to_tensor(masks[0])), pb.Image(encoded=_png(masks[1]))],
        image_format=pb.IMAGE_FORMAT_RAW,
    )

    garbage = pb.ScoreRequest(images=[pb.Image(id="garbage", encoded=b"\x00not an image" + rng.bytes(2000))])
    gif_buf = io.BytesIO()
    Image.fromarray(_picture(rng, 32, 32, rgb=True)).save(gif_buf, format="GIF")
    gif = pb.ScoreRequest(images=[pb.Image(id="gif", encoded=gif_buf.getvalue())])
    big_png = _png(np.full((4096, 4096, 3), (200, 30, 60), np.uint8), compress_level=9)
    over_budget = pb.ScoreRequest(images=[pb.Image(id=f"huge{i}", encoded=big_png) for i in range(8)])
    # field 1 (images), length-delimited, declaring far more bytes than follow
    malformed = b"\x0a\xff\xff\xff\x0f" + rng.bytes(64)
    deadline = pb.ScoreRequest(images=_model_images(rng, args.deadline_batch, h, w, c))

    async def k_single(s: Stubs) -> None:
        check_score(await s.service.Score(single, timeout=timeout), 1)

    async def k_batch16(s: Stubs) -> None:
        check_score(await s.service.Score(batch16, timeout=timeout), 16)

    async def k_png_odd(s: Stubs) -> None:
        check_score(await s.service.Score(png_odd, timeout=timeout), 4, odd)

    async def k_maps(s: Stubs) -> None:
        check_score(await s.service.Score(maps, timeout=timeout), 2, map_sizes, maps=True)

    async def k_stream(s: Stubs) -> None:
        n = 0
        async for resp in s.service.ScoreStream(iter(stream), timeout=timeout):
            check_score(resp, 2)
            n += 1
        if n != len(stream):
            raise BadResponse(f"{n} stream responses for {len(stream)} requests")

    async def k_inpaint(s: Stubs) -> None:
        resp = await s.service.Inpaint(inpaint, timeout=timeout)
        if len(resp.results) != 2:
            raise BadResponse(f"{len(resp.results)} inpainted images for 2")
        for r, (hh, ww) in zip(resp.results, inpaint_sizes, strict=True):
            if tuple(r.image.tensor.shape[:2]) != (hh, ww):
                raise BadResponse(f"inpainted {list(r.image.tensor.shape)}, sent {hh}x{ww}")

    async def k_garbage(s: Stubs) -> None:
        await s.service.Score(garbage, timeout=timeout)

    async def k_gif(s: Stubs) -> None:
        await s.service.Score(gif, timeout=timeout)

    async def k_over_budget(s: Stubs) -> None:
        await s.service.Score(over_budget, timeout=timeout)

    async def k_malformed(s: Stubs) -> None:
        await s.raw_score(malformed, timeout=timeout)

    async def k_deadline(s: Stubs) -> None:
        await s.service.Score(deadline, timeout=0.05)

    kinds = [
        Kind("single", 40, "OK", k_single, note="1 raw image at model size"),
        Kind("batch16", 15, "OK", k_batch16, note="16 raw images"),
        Kind("png_odd", 15, "OK", k_png_odd, note="4 PNGs of odd sizes"),
        Kind("maps", 10, "OK", k_maps, note="2 PNGs, maps at input size"),
        Kind("stream", 10, "OK", k_stream, note="ScoreStream, 4 x 2 raw"),
        Kind("inpaint", 5, "OK", k_inpaint, note="2 images + masks"),
        Kind("garbage", 1, "INVALID_ARGUMENT", k_garbage, normal=False, note="garbage image bytes"),
        Kind("gif", 1, "INVALID_ARGUMENT", k_gif, normal=False, note="GIF, not accepted"),
        Kind("over_budget", 1, "RESOURCE_EXHAUSTED", k_over_budget, normal=False,
             note="8 PNGs of 4096x4096"),
        Kind("malformed", 1, "INVALID_ARGUMENT", k_malformed, normal=False, note="unparsable protobuf"),
        Kind("deadline", 1, "DEADLINE_EXCEEDED", k_deadline, normal=False,
             note=f"{args.deadline_batch} images, 0.05 s deadline"),
    ]
    sizes = {
        "single": single.ByteSize(), "batch16": batch16.ByteSize(), "png_odd": png_odd.ByteSize(),
        "maps": maps.ByteSize(), "stream": sum(r.ByteSize() for r in stream), "inpaint": inpaint.ByteSize(),
        "garbage": garbage.ByteSize(), "gif": gif.ByteSize(), "over_budget": over_budget.ByteSize(),
        "malformed": len(malformed), "deadline": deadline.ByteSize(),
    }
    return kinds, {"request_bytes": sizes, "single": single}


def make_stubs(target: str) -> Stubs:
    channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    raw = channel.unary_unary(f"/{SERVICE}/Score")  # no serializers: bytes as they are
    return Stubs(channel, pb_grpc.OutlierServiceStub(channel), raw)


async def run_call(kind: Kind, stubs: Stubs) -> tuple[str, str]:
    """(status code name, message) of one call of ``kind``."""
    try:
        await kind.call(stubs)
        return "OK", ""
    except grpc.aio.AioRpcError as e:
        return e.code().name, e.details() or ""
    except BadResponse as e:
        return "BAD_RESPONSE", str(e)


# ---- the soak -------------------------------------------------------------------------------
async def soak(server: Server, kinds: list[Kind], args: argparse.Namespace) -> dict[str, Any]:
    stats = {k.name: Stats() for k in kinds}
    n_channels = math.ceil(args.clients / CLIENTS_PER_CHANNEL)
    stubs = [make_stubs(server.target) for _ in range(n_channels)]
    for s in stubs:
        await asyncio.wait_for(s.channel.channel_ready(), 30)
    seconds = args.minutes * 60
    t0 = time.monotonic()
    end = t0 + seconds
    names, weights = [k.name for k in kinds], [k.weight for k in kinds]
    by_name = {k.name: k for k in kinds}

    async def client(i: int) -> None:
        rng = random.Random(1000 + i)
        s = stubs[i // CLIENTS_PER_CHANNEL]
        while time.monotonic() < end:
            kind = by_name[rng.choices(names, weights)[0]]
            t = time.perf_counter()
            code, message = await run_call(kind, s)
            dt = time.perf_counter() - t
            st = stats[kind.name]
            st.codes[code] += 1
            st.latencies.append(dt)
            st.ends.append(time.monotonic() - t0)
            if code != kind.expected and code not in st.samples:
                st.samples[code] = message[:300]

    tasks = [asyncio.ensure_future(client(i)) for i in range(args.clients)]
    progress_every = max(10.0, seconds / 20)
    next_report = t0 + progress_every
    while time.monotonic() < end:
        await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
        if time.monotonic() >= next_report:
            next_report += progress_every
            calls = sum(sum(s.codes.values()) for s in stats.values())
            bad = sum(n for k in kinds for c, n in stats[k.name].codes.items() if c != k.expected)
            rss = server.status()["VmRSS"] / MIB
            print(f"  {time.monotonic() - t0:6.0f} s  {calls:8d} calls  {bad:4d} unexpected  "
                  f"server RSS {rss:7.1f} MiB", flush=True)
    # every client finishes its current call; one that does not within the call timeout is a hang
    done, pending = await asyncio.wait(tasks, timeout=args.call_timeout + 15)
    for task in pending:
        task.cancel()
    elapsed = time.monotonic() - t0
    errors = [repr(t.exception()) for t in done if t.exception() is not None]
    for s in stubs:
        await s.channel.close()
    return {"stats": stats, "elapsed_s": elapsed, "hung_clients": len(pending), "client_exceptions": errors,
            "channels": n_channels}


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values) * 1e3, q)) if values else None


def summarize_kinds(kinds: list[Kind], stats: dict[str, Stats], elapsed: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in kinds:
        st = stats[k.name]
        calls = sum(st.codes.values())
        unexpected = {c: n for c, n in st.codes.items() if c != k.expected}
        out[k.name] = {
            "weight_pct": k.weight, "note": k.note, "normal": k.normal, "expected": k.expected,
            "calls": calls, "calls_per_s": calls / elapsed, "codes": dict(st.codes),
            "unexpected": unexpected, "unexpected_count": sum(unexpected.values()),
            "unexpected_messages": st.samples,
            "p50_ms": pct(st.latencies, 50), "p99_ms": pct(st.latencies, 99),
            "max_ms": pct(st.latencies, 100),
        }
    return out


def per_bin(kinds: list[Kind], stats: dict[str, Stats], seconds: float, bin_s: float) -> list[dict[str, Any]]:
    """p50/p99 of the normal kinds and calls/s in each ``bin_s`` of the run (calls that end
    after the run, the clients' last ones, count in the last bin)."""
    ends = np.concatenate([np.asarray(stats[k.name].ends) for k in kinds if k.normal] or [np.zeros(0)])
    lats = np.concatenate([np.asarray(stats[k.name].latencies) for k in kinds if k.normal] or [np.zeros(0)])
    rows = []
    n_bins = max(1, math.ceil(seconds / bin_s - 1e-9))
    index = np.minimum((ends // bin_s).astype(int), n_bins - 1)
    for b in range(n_bins):
        sel = index == b
        lat = lats[sel] * 1e3
        rows.append({
            "start_s": b * bin_s, "calls": int(sel.sum()), "calls_per_s": float(sel.sum()) / bin_s,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        })
    return rows


def memory_summary(samples: list[dict[str, float]], seconds: float) -> dict[str, Any]:
    warm_s = min(60.0, 0.1 * seconds)
    window = max(5.0, min(30.0, 0.05 * seconds))
    t = np.array([s["t"] for s in samples])
    rss = np.array([s["VmRSS"] for s in samples]) / MIB
    in_run = t <= seconds

    def median(sel: np.ndarray) -> float | None:
        return float(np.median(rss[sel])) if sel.any() else None

    after_warm = median((t >= warm_s) & (t < warm_s + window))
    end = median((t > seconds - window) & in_run)
    first = {k: samples[0][k] for k in ("Threads", "fds")} if samples else {}
    last = [s for s in samples if s["t"] <= seconds][-1] if samples else {}
    warm_sample = next((s for s in samples if s["t"] >= warm_s), None)
    minutes = []
    for m in range(max(1, math.ceil(seconds / 60 - 1e-9))):
        sel = (t >= m * 60) & (t < (m + 1) * 60) & in_run
        if sel.any():
            minutes.append({"minute": m, "min_mib": float(rss[sel].min()), "median_mib": float(np.median(rss[sel])),
                            "max_mib": float(rss[sel].max())})
    after = (t >= warm_s) & in_run
    slope = float(np.polyfit(t[after] / 60, rss[after], 1)[0]) if after.sum() >= 3 else None
    return {
        "warm_up_s": warm_s, "window_s": window,
        "rss_per_minute": minutes,
        "rss_slope_after_warmup_mib_per_min": slope,
        "rss_start_mib": float(rss[0]) if len(rss) else None,
        "rss_after_warmup_mib": after_warm,
        "rss_end_mib": end,
        "growth": None if not (after_warm and end) else end / after_warm - 1,
        "rss_after_warmup_sample_mib": None if warm_sample is None else warm_sample["VmRSS"] / MIB,
        "rss_last_sample_mib": last["VmRSS"] / MIB if last else None,
        "rss_min_after_warmup_mib": float(rss[(t >= warm_s) & in_run].min()) if ((t >= warm_s) & in_run).any() else None,
        "rss_max_mib": float(rss[in_run].max()) if in_run.any() else None,
        "hwm_end_mib": last["VmHWM"] / MIB if last else None,
        "threads_start_end": [first.get("Threads"), last.get("Threads")],
        "fds_start_end": [first.get("fds"), last.get("fds")],
        "server_cpu_s": (last["cpu_ticks"] - samples[0]["cpu_ticks"]) / os.sysconf("SC_CLK_TCK") if last else None,
    }


async def worst_case(server: Server, kinds: list[Kind], repeats: int) -> dict[str, Any]:
    """Each kind alone: the server's peak RSS growth over its RSS just before the call."""
    stubs = make_stubs(server.target)
    out: dict[str, Any] = {}
    try:
        for k in kinds:
            peaks, lats, codes = [], [], Counter()
            for _ in range(repeats):
                await asyncio.sleep(0.3)  # let the previous call's memory go
                reset = server.reset_peak()
                before = server.status()["VmRSS"]
                t = time.perf_counter()
                code, _ = await run_call(k, stubs)
                lats.append(time.perf_counter() - t)
                await asyncio.sleep(0.2)  # a call may end (deadline) before the server's work does
                codes[code] += 1
                if reset:
                    peaks.append((server.status()["VmHWM"] - before) / MIB)
            out[k.name] = {"peak_growth_mib": max(peaks) if peaks else None, "peak_growths_mib": peaks,
                           "latency_ms": [x * 1e3 for x in lats], "codes": dict(codes)}
    finally:
        await stubs.channel.close()
    return out


async def after_checks(server: Server, single: pb.ScoreRequest, score_before: float) -> dict[str, Any]:
    stubs = make_stubs(server.target)
    try:
        health = health_pb2_grpc.HealthStub(stubs.channel)
        statuses = {}
        for name in ("", SERVICE):
            r = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            statuses[name or "(server)"] = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        resp = await stubs.service.Score(single, timeout=30)
        score_after = resp.results[0].score
    finally:
        await stubs.channel.close()
    return {
        "health": statuses, "health_ok": all(v == "SERVING" for v in statuses.values()),
        "score_before": score_before, "score_after": score_after,
        "score_ok": abs(score_after - score_before) <= 1e-4 * max(1.0, abs(score_before)),
    }


async def model_info(target: str) -> pb.ModelInfo:
    stubs = make_stubs(target)
    try:
        return await stubs.service.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    finally:
        await stubs.channel.close()


async def score_once(target: str, request: pb.ScoreRequest) -> float:
    stubs = make_stubs(target)
    try:
        return (await stubs.service.Score(request, timeout=30)).results[0].score
    finally:
        await stubs.channel.close()


# ---- report ---------------------------------------------------------------------------------
def _mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _ms(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def table(summary: dict[str, Any], overall: dict[str, Any]) -> str:
    head = f"{'kind':<12}{'mix':>5}{'calls':>8}{'/s':>7}{'p50 ms':>9}{'p99 ms':>9}  {'expected':<19}{'unexp.':>7}  codes"
    lines = [head, "-" * len(head)]
    for name, r in summary.items():
        codes = ", ".join(f"{c} {n}" for c, n in sorted(r["codes"].items()))
        lines.append(
            f"{name:<12}{r['weight_pct']:>4g}%{r['calls']:>8d}{r['calls_per_s']:>7.1f}{_ms(r['p50_ms']):>9}"
            f"{_ms(r['p99_ms']):>9}  {r['expected']:<19}{r['unexpected_count']:>7d}  {codes}"
        )
    lines.append("-" * len(head))
    lines.append(
        f"{'normal':<12}{'':>5}{overall['calls']:>8d}{overall['calls_per_s']:>7.1f}{_ms(overall['p50_ms']):>9}"
        f"{_ms(overall['p99_ms']):>9}  {'':<19}{overall['unexpected']:>7d}"
    )
    return "\n".join(lines)


def plot(path: Path, samples: list[dict[str, float]], bins: list[dict[str, Any]], mem: dict[str, Any],
         bin_s: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6.5))
    t = np.array([s["t"] for s in samples]) / 60
    a.plot(t, [s["VmRSS"] / MIB for s in samples], lw=1, label="VmRSS")
    a.plot(t, [s["VmHWM"] / MIB for s in samples], lw=1, ls=":", label="VmHWM")
    a.axvline(mem["warm_up_s"] / 60, color="grey", ls="--", lw=0.8, label="end of warm-up")
    for key, style in (("rss_after_warmup_mib", "-."), ("rss_end_mib", "--")):
        if mem[key] is not None:
            a.axhline(mem[key], color="C2", ls=style, lw=0.8)
    a.set_ylabel("server RSS (MiB)")
    a.set_xlabel("minutes")
    growth = mem["growth"]
    a.set_title(f"{title}: RSS growth {growth * 100:+.1f}%" if growth is not None else title)
    a.legend(loc="lower right", fontsize=8)
    starts = [r["start_s"] / 60 + bin_s / 120 for r in bins]
    b.plot(starts, [r["p99_ms"] for r in bins], "o-", label="p99")
    b.plot(starts, [r["p50_ms"] for r in bins], "s-", label="p50")
    b.set_ylabel("latency, normal kinds (ms)")
    b.set_xlabel("minutes")
    b.set_title(f"latency per {bin_s / 60:g} min")
    b.set_ylim(bottom=0)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def git_head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=REPO / "runs" / "demo" / "bundle", help="bundle directory")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--minutes", type=float, default=10.0, help="may be fractional")
    p.add_argument("--providers", default="cpu", choices=["auto", "cpu", "cuda", "tensorrt"])
    p.add_argument("--call-timeout", type=float, default=60.0, help="deadline of every normal call (s)")
    p.add_argument("--deadline-batch", type=int, default=256, help="images in the 0.05 s deadline request")
    p.add_argument("--worst-case-repeats", type=int, default=3)
    p.add_argument("--exclude", action="append", default=[], metavar="KIND",
                   help="leave a kind out of the mix (diagnostics; repeatable)")
    p.add_argument("--server-log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--server-arg", dest="server_args", action="append", default=[],
                   help="extra server flag, e.g. --server-arg=--max-request-pixels=1000000 (repeatable)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the server, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "soak.json")
    p.add_argument("--plot", type=Path, default=None, help="default: --out with .png")
    args = p.parse_args(argv)
    if not (args.model / "manifest.json").is_file():
        p.error(f"no bundle at {args.model}: run `vaegan demo` first, or pass --model BUNDLE")
    if any("=" not in kv for kv in args.server_env):
        p.error("--server-env takes KEY=VALUE")
    if args.clients < 1 or args.minutes <= 0:
        p.error("--clients and --minutes must be positive")
    plot_path = args.plot or args.out.with_suffix(".png")
    seconds = args.minutes * 60

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    print(f"starting the server on {args.model} ...", flush=True)
    server = Server(args)
    try:
        info = asyncio.run(model_info(server.target))
        kinds, built = build_mix(info, args)
        unknown = set(args.exclude) - {k.name for k in kinds}
        if unknown:
            raise SystemExit(f"--exclude: no kind {', '.join(sorted(unknown))}")
        kinds = [k for k in kinds if k.name not in args.exclude]
        print("each kind alone on the fresh server (peak RSS) ...", flush=True)
        worst_fresh = asyncio.run(worst_case(server, kinds, args.worst_case_repeats))
        score_before = asyncio.run(score_once(server.target, built["single"]))
        print(f"{server.target} pid {server.pid}: {info.name} v{info.version} "
              f"{info.image.height}x{info.image.width}x{info.image.channels}, "
              f"{args.clients} clients for {args.minutes:g} min", flush=True)

        sampler = Sampler(server)
        sampler.start()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        run = asyncio.run(soak(server, kinds, args))
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(3)  # a few idle samples after the load stops
        sampler.stop()
        idle = server.status()
        load_after = os.getloadavg()

        print("each kind alone after the soak (peak RSS) ...", flush=True)
        worst = asyncio.run(worst_case(server, kinds, args.worst_case_repeats))
        checks = asyncio.run(after_checks(server, built["single"], score_before))
        exit_code = server.terminate(timeout=60)
        checks["exit_code"] = exit_code
        checks["exit_ok"] = exit_code == 0
        log = server.log_text()
    finally:
        server.close()

    stats, elapsed = run["stats"], run["elapsed_s"]
    summary = summarize_kinds(kinds, stats, elapsed)
    normal_lat = [x for k in kinds if k.normal for x in stats[k.name].latencies]
    overall = {
        "calls": sum(summary[k.name]["calls"] for k in kinds if k.normal),
        "calls_per_s": sum(summary[k.name]["calls"] for k in kinds if k.normal) / elapsed,
        "p50_ms": pct(normal_lat, 50), "p99_ms": pct(normal_lat, 99), "max_ms": pct(normal_lat, 100),
        "unexpected": sum(r["unexpected_count"] for r in summary.values()),
        "all_calls": sum(r["calls"] for r in summary.values()),
    }
    bin_s = 60.0 if seconds >= 300 else seconds / 10
    bins = per_bin(kinds, stats, seconds, bin_s)
    mem = memory_summary(sampler.samples, seconds)
    mem["rss_idle_after_mib"] = idle["VmRSS"] / MIB
    log_lines = log.splitlines()
    bad_lines = [ln for ln in log_lines if "ERROR" in ln or "Traceback" in ln or "CRITICAL" in ln]

    passed = {
        "no_unexpected_errors": overall["unexpected"] == 0 and run["hung_clients"] == 0 and not run["client_exceptions"],
        "rss_growth_below_5pct": mem["growth"] is not None and mem["growth"] < 0.05,
        "after_checks": checks["health_ok"] and checks["score_ok"] and checks["exit_ok"],
    }

    print()
    print(table(summary, overall))
    print(f"\n{overall['all_calls']} calls in {elapsed:.0f} s over {run['channels']} channels; "
          f"hung clients {run['hung_clients']}, client exceptions {len(run['client_exceptions'])}")
    for name, r in summary.items():
        for code, msg in r["unexpected_messages"].items():
            print(f"  unexpected {name} {code}: {msg}")
    print(f"server RSS (MiB): start {mem['rss_start_mib']:.1f}, after warm-up {mem['rss_after_warmup_mib']:.1f} "
          f"(median {mem['window_s']:.0f} s from {mem['warm_up_s']:.0f} s), end {mem['rss_end_mib']:.1f}, "
          f"max {mem['rss_max_mib']:.1f}, VmHWM {mem['hwm_end_mib']:.1f}, idle after {mem['rss_idle_after_mib']:.1f}")
    slope = mem["rss_slope_after_warmup_mib_per_min"]
    floors = ", ".join(f"{m['min_mib']:.0f}" for m in mem["rss_per_minute"])
    print(f"RSS floor per minute (MiB): {floors}; trend after warm-up {_mib(slope)} MiB/min")
    print(f"RSS growth {mem['growth'] * 100:+.2f}% (target < 5%); threads {mem['threads_start_end']}, "
          f"fds {mem['fds_start_end']}; server CPU {mem['server_cpu_s']:.0f} s, "
          f"client CPU {ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime:.0f} s")
    print("\neach kind alone: server peak RSS growth over its RSS before the call (MiB, max of "
          f"{args.worst_case_repeats}) and latency (ms), on the fresh server / after the soak")
    for name, r in worst_fresh.items():
        a = worst[name]
        peaks = [_mib(r["peak_growth_mib"]), _mib(a["peak_growth_mib"])]
        lat = ", ".join(f"{x:.0f}" for x in r["latency_ms"] + a["latency_ms"])
        codes = Counter(r["codes"]) + Counter(a["codes"])
        print(f"  {name:<12}{peaks[0]:>8}{peaks[1]:>8}   [{lat}]  {dict(codes)}")
    print(f"\nafter the soak: health {checks['health']}, score {checks['score_after']:.6f} "
          f"(before {checks['score_before']:.6f}) {'ok' if checks['score_ok'] else 'CHANGED'}, "
          f"SIGTERM exit code {checks['exit_code']}")
    print(f"server log: {len(log_lines)} lines, {len(bad_lines)} error lines")
    for ln in bad_lines[:5]:
        print(f"  {ln[:200]}")
    print(f"targets: {passed}")

    report = {
        "model": str(args.model),
        "bundle": {"name": info.name, "version": info.version,
                   "image": [info.image.height, info.image.width, info.image.channels]},
        "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "load_average_before": load_before, "load_average_after": load_after,
            "date": started.isoformat(timespec="seconds"), "git_head": git_head(),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "server_command": [str(c) for c in server.cmd],
        "request_bytes": built["request_bytes"],
        "elapsed_s": elapsed,
        "channels": run["channels"],
        "hung_clients": run["hung_clients"],
        "client_exceptions": run["client_exceptions"],
        "client_cpu_s": ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime,
        "kinds": summary,
        "overall_normal": overall,
        "latency_per_bin": {"bin_s": bin_s, "rows": bins},
        "memory": mem,
        "rss_samples": [[s["t"], s["VmRSS"], s["VmHWM"], s["Threads"], s["fds"], s["cpu_ticks"]]
                        for s in sampler.samples],
        "rss_samples_columns": ["t_s", "VmRSS_kB", "VmHWM_kB", "threads", "fds", "cpu_ticks"],
        "worst_case_alone_fresh": worst_fresh,
        "worst_case_alone_after": worst,
        "after": checks,
        "server_log": {"lines": len(log_lines), "error_lines": bad_lines[:50]},
        "targets": {"unexpected_errors": 0, "rss_growth_lt": 0.05},
        "passed": passed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(plot_path, sampler.samples, bins, mem, bin_s,
         f"soak: {args.clients} clients, {args.minutes:g} min, {info.name}")
    print(f"wrote {args.out} and {plot_path}")
    return 0 if all(passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
