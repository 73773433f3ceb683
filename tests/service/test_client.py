"""service.client against real servers: inputs, results, retries, deadlines, balancing, TLS."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from vaegan.service.client import ImageScore, OutlierClient, OutlierClientError
from vaegan.service.runtime import Runtime
from vaegan.service.server.config import ServiceConfig
from vaegan.service.server.testing import ServerThread, sample_sum


def config(bundle: Path, **kw) -> ServiceConfig:
    return ServiceConfig(model=bundle, host="127.0.0.1", port=0, metrics_port=-1, **kw)


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, runtime: Runtime) -> Iterator[ServerThread]:
    with ServerThread(config(tiny_bundle, max_batch_size=16), runtime) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[OutlierClient]:
    with OutlierClient(server.target, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)  # (N, H, W, C)


def test_score_accepts_arrays_pil_paths_and_bytes(client, runtime: Runtime, batch, tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(batch[2]).save(path)
    inputs = [batch[0], Image.fromarray(batch[1]), str(path), path.read_bytes(), batch[4].astype(np.float32) / 255]
    results = client.score(inputs)
    assert all(isinstance(r, ImageScore) for r in results)
    assert [r.id for r in results] == ["0", "1", str(path), "3", "4"]
    ref = runtime.score([batch[0], batch[1], batch[2], batch[2], batch[4]])
    np.testing.assert_allclose([r.score for r in results], ref.score, rtol=1e-5, atol=1e-6)
    assert [r.is_outlier for r in results] == list(ref.is_outlier)
    assert results[0].components.keys() == {"pixel", "feature", "disc", "pixel_local", "disc_local"}


def test_score_with_pictures_and_overrides(client, runtime: Runtime, batch) -> None:
    results = client.score(batch, ids=list("abcdef"), anomaly_maps=True, reconstructions=True,
                           repaired=True, weights={"disc": 0.0}, threshold=1.0)
    ref = runtime.score(batch, weights={"disc": 0.0}, threshold=1.0, with_reconstruction=True)
    fixed, masks = runtime.repair(batch)
    for i, r in enumerate(results):
        assert r.id == "abcdef"[i] and r.threshold == 1.0
        assert r.anomaly_map.dtype == np.float32 and r.anomaly_map.shape == (32, 32)
        np.testing.assert_allclose(r.anomaly_map, ref.anomaly_map[i], atol=1e-5)
        np.testing.assert_array_equal(r.reconstruction, ref.reconstruction[i])
        np.testing.assert_array_equal(r.repaired, fixed[i])
        np.testing.assert_array_equal(r.repair_mask, masks[i])
    np.testing.assert_allclose([r.score for r in results], ref.score, rtol=1e-5, atol=1e-6)


def test_score_stream_inpaint_and_model_info(client, runtime: Runtime, batch) -> None:
    streamed = list(client.score_stream([batch[:2], batch[2:5], batch[5:]]))
    assert [len(b) for b in streamed] == [2, 3, 1]
    np.testing.assert_allclose([r.score for b in streamed for r in b], runtime.score(batch).score, rtol=1e-5, atol=1e-6)
    masks = np.zeros(batch.shape[:3], np.uint8)
    masks[:, 8:16, 8:16] = 1
    filled = client.inpaint(batch[:2], masks[:2])
    for got, want in zip(filled, runtime.inpaint(batch[:2], masks[:2]), strict=True):
        np.testing.assert_array_equal(got, want)
    info = client.model_info()
    assert (info.name, info.channels, info.height, info.width) == (runtime.bundle.name, 3, 32, 32)
    assert info.calibrated and info.max_batch_size == 16 and info.providers == runtime.providers


def test_bad_input_raises_with_code_details_and_request_id(client) -> None:
    with pytest.raises(OutlierClientError) as info:
        client.score([np.zeros((8, 8, 2), np.uint8)], ids=["two-channels"])
    err = info.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 0 (id 'two-channels')" in err.details and len(err.request_id) == 16


def test_retries_until_the_model_is_loaded(tiny_bundle: Path, runtime: Runtime) -> None:
    with ServerThread(config(tiny_bundle), runtime, load=False) as srv:
        threading.Timer(0.5, srv.load).start()  # UNAVAILABLE for the first half second
        t0 = time.perf_counter()
        with OutlierClient(srv.target, timeout=20, retries=8, backoff=0.1, max_backoff=0.4) as client:
            assert client.model_info().name == runtime.bundle.name
        assert time.perf_counter() - t0 >= 0.4
        refused = sample_sum(srv.server.metrics.registry, "vaegan_requests_total", {"method": "GetModelInfo", "code": "UNAVAILABLE"}
        )
        assert refused and refused >= 1


def test_retries_give_up_on_a_dead_server() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    with OutlierClient(f"127.0.0.1:{port}", timeout=10, retries=2, backoff=0.05) as client:
        t0 = time.perf_counter()
        with pytest.raises(OutlierClientError) as info:
            client.model_info()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.perf_counter() - t0 < 5


def test_deadline_exceeded_and_the_server_goes_on(tiny_bundle: Path, runtime: Runtime, batch) -> None:
    with ServerThread(config(tiny_bundle, max_delay_ms=1500.0), runtime) as srv:
        with OutlierClient(srv.target, timeout=0.3) as client:
            t0 = time.perf_counter()
            with pytest.raises(OutlierClientError) as info:
                client.score(batch[:1])  # waits 1.5 s in the batcher for company
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.perf_counter() - t0 < 1.2
            assert len(client.score(batch[:1], timeout=10)) == 1


def test_round_robin_spreads_calls_over_servers(tiny_bundle: Path, runtime: Runtime, server: ServerThread) -> None:
    with ServerThread(config(tiny_bundle), runtime) as other:
        target = f"ipv4:127.0.0.1:{server.port},127.0.0.1:{other.port}"

        def calls(srv: ServerThread) -> float:
            reg = srv.server.metrics.registry
            return sample_sum(reg, "vaegan_requests_total", {"method": "GetModelInfo", "code": "OK"}) or 0

        before = calls(server), calls(other)
        with OutlierClient(target, load_balancing="round_robin") as client:
            # gRPC connects the second address in the background: the first calls may all go to
            # one server; once both are connected, round robin alternates between them
            for _ in range(60):
                client.model_info()
                if calls(server) - before[0] >= 3 and calls(other) - before[1] >= 3:
                    break
        assert calls(server) - before[0] >= 3 and calls(other) - before[1] >= 3
    with OutlierClient(f"dns:///localhost:{server.port}", load_balancing="round_robin") as client:
        assert client.model_info().name == runtime.bundle.name


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls(tiny_bundle: Path, runtime: Runtime, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    with ServerThread(config(tiny_bundle, tls_cert_file=cert, tls_key_file=key), runtime) as srv:
        with OutlierClient(f"localhost:{srv.port}", tls=True, root_certificates=cert.read_bytes()) as client:
            assert client.model_info().name == runtime.bundle.name
        with OutlierClient(f"localhost:{srv.port}", retries=0, timeout=5) as plain:
            with pytest.raises(OutlierClientError):
                plain.model_info()
