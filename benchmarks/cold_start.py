"""Cold start: seconds from launching the server process to health SERVING, against a minimal
gRPC + ONNX Runtime server for the same bundle, measured alternately in the same run.

    python benchmarks/cold_start.py --model runs/soak/mnist-0/bundle [--model OTHER] --repeats 10

For each bundle and repeat: ``python -m vaegan.service.server --model B --port 0 --ready-file F``
is started and the clock stops when the ready file appears (the server writes it once the bundle
is verified, the sessions are open and warmed up, and health is SERVING); then the process gets
SIGTERM. The baseline is the least a Python server can do for the same bundle: import grpc,
grpc_health and onnxruntime, open one session on the bundle's ``pipeline.onnx``, run it once,
start a gRPC server with health SERVING, write its ready file. Launches alternate (vaegan,
baseline, vaegan, ...) so that both see the same machine. Reports medians and their ratio,
prints a table and writes JSON (default ``benchmarks/results/cold_start.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BASELINE = r"""
import sys, json
from concurrent import futures
import grpc, numpy as np, onnxruntime as ort
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
bundle, ready = sys.argv[1], sys.argv[2]
spec = json.load(open(bundle + "/manifest.json"))["image"]
opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
sess = ort.InferenceSession(bundle + "/pipeline.onnx", opts, providers=["CPUExecutionProvider"])
x = np.zeros((1, spec["height"], spec["width"], spec["channels"]), np.uint8)
sess.run(None, {sess.get_inputs()[0].name: x})
server = grpc.server(futures.ThreadPoolExecutor(2))
h = health.HealthServicer(); h.set("", health_pb2.HealthCheckResponse.SERVING)
health_pb2_grpc.add_HealthServicer_to_server(h, server)
port = server.add_insecure_port("127.0.0.1:0"); server.start()
open(ready + ".tmp", "w").write(json.dumps({"port": port})); __import__("os").replace(ready + ".tmp", ready)
server.wait_for_termination()
"""


def launch(cmd: list[str], ready: Path, timeout: float = 120.0) -> float:
    """Seconds from launching ``cmd`` until ``ready`` exists; the process is then stopped."""
    ready.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode} before it was ready")
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"{cmd[:4]} not ready after {timeout:.0f} s")
            time.sleep(0.005)
        return time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(bundle: Path, repeats: int, tmp: Path) -> dict:
    ready = tmp / "ready.json"
    vaegan = [sys.executable, "-m", "vaegan.service.server", "--model", str(bundle), "--host", "127.0.0.1",
              "--port", "0", "--metrics-port", "-1", "--providers", "cpu", "--intra-op-threads", "1",
              "--ready-file", str(ready), "--log-level", "WARNING"]
    baseline = [sys.executable, "-c", BASELINE, str(bundle), str(ready)]
    launch(vaegan, ready)  # warm the page cache for both
    launch(baseline, ready)
    ours, base = [], []
    for _ in range(repeats):
        ours.append(launch(vaegan, ready))
        base.append(launch(baseline, ready))
    spec = json.loads((bundle / "manifest.json").read_text())["image"]
    return {
        "bundle": str(bundle), "image": [spec["height"], spec["width"], spec["channels"]],
        "vaegan_s": ours, "baseline_s": base,
        "vaegan_median_s": statistics.median(ours), "baseline_median_s": statistics.median(base),
        "ratio": statistics.median(ours) / statistics.median(base),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, action="append", required=True, help="bundle directory (repeatable)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--target", type=float, default=1.0, help="seconds to SERVING (median)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cold_start.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(m.resolve(), args.repeats, Path(tmp)) for m in args.model]
    print(f"{'bundle':<44}{'image':>12}{'vaegan s':>10}{'baseline s':>12}{'ratio':>8}{'target':>8}")
    for r in rows:
        image = "x".join(str(v) for v in r["image"])
        met = "met" if r["vaegan_median_s"] <= args.target else "NOT met"
        print(f"{Path(r['bundle']).parent.name:<44}{image:>12}{r['vaegan_median_s']:>10.2f}"
              f"{r['baseline_median_s']:>12.2f}{r['ratio']:>8.2f}{met:>8}")
    report = {
        "rows": rows, "repeats": args.repeats, "target_s": args.target,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
