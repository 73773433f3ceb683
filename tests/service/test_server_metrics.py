"""/metrics scraped over HTTP: the counters move, the names follow the conventions, promtool agrees."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
from vaegan.protos.vaegan.v1 import outlier_service_pb2_grpc as pb_grpc
from vaegan.service.runtime import Runtime
from vaegan.service.server.codec import array_to_tensor
from vaegan.service.server.config import ServiceConfig
from vaegan.service.server.testing import ServerThread


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, runtime: Runtime) -> Iterator[ServerThread]:
    cfg = ServiceConfig(
        model=tiny_bundle, host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0
    )
    with ServerThread(cfg, runtime) as srv:
        yield srv


def scrape(srv: ServerThread) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples(text).items() if n == name and want <= set(ls))


def score(srv: ServerThread, n: int, bad: bool = False) -> None:
    rng = np.random.default_rng(n)
    images = [
        pb.Image(tensor=array_to_tensor(a))
        for a in rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    ]
    if bad:
        images.append(pb.Image(encoded=b"junk"))
    with grpc.insecure_channel(srv.target) as ch:
        try:
            pb_grpc.OutlierServiceStub(ch).Score(pb.ScoreRequest(images=images))
        except grpc.RpcError as e:
            assert bad and e.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_counters_move(server: ServerThread, runtime: Runtime) -> None:
    before = scrape(server)
    score(server, 5)
    score(server, 3)
    score(server, 2, bad=True)
    # the status reaches the client a moment before the server's interceptor books the call
    deadline = time.monotonic() + 5.0
    while True:
        after = scrape(server)
        booked = sum(
            value(after, "vaegan_requests_total", method="Score", code=c)
            - value(before, "vaegan_requests_total", method="Score", code=c)
            for c in ("OK", "INVALID_ARGUMENT")
        )
        if booked >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("vaegan_requests_total", method="Score", code="OK") == 2
    assert delta("vaegan_requests_total", method="Score", code="INVALID_ARGUMENT") == 1
    assert delta("vaegan_request_duration_seconds_count", method="Score") == 3
    m = {"model": runtime.bundle.name, "version": runtime.bundle.version}  # the model's own series
    assert delta("vaegan_images_total", method="Score", **m) == 8
    assert delta("vaegan_batch_size_sum", **m) == 8
    assert delta("vaegan_queue_wait_seconds_count", **m) >= 2
    for graph in ("forward", "pipeline"):  # the composed E -> G -> D graph: one call per batch
        assert delta("vaegan_inference_seconds_count", graph=graph, **m) >= 2
    assert delta("vaegan_outlier_score_count", **m) == 8
    assert delta("vaegan_outliers_total", **m) >= 0
    assert value(after, "vaegan_requests_in_flight", method="Score") == 0
    info = {k: v for k, v in samples(after).items() if k[0] == "vaegan_model_info"}
    assert len(info) == 1
    labels = dict(next(iter(info))[1])
    assert labels == {
        "name": runtime.bundle.name,
        "version": runtime.bundle.version,
        "provider": runtime.provider,
    }


def test_metric_names_follow_the_conventions(server: ServerThread) -> None:
    score(server, 1)
    families = {
        f.name: f
        for f in text_string_to_metric_families(scrape(server))
        if f.name.startswith("vaegan_")
    }
    expected = {
        "vaegan_requests": "counter",  # exposed as vaegan_requests_total
        "vaegan_request_duration_seconds": "histogram",
        "vaegan_requests_in_flight": "gauge",
        "vaegan_images": "counter",
        "vaegan_batch_size": "histogram",
        "vaegan_queue_wait_seconds": "histogram",
        "vaegan_inference_seconds": "histogram",
        "vaegan_outliers": "counter",
        "vaegan_outlier_score": "histogram",
        "vaegan_model_info": "gauge",  # an Info metric: constant 1 with the labels
    }
    for name, kind in expected.items():
        assert name in families and families[name].type == kind, name


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Prometheus) is not installed"
)
def test_promtool_check_metrics_passes(server: ServerThread) -> None:
    score(server, 4)
    out = subprocess.run(
        ["promtool", "check", "metrics"],
        input=scrape(server),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_each_server_has_its_own_registry(
    tiny_bundle: Path, runtime: Runtime, server: ServerThread
) -> None:
    cfg = ServiceConfig(
        model=tiny_bundle, host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0
    )
    with ServerThread(cfg, runtime) as other:
        assert other.metrics_port != server.metrics_port
        score(other, 2)
        m = {"model": runtime.bundle.name, "version": runtime.bundle.version}
        assert value(scrape(other), "vaegan_images_total", method="Score", **m) == 2
