"""Settings that used to break a serving process while health said SERVING: refused at start in
one line (exit 2); SIGHUP never kills the server; an unwritable --ready-file exits instead of
hanging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vaegan.service.server.config import ServiceConfig

REPO = Path(__file__).resolve().parents[2]


def _serve(tiny_bundle: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "vaegan.service.server", "--model", str(tiny_bundle), "--host", "127.0.0.1",
            "--port", "0", "--metrics-port", "-1", "--providers", "cpu", *flags]


def _wait_ready(proc: subprocess.Popen, ready: Path) -> int:
    """The gRPC port once the server has written its ready file."""
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not get ready"
        time.sleep(0.05)
    return int(json.loads(ready.read_text())["port"])


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("port", 99999, "port must be in 0..65535"),  # was served on 99999 - 65536 = 34463
        ("metrics_port", 70000, "metrics_port must be in -1..65535"),
        ("max_delay_ms", float("nan"), "max_delay_ms must be a number"),  # every Score hung
        ("max_delay_ms", float("inf"), "max_delay_ms must be a number"),  # the batcher thread died
        ("grace_seconds", float("inf"), "grace_seconds must be a number"),
        ("switch_interval_ms", float("nan"), "switch_interval_ms must be a number"),
        ("ready_file", Path("/nonexistent-folder/ready.json"), "does not exist"),
    ],
)
def test_impossible_settings_are_refused_naming_the_field(field: str, value: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ServiceConfig(model=Path("m"), **{field: value})


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--port", "99999"], "port must be in 0..65535"),
        (["--max-delay-ms", "nan"], "max_delay_ms must be a number"),
        (["--max-delay-ms", "inf"], "max_delay_ms must be a number"),
        (["--ready-file", "/nonexistent-folder/ready.json"], "does not exist"),
    ],
)
def test_bad_settings_exit_2_in_one_line_before_loading(tiny_bundle: Path, flags: list[str], needle: str) -> None:
    out = subprocess.run(_serve(tiny_bundle, *flags), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in out.stderr, out.stderr


def test_a_ready_file_that_cannot_be_written_ends_the_process(tiny_bundle: Path) -> None:
    """/proc exists (so the settings pass) but no file can be created there: exit 2, not a
    process that runs on without ever saying it is ready."""
    out = subprocess.run(_serve(tiny_bundle, "--ready-file", "/proc/vaegan-ready.json"), cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "cannot write --ready-file /proc/vaegan-ready.json" in out.stderr


def test_sighup_is_ignored_and_sigterm_still_drains(tiny_bundle: Path, tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(_serve(tiny_bundle, "--ready-file", str(ready)), cwd=REPO, env=_env(),
                            stderr=subprocess.PIPE, text=True)
    try:
        port = _wait_ready(proc, ready)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None, "SIGHUP killed the server"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "SIGHUP: ignored" in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_request_of_many_huge_images_is_refused_within_its_pixel_budget(tiny_bundle: Path, tmp_path: Path) -> None:
    """32 small PNGs that each declare 4096x4096 RGB peaked at 2.5 GiB and took 38 s. Then the
    request stopped once its images added up to --max-request-pixels (64 Mpx), after decoding
    the first four (+308 MiB); now every header is read before anything is decoded, and the
    request is refused with nothing decoded."""
    import io

    import numpy as np
    from PIL import Image

    from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
    from vaegan.protos.vaegan.v1 import outlier_service_pb2_grpc as pb_grpc

    buf = io.BytesIO()
    Image.fromarray(np.full((4096, 4096, 3), 77, np.uint8)).save(buf, format="PNG")
    big = buf.getvalue()
    assert len(big) < 200_000  # small on the wire
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(_serve(tiny_bundle, "--ready-file", str(ready)), cwd=REPO, env=_env(),
                            stderr=subprocess.DEVNULL)
    try:
        port = _wait_ready(proc, ready)
        before = _hwm_mib(proc.pid)
        request = pb.ScoreRequest(images=[pb.Image(id=f"big{i}", encoded=big) for i in range(32)])
        t0 = time.monotonic()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, pytest.raises(grpc.RpcError) as err:
            pb_grpc.OutlierServiceStub(ch).Score(request, timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "image 4 (id 'big4')" in err.value.details() and "--max-request-pixels" in err.value.details()
        growth = _hwm_mib(proc.pid) - before
        assert growth < 120, f"peak RSS grew by {growth:.0f} MiB"
        assert time.monotonic() - t0 < 10
        # refused requests free what they decoded at once: gRPC kept the abort error, whose
        # chained traceback held the decoded images until the cycle collector ran (+190 MiB each)
        after_one = _rss_mib(proc.pid)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            for _ in range(5):
                with pytest.raises(grpc.RpcError):
                    pb_grpc.OutlierServiceStub(ch).Score(request, timeout=60)
        held = _rss_mib(proc.pid) - after_one
        assert held < 250, f"5 more refused requests left {held:.0f} MiB behind"
    finally:
        proc.kill()
        proc.wait()


def test_an_expired_call_stops_decoding_so_the_next_one_is_not_kept_waiting(tiny_bundle: Path) -> None:
    """A request of many large PNGs with a 0.5 s deadline kept the only decode thread busy until
    it had decoded them all; the next request waited behind it. Now the abandoned work stops at
    the next image, and the next request is answered in a fraction of the big one's time."""
    import io

    import numpy as np
    from PIL import Image

    from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
    from vaegan.protos.vaegan.v1 import outlier_service_pb2_grpc as pb_grpc
    from vaegan.service.runtime import Runtime
    from vaegan.service.server.testing import ServerThread

    # 2048 x 2048 smooth gradients: small on the wire (the call reaches the server at once),
    # slow to decode and resize
    yy, xx = np.mgrid[0:2048, 0:2048]
    buf = io.BytesIO()
    Image.fromarray(np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 2_000_000
    big = pb.ScoreRequest(images=[pb.Image(id=f"b{i}", encoded=buf.getvalue()) for i in range(60)])
    small_buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(small_buf, format="PNG")
    small = pb.ScoreRequest(images=[pb.Image(id="s", encoded=small_buf.getvalue())])
    cfg = ServiceConfig(model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1, decode_workers=1,
                        max_request_pixels=1 << 30, max_inflight_pixels=1 << 30, max_message_bytes=512 << 20)
    options = [("grpc.max_send_message_length", 512 << 20)]
    with ServerThread(cfg, Runtime.load(tiny_bundle, providers="cpu")) as srv, \
            grpc.insecure_channel(srv.target, options=options) as ch:
        stub = pb_grpc.OutlierServiceStub(ch)
        t0 = time.monotonic()
        stub.Score(big, timeout=300)  # how long the whole request takes here
        full = time.monotonic() - t0
        assert full > 2.0, f"the big request took only {full:.1f} s: too fast to tell"
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(big, timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        t0 = time.monotonic()
        assert stub.Score(small, timeout=60).results[0].id == "s"
        waited = time.monotonic() - t0
    assert waited < full / 3, f"the next request waited {waited:.1f} s (the big one takes {full:.1f} s)"
