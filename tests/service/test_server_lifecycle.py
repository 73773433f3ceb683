"""Health transitions, graceful shutdown (in process and by SIGTERM), bad bundles, config."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
from vaegan.protos.vaegan.v1 import outlier_service_pb2_grpc as pb_grpc
from vaegan.service.runtime import Runtime
from vaegan.service.server.codec import array_to_tensor
from vaegan.service.server.config import ServiceConfig, add_serve_arguments, config_from_args
from vaegan.service.server.main import set_switch_interval
from vaegan.service.server.testing import ServerThread

REPO = Path(__file__).resolve().parents[2]
SERVICE = "vaegan.v1.OutlierService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ONE_IMAGE = pb.ScoreRequest(images=[pb.Image(id="one", tensor=array_to_tensor(np.zeros((32, 32, 3), np.uint8)))])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _statuses(channel: grpc.Channel) -> list[int]:
    health = health_pb2_grpc.HealthStub(channel)
    return [health.Check(health_pb2.HealthCheckRequest(service=s)).status for s in ("", SERVICE)]


def test_not_serving_until_loaded_then_serving(tiny_bundle: Path) -> None:
    cfg = ServiceConfig(model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1)
    with ServerThread(cfg, load=False) as srv, grpc.insecure_channel(srv.target) as ch:
        assert _statuses(ch) == [NOT_SERVING, NOT_SERVING]
        srv.load()
        assert _statuses(ch) == [SERVING, SERVING]
        assert pb_grpc.OutlierServiceStub(ch).Score(ONE_IMAGE).results[0].id == "one"


def test_shutdown_reports_not_serving_and_finishes_in_flight_calls(tiny_bundle: Path) -> None:
    # a 2 s batching delay keeps the request in flight until shutdown drains the batcher
    cfg = ServiceConfig(model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1, max_delay_ms=2000.0)
    srv = ServerThread(cfg, Runtime.load(tiny_bundle, providers="cpu")).start()
    with grpc.insecure_channel(srv.target) as ch:
        seen: list[int] = []
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=SERVICE))

        def follow() -> None:
            try:
                for resp in watch:
                    seen.append(resp.status)
            except grpc.RpcError:
                pass

        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        in_flight = pb_grpc.OutlierServiceStub(ch).Score.future(ONE_IMAGE, timeout=30)
        time.sleep(0.3)
        assert not in_flight.done()
        t0 = time.perf_counter()
        srv.stop(grace=1.0)
        assert in_flight.result().results[0].id == "one"
        assert time.perf_counter() - t0 < 5
        watcher.join(timeout=5)
        assert seen[0] == SERVING and NOT_SERVING in seen


def test_sigterm_drains_the_in_flight_request_and_exits_0(tiny_bundle: Path, tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    cmd = [
        sys.executable, "-m", "vaegan.service.server", "--model", str(tiny_bundle), "--host", "127.0.0.1",
        "--port", "0", "--metrics-port", "-1", "--max-delay-ms", "1500", "--grace-seconds", "10",
        "--ready-file", str(ready), "--providers", "cpu",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.05)
        port = json.loads(ready.read_text())["port"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            future = pb_grpc.OutlierServiceStub(ch).Score.future(ONE_IMAGE, timeout=30)
            time.sleep(0.3)  # the request now waits in the batcher
            assert not future.done()
            proc.send_signal(signal.SIGTERM)
            assert future.result().results[0].id == "one"
        assert proc.wait(timeout=30) == 0
        log = proc.stderr.read() if proc.stderr else ""
        assert "shutting down" in log and "stopped" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_bundle_exits_2_with_one_clear_line(tiny_bundle: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    with (broken / "encoder.onnx").open("r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    for model, expected in ((tmp_path / "missing", "no such bundle directory"), (broken, "encoder.onnx: sha256 mismatch")):
        cmd = [sys.executable, "-m", "vaegan.service.server", "--model", str(model), "--port", "0", "--metrics-port", "-1"]
        out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and expected in errors[0], out.stderr


def test_flags_take_defaults_from_the_environment() -> None:
    env = {"VAEGAN_MODEL": "/models/x", "VAEGAN_MAX_BATCH_SIZE": "16", "VAEGAN_PROVIDERS": "cpu"}
    parser = add_serve_arguments(argparse.ArgumentParser(), environ=env)
    cfg = config_from_args(parser.parse_args(["--max-delay-ms", "7.5"]))
    assert cfg.model == Path("/models/x") and cfg.max_batch_size == 16 and cfg.providers == "cpu"
    assert cfg.max_delay_ms == 7.5 and cfg.max_message_bytes == 64 << 20
    assert config_from_args(parser.parse_args(["--max-batch-size", "4"])).max_batch_size == 4


def test_bad_environment_values_are_reported_by_argparse(capsys) -> None:
    parser = add_serve_arguments(argparse.ArgumentParser(), environ={"VAEGAN_PORT": "http"})
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--model", "m"])
    assert info.value.code == 2
    assert "--port" in capsys.readouterr().err
    # neither --model nor --model-repository (nor their VAEGAN_* variables): one clear error
    args = add_serve_arguments(argparse.ArgumentParser(), environ={}).parse_args([])
    with pytest.raises(ValueError, match="either model .* or model_repository"):
        config_from_args(args)


def test_switch_interval_flag_sets_the_processs_gil_switch_interval() -> None:
    before = sys.getswitchinterval()
    try:
        parser = add_serve_arguments(argparse.ArgumentParser(), environ={"VAEGAN_SWITCH_INTERVAL_MS": "0.5"})
        set_switch_interval(config_from_args(parser.parse_args(["--model", "m"])))
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        set_switch_interval(config_from_args(parser.parse_args(["--model", "m", "--switch-interval-ms", "0"])))
        assert sys.getswitchinterval() == pytest.approx(0.0005)  # 0: left as it is
        assert ServiceConfig(model=Path("m")).switch_interval_ms == 0.2
    finally:
        sys.setswitchinterval(before)
    with pytest.raises(ValueError, match="switch_interval_ms"):
        ServiceConfig(model=Path("m"), switch_interval_ms=-1)


def test_config_rejects_impossible_settings() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        ServiceConfig(model=Path("m"), max_batch_size=0)
    with pytest.raises(ValueError, match="tls"):
        ServiceConfig(model=Path("m"), tls_cert_file=Path("c.pem"))


def test_concurrency_and_message_size_limits(tiny_bundle: Path) -> None:
    rt = Runtime.load(tiny_bundle, providers="cpu")
    cfg = ServiceConfig(
        model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1, max_delay_ms=500.0,
        max_concurrent_rpcs=1, max_message_bytes=1 << 20,
    )
    with ServerThread(cfg, rt) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.OutlierServiceStub(ch)
        first = stub.Score.future(ONE_IMAGE, timeout=30)  # held 0.5 s by the batcher
        time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as info:
            stub.Score(ONE_IMAGE, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert first.result().results[0].id == "one"
        big = np.zeros((1024, 1024, 3), np.uint8)  # 3 MiB > 1 MiB
        with pytest.raises(grpc.RpcError) as info:
            stub.Score(pb.ScoreRequest(images=[pb.Image(tensor=array_to_tensor(big))]), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Score(ONE_IMAGE, timeout=30).results[0].id == "one"
