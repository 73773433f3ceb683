"""A model repository served for real: several models, version policies, versions rolled forward
by polling under continuous load with no failed request, a corrupt version refused while the old
one serves, and explicit load/unload over gRPC and HTTP with unload draining what is in flight."""

from __future__ import annotations

import io
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from vaegan.protos.inference.v2 import grpc_predict_v2_pb2 as oip
from vaegan.protos.inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
from vaegan.protos.vaegan.v1 import outlier_service_pb2_grpc as pb_grpc
from vaegan.service.server.codec import array_to_tensor
from vaegan.service.server.config import ServiceConfig
from vaegan.service.server.repository import VersionPolicy, scan_repository
from vaegan.service.server.testing import ServerThread


def _put(repo: Path, bundle: Path, name: str, version: str, corrupt: bool = False) -> None:
    """Copy a bundle in as repo/name/version, atomically (a poll never sees half a copy)."""
    staging = repo / f".staging-{name}-{version}"
    shutil.copytree(bundle, staging)
    if corrupt:
        graph = staging / "encoder.onnx"
        data = bytearray(graph.read_bytes())
        data[len(data) // 2] ^= 0xFF
        graph.write_bytes(bytes(data))
    (repo / name).mkdir(exist_ok=True)
    staging.rename(repo / name / version)


def _request(name: str = "", version: str = "") -> pb.ScoreRequest:
    img = np.full((8, 8, 3), 100, np.uint8)
    return pb.ScoreRequest(images=[pb.Image(id="x", tensor=array_to_tensor(img))], model_name=name, model_version=version)


def _config(repo: Path, **kw) -> ServiceConfig:
    return ServiceConfig(model_repository=repo, host="127.0.0.1", port=0, metrics_port=-1, max_delay_ms=1.0, **kw)


def _states(stub: pb_grpc.OutlierServiceStub) -> list[tuple[str, str, str]]:
    return [(m.name, m.version, m.state) for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models]


def test_version_policy_and_scan(tmp_path: Path, tiny_bundle: Path) -> None:
    assert VersionPolicy.parse("latest").select(["1", "2", "10"]) == ["10"]
    assert VersionPolicy.parse("latest:2").select(["1", "2", "10"]) == ["2", "10"]
    assert VersionPolicy.parse("all").select(["1", "2"]) == ["1", "2"]
    assert VersionPolicy.parse("specific:1,10").select(["1", "2", "10"]) == ["1", "10"]
    for bad in ("latest:0", "newest", "specific:", "specific:a"):
        with pytest.raises(ValueError, match="version policy"):
            VersionPolicy.parse(bad)
    for name, version in (("a", "2"), ("a", "10"), ("b", "1")):
        _put(tmp_path, tiny_bundle, name, version)
    (tmp_path / "a" / "notes").mkdir()  # not a version
    assert scan_repository(tmp_path) == {"a": ["2", "10"], "b": ["1"]}
    with pytest.raises(ValueError, match="either model"):
        ServiceConfig(model=tiny_bundle, model_repository=tmp_path)


def test_two_models_each_with_its_own_batcher(tmp_path: Path, tiny_bundle: Path) -> None:
    for name, version in (("a", "1"), ("a", "2"), ("b", "1")):
        _put(tmp_path, tiny_bundle, name, version)
    with ServerThread(_config(tmp_path)) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.OutlierServiceStub(ch)
        assert _states(stub) == [("a", "2", "READY"), ("b", "1", "READY")]  # latest:1
        ra, rb = stub.Score(_request("a"), timeout=30), stub.Score(_request("b"), timeout=30)
        assert (ra.model_name, ra.model_version, rb.model_name, rb.model_version) == ("a", "2", "b", "1")
        assert ra.results[0].score == pytest.approx(rb.results[0].score, abs=1e-6)  # the same weights
        models = srv.server.servicer.models
        assert models.resolve("a").batcher is not models.resolve("b").batcher
        info = stub.GetModelInfo(pb.GetModelInfoRequest(model_name="b"), timeout=10)
        assert (info.name, info.version) == ("b", "1")
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(_request(), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "name one" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(_request("c"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(_request("a", "1"), timeout=10)  # on disk, but not served under latest:1
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(service="a"), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    with ServerThread(_config(tmp_path, version_policy="all")) as srv, grpc.insecure_channel(srv.target) as ch:
        # the series about a model's work carry its name and version
        from prometheus_client import generate_latest

        pb_grpc.OutlierServiceStub(ch).Score(_request("b"), timeout=30)
        scrape = generate_latest(srv.server.metrics.registry).decode()
        assert 'vaegan_images_total{method="Score",model="b",version="1"} 1.0' in scrape
        assert 'vaegan_batch_size_count{model="b",version="1"} 1.0' in scrape
        assert 'vaegan_outlier_score_count{model="b",version="1"} 1.0' in scrape
        deadline = time.monotonic() + 5  # the call is booked a moment after its answer
        while 'vaegan_requests_total{code="OK",method="Score",model="b",version="1"} 1.0' not in scrape:
            assert time.monotonic() < deadline, scrape
            time.sleep(0.05)
            scrape = generate_latest(srv.server.metrics.registry).decode()
        assert 'model="a"' not in scrape.split("vaegan_images_total")[1].split("# HELP")[0]  # a served nothing
        stub = pb_grpc.OutlierServiceStub(ch)
        assert [(n, v) for n, v, _ in _states(stub)] == [("a", "1"), ("a", "2"), ("b", "1")]
        assert stub.Score(_request("a", "1"), timeout=30).model_version == "1"
        assert stub.Score(_request("a"), timeout=30).model_version == "2"  # the newest by default


def test_poll_rolls_versions_forward_under_load_without_a_failed_request(tmp_path: Path, tiny_bundle: Path) -> None:
    _put(tmp_path, tiny_bundle, "a", "1")
    cfg = _config(tmp_path, model_control_mode="poll", repository_poll_secs=0.2, grace_seconds=5)
    with ServerThread(cfg) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.OutlierServiceStub(ch)
        seen: list[str] = []
        errors: list[str] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    seen.append(stub.Score(_request("a"), timeout=30).model_version)
                except grpc.RpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        _put(tmp_path, tiny_bundle, "a", "2")  # a new version appears
        deadline = time.monotonic() + 60
        while (not seen or seen[-1] != "2") and time.monotonic() < deadline:
            time.sleep(0.05)
        _put(tmp_path, tiny_bundle, "a", "3", corrupt=True)  # a bad one: refused, 2 keeps serving
        deadline = time.monotonic() + 60
        while ("a", "3", "UNAVAILABLE") not in _states(stub) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(30)
        assert errors == [], errors[:5]
        assert "1" in seen and seen[-1] == "2" and len(seen) > 20
        assert seen.index("2") > 0 and "1" not in seen[seen.index("2") + 50:]  # switched, and stayed
        states = _states(stub)
        assert ("a", "2", "READY") in states and ("a", "1", "READY") not in states
        (reason,) = [m.reason for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models if m.version == "3"]
        assert "encoder.onnx" in reason  # the checksum that failed is named
        assert srv.server.metrics.load_failures.labels("a")._value.get() == 1  # and counted once
        assert stub.Score(_request("a"), timeout=30).model_version == "2"


def _slow_request(name: str) -> pb.ScoreRequest:
    yy, xx = np.mgrid[0:1024, 0:1024]
    buf = io.BytesIO()
    Image.fromarray(np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)).save(buf, format="PNG")
    return pb.ScoreRequest(images=[pb.Image(id=f"s{i}", encoded=buf.getvalue()) for i in range(10)], model_name=name)


def test_explicit_load_and_unload_over_grpc_and_http_unload_drains(tmp_path: Path, tiny_bundle: Path) -> None:
    for name in ("a", "b"):
        _put(tmp_path, tiny_bundle, name, "1")
    cfg = _config(tmp_path, model_control_mode="explicit", http_port=0, decode_workers=1,
                  max_request_pixels=1 << 30, max_inflight_pixels=1 << 30)
    with ServerThread(cfg) as srv, grpc.insecure_channel(srv.target) as ch:
        stub, repo = pb_grpc.OutlierServiceStub(ch), oip_grpc.GRPCInferenceServiceStub(ch)
        assert _states(stub) == []  # explicit: nothing until asked
        repo.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="a"), timeout=60)
        http = f"http://127.0.0.1:{srv.ports.http}"
        with urllib.request.urlopen(urllib.request.Request(f"{http}/v2/repository/models/b/load", data=b"{}"), timeout=60) as r:
            assert r.status == 200
        assert _states(stub) == [("a", "1", "READY"), ("b", "1", "READY")]
        index = repo.RepositoryIndex(oip.RepositoryIndexRequest(), timeout=10)
        assert [(m.name, m.state) for m in index.models] == [("a", "READY"), ("b", "READY")]
        with pytest.raises(grpc.RpcError) as err:
            repo.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="zzz"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # unload a while a slow request runs on it: the request finishes, then a is gone
        slow = stub.Score.future(_slow_request("a"), timeout=120)
        model_a = srv.server.servicer.models.resolve("a")
        deadline = time.monotonic() + 30
        while model_a.active == 0 and time.monotonic() < deadline:  # the slow request holds version 1
            time.sleep(0.01)
        assert model_a.active == 1
        repo.RepositoryModelUnload(oip.RepositoryModelUnloadRequest(model_name="a"), timeout=120)
        assert model_a.active == 0 and model_a.retired  # unload returned only once it had finished
        assert len(slow.result(timeout=30).results) == 10  # and it was answered, not failed
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(_request("a"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with urllib.request.urlopen(urllib.request.Request(f"{http}/v2/repository/models/b/unload", data=b"{}"), timeout=60) as r:
            assert r.status == 200
        assert _states(stub) == []
        with urllib.request.urlopen(f"{http}/v2/health/ready", timeout=10) as r:  # up, with no model loaded
            assert r.status == 200
