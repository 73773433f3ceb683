"""Serving overhead: bare ONNX Runtime vs the gRPC service over loopback, in one run.

    python benchmarks/serving.py --model runs/demo/bundle

Baseline: :meth:`Runtime.forward_images` on uint8 batches at model size (what the server's
model worker runs), no server, measured just before and just after each service scenario; the
scenario's ratio uses the mean of those two (this machine's speed drifts over minutes).
Service: ``python -m vaegan.service.server`` in a subprocess, driven by a grpc.aio client in this
process with pre-built requests (raw uint8 tensors at model size), so the service's numbers
include gRPC, decoding, preprocessing, batching, scoring and response building.

  (a) requests of ``--request-size`` images (default 64 = max batch), a few in flight;
      compared with bare ONNX Runtime at that batch size. Target: ratio >= 0.85.
  (b) many concurrent single-image requests (16-64 in flight) that only the dynamic batcher
      can make efficient; compared with bare ONNX Runtime at a batch of the in-flight count
      (the best the batcher could do). Target: ratio >= 0.5.
  (c) a no-op RPC (GetModelInfo), 64 in flight: calls/s of the gRPC stack alone, the ceiling
      for (b) whatever the model.

Prints a table and writes JSON (default ``benchmarks/results/serving.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb  # noqa: E402
from vaegan.protos.vaegan.v1 import outlier_service_pb2_grpc as pb_grpc  # noqa: E402
from vaegan.service.runtime import Runtime  # noqa: E402
from vaegan.service.server.codec import array_to_tensor  # noqa: E402
from vaegan.service.server.config import ServiceConfig  # noqa: E402


def percentiles(latencies: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies) * 1e3
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)}


# ---- bare ONNX Runtime ----------------------------------------------------------------------
def bare(rt: Runtime, batch_size: int, seconds: float) -> dict[str, Any]:
    s = rt.spec
    x = np.random.default_rng(0).integers(0, 256, (batch_size, s.height, s.width, s.channels), dtype=np.uint8)
    for _ in range(3):
        rt.forward_images(x)
    latencies = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        rt.forward_images(x)
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    return {"batch_size": batch_size, "images_per_s": len(latencies) * batch_size / elapsed, **percentiles(latencies)}


def _mean_rows(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Bare measurements of one batch size -> their mean (images/s and percentiles)."""
    out = {k: float(np.mean([r[k] for r in runs])) if isinstance(v, float) else v for k, v in runs[0].items()}
    out["images_per_s_runs"] = [r["images_per_s"] for r in runs]
    return out


# ---- the service ----------------------------------------------------------------------------
class Server:
    """``python -m vaegan.service.server`` in a subprocess, until closed."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        ready = Path(self.tmp.name) / "ready.json"
        cmd = [
            sys.executable, "-m", "vaegan.service.server", "--model", str(args.model), "--host", "127.0.0.1",
            "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--ready-file", str(ready),
            "--providers", args.providers, "--intra-op-threads", str(args.intra_op_threads),
            "--max-batch-size", str(args.max_batch_size), "--max-delay-ms", str(args.max_delay_ms),
            "--fuse-graphs", str(args.fuse_graphs).lower(), "--log-level", "WARNING", "--http-port", "0",
        ]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env)
        deadline = time.monotonic() + 120
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        ports = json.loads(ready.read_text())
        self.target = f"127.0.0.1:{ports['port']}"
        self.http = f"http://127.0.0.1:{ports['http_port']}"
        self.metrics_url = f"http://127.0.0.1:{ports['metrics_port']}/metrics"

    def batch_stats(self) -> tuple[float, float]:
        """(merged runs, images in them) so far, from the server's batch-size histogram."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as resp:
            text = resp.read().decode()
        values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        return values.get("vaegan_batch_size_count", 0.0), values.get("vaegan_batch_size_sum", 0.0)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.tmp.cleanup()


async def _keep_busy(call: Callable[[], Awaitable[Any]], in_flight: int, seconds: float, n_images: int) -> dict[str, Any]:
    """Keep ``in_flight`` copies of ``call`` going for ``seconds`` after a short warm-up;
    throughput and latency percentiles of the measured part."""
    latencies: list[float] = []
    state = {"measuring": False, "stop": False}

    async def worker() -> None:
        while not state["stop"]:
            t = time.perf_counter()
            await call()
            if state["measuring"]:
                latencies.append(time.perf_counter() - t)

    workers = [asyncio.ensure_future(worker()) for _ in range(in_flight)]
    await asyncio.sleep(min(1.0, seconds / 3))  # warm-up
    state["measuring"] = True
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    state["stop"] = True
    elapsed = time.perf_counter() - t0
    await asyncio.gather(*workers)
    return {"in_flight": in_flight, "request_images": n_images,
            "images_per_s": len(latencies) * n_images / elapsed, **percentiles(latencies)}


async def drive(
    target: str, request: Any, in_flight: int, seconds: float, method: str = "Score", n_images: int | None = None
) -> dict[str, Any]:
    """Keep ``in_flight`` calls going for ``seconds`` (after a short warm-up). ``method``:
    a vaegan.v1 method, or ``ModelInfer`` (the Open Inference Protocol)."""
    import grpc

    from vaegan.protos.inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc

    if n_images is None:
        n_images = len(getattr(request, "images", [None]))
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub: Any = oip_grpc.GRPCInferenceServiceStub(channel) if method == "ModelInfer" else pb_grpc.OutlierServiceStub(channel)
        call = getattr(stub, method)
        return await _keep_busy(lambda: call(request, timeout=60), in_flight, seconds, n_images)


async def drive_http(url: str, body: bytes, headers: dict[str, str], n_images: int, in_flight: int,
                     seconds: float) -> dict[str, Any]:
    """:func:`drive` for OIP over HTTP/REST (aiohttp client, one connection per call in flight)."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as session:

        async def post() -> None:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")

        return await _keep_busy(post, in_flight, seconds, n_images)


def make_http_request(rt: Runtime, n: int) -> tuple[bytes, dict[str, str]]:
    """The same images as :func:`make_request`, as an OIP HTTP infer body with binary data."""
    s = rt.spec
    imgs = np.random.default_rng(1).integers(0, 256, (n, s.height, s.width, s.channels), dtype=np.uint8)
    raw = imgs.tobytes()
    head = json.dumps({
        "inputs": [{"name": "IMAGES", "datatype": "UINT8", "shape": list(imgs.shape),
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": n_, "parameters": {"binary_data": True}} for n_ in ("SCORE", "IS_OUTLIER")],
    }).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def make_request(rt: Runtime, n: int) -> pb.ScoreRequest:
    s = rt.spec
    imgs = np.random.default_rng(1).integers(0, 256, (n, s.height, s.width, s.channels), dtype=np.uint8)
    return pb.ScoreRequest(images=[pb.Image(id=str(i), tensor=array_to_tensor(a)) for i, a in enumerate(imgs)])


def make_oip_request(rt: Runtime, n: int) -> Any:
    """The same images as :func:`make_request`, as an OIP ModelInferRequest with raw contents
    (what tritonclient sends)."""
    from vaegan.protos.inference.v2 import grpc_predict_v2_pb2 as oip

    s = rt.spec
    imgs = np.random.default_rng(1).integers(0, 256, (n, s.height, s.width, s.channels), dtype=np.uint8)
    tensor = oip.ModelInferRequest.InferInputTensor(name="IMAGES", datatype="UINT8", shape=list(imgs.shape))
    return oip.ModelInferRequest(model_name=rt.bundle.name, inputs=[tensor], raw_input_contents=[imgs.tobytes()])


def service_run(server: Server, request: Any, in_flight: int, seconds: float, method: str = "Score") -> dict[str, Any]:
    runs0, images0 = server.batch_stats()
    n_images = len(request.images) if method == "Score" else int(request.inputs[0].shape[0])
    result = asyncio.run(drive(server.target, request, in_flight, seconds, method, n_images))
    runs1, images1 = server.batch_stats()
    result["mean_merged_batch"] = (images1 - images0) / max(1.0, runs1 - runs0)
    return result


# ---- report ---------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'scenario':<34}{'images/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'batch':>7}{'ratio':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
        batch = r.get("mean_merged_batch", r.get("batch_size"))
        batch_text = "" if batch is None else f"{batch:.1f}"
        lines.append(
            f"{r['name']:<34}{r['images_per_s']:>10.0f}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}"
            f"{r['p99_ms']:>9.2f}{batch_text:>7}{ratio:>7}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="bundle directory")
    p.add_argument("--providers", default="cpu", choices=["auto", "cpu", "cuda", "tensorrt"])
    p.add_argument("--intra-op-threads", type=int, default=0,
                   help="ONNX Runtime threads, the same for bare and service; 0 = the server's default (cores - 1)")
    p.add_argument("--fuse-graphs", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                   help="E -> G -> D as one composed graph, for bare and service alike (true/false)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-delay-ms", type=float, default=2.0)
    p.add_argument("--request-size", type=int, default=64, help="images per request in (a)")
    p.add_argument("--a-in-flight", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--b-in-flight", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--seconds", type=float, default=5.0, help="measured time per scenario")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serving.json")
    args = p.parse_args(argv)
    args.intra_op_threads = ServiceConfig(model=args.model, intra_op_threads=args.intra_op_threads).ort_threads

    rt = Runtime.load(args.model, providers=args.providers, intra_op_threads=args.intra_op_threads,
                      max_batch_size=args.max_batch_size, fuse=args.fuse_graphs)
    # every service scenario is bracketed by bare runs of its batch size, just before and just
    # after it, and compared with their mean: this machine's speed drifts by tens of percent
    # over minutes, and the ratio should compare like with like
    bare_runs: dict[int, list[dict[str, Any]]] = {}

    def bracketed(n: int, scenario: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        before = bare(rt, n, args.seconds / 2)
        r = scenario()
        after = bare(rt, n, args.seconds / 2)
        bare_runs.setdefault(n, []).extend([before, after])
        r["bare_images_per_s"] = (before["images_per_s"] + after["images_per_s"]) / 2
        r["ratio"] = r["images_per_s"] / r["bare_images_per_s"]
        return r

    server = Server(args)
    try:
        req_a, req_b = make_request(rt, args.request_size), make_request(rt, 1)
        rows: list[dict[str, Any]] = []
        for c in args.a_in_flight:
            r = bracketed(args.request_size, lambda c=c: service_run(server, req_a, c, args.seconds))
            rows.append({"name": f"(a) {args.request_size}-image req, {c} in flight", "scenario": "a", **r})
        for c in args.b_in_flight:
            # compared with bare ORT at a batch of the in-flight count: the best the batcher could do
            n = min(c, args.max_batch_size)
            r = bracketed(n, lambda c=c: service_run(server, req_b, c, args.seconds))
            rows.append({"name": f"(b) 1-image req, {c} in flight", "scenario": "b", **r})
        # the Open Inference Protocol on the same server, against vaegan.v1 at the same setting
        oip_a, oip_b = make_oip_request(rt, args.request_size), make_oip_request(rt, 1)
        for scen, req, v1_req, c in (("d", oip_a, req_a, 2), ("e", oip_b, req_b, 64)):
            n = args.request_size if scen == "d" else min(c, args.max_batch_size)
            v1 = bracketed(n, lambda req=v1_req, c=c: service_run(server, req, c, args.seconds))
            r = bracketed(n, lambda req=req, c=c: service_run(server, req, c, args.seconds, "ModelInfer"))
            size = f"{args.request_size}-image" if scen == "d" else "1-image"
            rows.append({"name": f"({scen}) vaegan.v1 {size}, {c} in flight", "scenario": f"{scen}-v1", **v1})
            rows.append({"name": f"({scen}) OIP {size}, {c} in flight", "scenario": scen,
                         "oip_vs_v1": r["ratio"] / v1["ratio"], **r})
            body, headers = make_http_request(rt, args.request_size if scen == "d" else 1)
            url = f"{server.http}/v2/models/{rt.bundle.name}/infer"
            n_img = args.request_size if scen == "d" else 1
            h = bracketed(n, lambda url=url, body=body, headers=headers, c=c, n_img=n_img: asyncio.run(
                drive_http(url, body, headers, n_img, c, args.seconds)))
            rows.append({"name": f"({scen}) OIP HTTP {size}, {c} in flight", "scenario": f"{scen}-http",
                         "http_vs_v1": h["ratio"] / v1["ratio"], **h})
        # the ceiling: a no-op RPC (GetModelInfo) as fast as this machine's gRPC stack goes
        r = asyncio.run(drive(server.target, pb.GetModelInfoRequest(), 64, args.seconds, "GetModelInfo"))
        rows.append({"name": "(c) no-op RPC, 64 in flight", "scenario": "c", **r})
    finally:
        server.close()
    bare_runs.setdefault(1, []).append(bare(rt, 1, args.seconds / 2))
    bare_rows = [{"name": f"bare ORT batch {n}", **_mean_rows(runs)} for n, runs in sorted(bare_runs.items())]
    rows = bare_rows + rows

    best = {s: max(r["ratio"] for r in rows if r.get("scenario") == s) for s in ("a", "b")}
    print(table(rows))
    print(f"\nbest ratio (a) {best['a']:.2f} (target >= 0.85), (b) {best['b']:.2f} (target >= 0.5)")
    print("(c) is calls/s of an RPC that does no model work: the ceiling for (b) on this machine")
    oip_rows = [r for r in rows if "oip_vs_v1" in r]
    for r in oip_rows:
        print(f"{r['name']}: OIP / vaegan.v1 = {r['oip_vs_v1']:.2f} (target >= 0.90)")
    http_rows = [r for r in rows if "http_vs_v1" in r]
    for r in http_rows:
        print(f"{r['name']}: OIP HTTP / vaegan.v1 gRPC = {r['http_vs_v1']:.2f}")
    report = {
        "model": str(args.model),
        "bundle": {"name": rt.bundle.name, "version": rt.bundle.version, "image": rt.spec.to_dict()},
        "provider": rt.provider,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
        "best_ratio": best,
        "oip_vs_v1": {r["name"]: r["oip_vs_v1"] for r in oip_rows},
        "http_vs_v1": {r["name"]: r["http_vs_v1"] for r in http_rows},
        "targets": {"a": 0.85, "b": 0.5, "oip_vs_v1": 0.9},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
