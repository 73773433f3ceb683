"""Server-wide bounds: the decoded-pixel budget of all calls in flight, headers read before
anything is decoded, response work on its own pool, and a dead batcher that takes the server
out of service (health NOT_SERVING, ``vaegan serve`` exits 1) instead of leaving it half alive."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
from vaegan.protos.vaegan.v1 import outlier_service_pb2_grpc as pb_grpc
from vaegan.service.runtime import ResourceExhausted, Runtime
from vaegan.service.server import convert
from vaegan.service.server.budget import InflightPixels
from vaegan.service.server.codec import array_to_tensor
from vaegan.service.server.config import ServiceConfig
from vaegan.service.server.testing import ServerThread


def png(h: int, w: int, seed: int = 0) -> bytes:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx + seed) % 256, yy % 256, (xx * yy + seed) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ---- the budget itself ----------------------------------------------------------------------
def test_budget_grants_in_order_waits_and_lets_cancelled_waiters_go() -> None:
    async def scenario() -> None:
        budget = InflightPixels(100)
        await budget.acquire(60)
        order: list[str] = []

        async def take(name: str, n: int) -> None:
            await budget.acquire(n)
            order.append(name)

        big = asyncio.ensure_future(take("big", 90))  # must wait for the 60
        await asyncio.sleep(0)
        small = asyncio.ensure_future(take("small", 10))  # fits now, but waits behind "big": FIFO
        await asyncio.sleep(0.01)
        assert order == [] and budget.used == 60
        big.cancel()  # the head leaves: the small one behind it gets in at once
        await asyncio.sleep(0.01)
        assert order == ["small"] and budget.used == 70
        assert big.cancelled() and small.done()
        budget.release(60)
        budget.release(10)
        assert budget.used == 0
        with pytest.raises(ResourceExhausted, match="--max-inflight-pixels"):
            await budget.acquire(101)
        async with budget.reserve(100):
            assert budget.used == 100
        assert budget.used == 0

    asyncio.run(scenario())


def test_inflight_pixels_must_hold_one_allowed_request(tiny_bundle: Path) -> None:
    with pytest.raises(ValueError, match="max_inflight_pixels .* must be >= max_request_pixels"):
        ServiceConfig(model=tiny_bundle, max_request_pixels=1000, max_inflight_pixels=999)


# ---- headers first ----------------------------------------------------------------------------
def test_an_over_budget_request_is_refused_before_any_image_is_decoded(monkeypatch) -> None:
    """The request's images were decoded one by one until the budget ran out (four 4096 x 4096
    images decoded, then refused); every header is now read before anything is decoded."""
    decoded: list[int] = []
    real = convert.decode_image
    monkeypatch.setattr(convert, "decode_image", lambda im, where: decoded.append(1) or real(im, where))
    buf = io.BytesIO()
    Image.new("RGB", (4096, 4096), (77, 77, 77)).save(buf, format="PNG")
    images = [pb.Image(id=f"big{i}", encoded=buf.getvalue()) for i in range(8)]
    limits = convert.Limits(max_images=64, max_pixels=4096 * 4096, max_request_pixels=64 << 20)
    with pytest.raises(ResourceExhausted, match=r"image 4 \(id 'big4'\).*--max-request-pixels"):
        convert.declared_pixels(images, limits)
    assert decoded == []
    small = [pb.Image(id="a", encoded=png(30, 40)), pb.Image(id="t", tensor=array_to_tensor(np.zeros((5, 7), np.uint8)))]
    assert convert.declared_pixels(small, limits) == 30 * 40 + 5 * 7
    assert convert.declared_pixels(small, limits, masks=small) == 2 * (30 * 40 + 5 * 7)
    assert decoded == []


# ---- against a real server --------------------------------------------------------------------
@pytest.fixture(scope="module")
def rt(tiny_bundle: Path) -> Runtime:
    return Runtime.load(tiny_bundle, providers="cpu")


def test_concurrent_requests_wait_for_room_and_never_exceed_the_server_budget(tiny_bundle: Path, rt: Runtime) -> None:
    """Eight clients at once, each with 2 images of 512 x 512, on a server that holds one such
    request at a time: every call succeeds (they queue for room, none is refused), and the
    pixels in flight never exceed the budget."""
    per_request = 2 * 512 * 512
    cfg = ServiceConfig(model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1,
                        max_request_pixels=per_request, max_inflight_pixels=per_request + 1000, decode_workers=4)
    peak = {"used": 0, "waiting": 0}
    with ServerThread(cfg, rt) as srv, grpc.insecure_channel(srv.target) as ch:
        budget = srv.server.servicer.inflight
        take, wait = budget._take, budget._count_waiting

        def spy_take(n: int) -> None:
            take(n)
            peak["used"] = max(peak["used"], budget.used)

        def spy_wait() -> None:
            wait()
            peak["waiting"] = max(peak["waiting"], len(budget._waiters))

        budget._take, budget._count_waiting = spy_take, spy_wait
        stub = pb_grpc.OutlierServiceStub(ch)

        def call(i: int) -> int:
            req = pb.ScoreRequest(images=[pb.Image(id=f"{i}-{k}", encoded=png(512, 512, i + k)) for k in range(2)])
            return len(stub.Score(req, timeout=120).results)

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(call, range(8))) == [2] * 8
        assert budget.used == 0  # everything given back
    assert peak["used"] <= cfg.max_inflight_pixels
    assert peak["used"] == per_request  # one request at a time fitted
    assert peak["waiting"] >= 1  # and the others really waited for it


def test_response_pictures_are_not_queued_behind_large_decodes(tiny_bundle: Path, rt: Runtime) -> None:
    """With one decode thread busy on a request of large PNGs, a request that needs only its
    answer built (raw tensors at model size, with an anomaly map as PNG) waited for that
    thread: the two shared one pool. Response work now has its own pool."""
    yy, xx = np.mgrid[0:2048, 0:2048]
    buf = io.BytesIO()
    Image.fromarray(np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)).save(buf, format="PNG")
    big = pb.ScoreRequest(images=[pb.Image(id=f"b{i}", encoded=buf.getvalue()) for i in range(24)])
    s = rt.spec
    raw = np.full((s.height, s.width, s.channels), 100, np.uint8)
    small = pb.ScoreRequest(images=[pb.Image(id="s", tensor=array_to_tensor(raw))],
                            options=pb.ScoreOptions(return_anomaly_map=True))
    cfg = ServiceConfig(model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1, decode_workers=1,
                        respond_workers=1, max_request_pixels=1 << 30, max_inflight_pixels=1 << 30)
    with ServerThread(cfg, rt) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.OutlierServiceStub(ch)
        assert stub.Score(small, timeout=30).results[0].anomaly_map.encoded  # warm
        t0 = time.monotonic()
        slow = stub.Score.future(big, timeout=300)
        time.sleep(0.3)  # the big request is being decoded
        t1 = time.monotonic()
        answer = stub.Score(small, timeout=60)
        waited = time.monotonic() - t1
        assert not slow.done(), "the big request finished too soon to tell"
        assert len(slow.result().results) == 24
        full = time.monotonic() - t0
    assert answer.results[0].anomaly_map.encoded
    assert waited < full / 4, f"the small request waited {waited:.2f} s behind a {full:.2f} s decode"


class Boom(BaseException):
    """Stands for what a batcher worker must never survive silently (a bug, an interpreter error)."""


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        req = health_pb2.HealthCheckRequest(service="vaegan.v1.OutlierService")
        return health_pb2_grpc.HealthStub(ch).Check(req, timeout=10).status


def test_a_dead_batcher_turns_health_not_serving_and_sets_fatal(tiny_bundle: Path, rt: Runtime) -> None:
    """The batcher thread died on a non-Exception error while health stayed SERVING and every
    call got UNAVAILABLE forever (found with --max-delay-ms inf, which now is refused)."""
    cfg = ServiceConfig(model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1)
    raw = np.full((rt.spec.height, rt.spec.width, rt.spec.channels), 100, np.uint8)
    req = pb.ScoreRequest(images=[pb.Image(id="x", tensor=array_to_tensor(raw))])
    with ServerThread(cfg, rt) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.OutlierServiceStub(ch)
        assert len(stub.Score(req, timeout=30).results) == 1
        assert _health(srv.target) == health_pb2.HealthCheckResponse.SERVING
        batcher = srv.server.model.batcher

        def explode(batch):
            raise Boom("simulated")

        batcher._process = explode
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "batcher stopped" in err.value.details()
        deadline = time.monotonic() + 10
        while not srv.server.fatal.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.server.fatal.is_set() and "Boom: simulated" in srv.server.fatal_reason
        assert _health(srv.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_vaegan_serve_exits_1_when_its_batcher_dies(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    """The serving loop (``vaegan serve``'s) returns exit code 1 once the model stops serving,
    so that Kubernetes restarts the pod; it used to wait for a signal forever."""
    from vaegan.service.server import main as serve_main
    from vaegan.service.server.pipeline import BatchRunner

    calls = {"n": 0}
    real_call = BatchRunner.__call__

    def dies_after_warmup(self, x, timings):
        calls["n"] += 1
        if calls["n"] > 1:  # the first run is the warm-up in load()
            raise Boom("simulated")
        return real_call(self, x, timings)

    monkeypatch.setattr(BatchRunner, "__call__", dies_after_warmup)
    ready = tmp_path / "ready.json"
    cfg = ServiceConfig(model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1, ready_file=ready)
    spec = Runtime.load(tiny_bundle, providers="cpu").spec
    raw = np.full((spec.height, spec.width, spec.channels), 100, np.uint8)

    def client() -> None:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        import json

        port = json.loads(ready.read_text())["port"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, pytest.raises(grpc.RpcError):
            pb_grpc.OutlierServiceStub(ch).Score(
                pb.ScoreRequest(images=[pb.Image(id="x", tensor=array_to_tensor(raw))]), timeout=30
            )

    t = threading.Thread(target=client, daemon=True)
    t.start()
    t0 = time.monotonic()
    code = asyncio.run(serve_main.serve_until_signal(cfg))
    t.join(10)
    assert code == serve_main.EXIT_FATAL == 1
    assert time.monotonic() - t0 < 60


# ---- responses over the message limit ----------------------------------------------------------
def test_raw_pictures_over_the_message_limit_are_refused_before_any_work(tiny_bundle: Path, rt: Runtime, monkeypatch) -> None:
    """Raw float32 maps at the input's size have a known size: a response that cannot be sent
    is refused before anything is decoded, not after all the work (gRPC's send error)."""
    decoded: list[int] = []
    real = convert.decode_image
    monkeypatch.setattr(convert, "decode_image", lambda im, where: decoded.append(1) or real(im, where))
    cfg = ServiceConfig(model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1, max_message_bytes=256 << 10)
    flat = io.BytesIO()
    Image.new("RGB", (300, 300), (90, 100, 110)).save(flat, format="PNG")
    req = pb.ScoreRequest(images=[pb.Image(id=f"i{k}", encoded=flat.getvalue()) for k in range(2)],
                          options=pb.ScoreOptions(return_anomaly_map=True, anomaly_map_input_size=True,
                                                  image_format=pb.IMAGE_FORMAT_RAW))
    with ServerThread(cfg, rt) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.OutlierServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "would be 0.7 MiB, over --max-message-bytes (0.2 MiB)" in err.value.details()
        assert decoded == []
        # at the model's size the same maps fit
        req.options.anomaly_map_input_size = False
        assert len(stub.Score(req, timeout=30).results) == 2


def test_png_pictures_over_the_message_limit_get_a_clear_refusal(tiny_bundle: Path, rt: Runtime) -> None:
    """PNG sizes are known only once encoded: the refusal names the limit and the size."""
    cfg = ServiceConfig(model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1, max_message_bytes=6000)
    rng = np.random.default_rng(0)
    images = [pb.Image(id=f"n{k}", tensor=array_to_tensor(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)))
              for k in range(4)]  # 1.2 KB each on the wire
    req = pb.ScoreRequest(images=images, options=pb.ScoreOptions(return_reconstruction=True, return_anomaly_map=True))
    with ServerThread(cfg, rt) as srv, grpc.insecure_channel(srv.target) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.OutlierServiceStub(ch).Score(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the response is" in err.value.details() and "--max-message-bytes" in err.value.details()
        # one image's pictures fit
        one = pb.ScoreRequest(images=images[:1], options=req.options)
        assert len(pb_grpc.OutlierServiceStub(ch).Score(one, timeout=30).results) == 1


def test_response_floor_counts_only_what_raw_tensors_fix() -> None:
    from service.runtime.preprocess import ImageSpec

    spec = ImageSpec(channels=3, height=32, width=32, mean=(0.5,) * 3, std=(0.5,) * 3, fill=(0.5,) * 3)
    raw = convert.ScoreOptions(anomaly_map=True, map_at_input=True, reconstruction=True, repaired=True,
                               image_format=pb.IMAGE_FORMAT_RAW)
    assert convert.response_floor_bytes(2, 5000, spec, raw) == 4 * 5000 + 2 * 32 * 32 * 3 + 5000 * 4
    png = convert.ScoreOptions(anomaly_map=True, image_format=pb.IMAGE_FORMAT_PNG)
    assert convert.response_floor_bytes(2, 5000, spec, png) == 0
