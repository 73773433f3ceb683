"""Every RPC end to end against a real server on a loopback port, checked against the runtime."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
from vaegan.protos.vaegan.v1 import outlier_service_pb2_grpc as pb_grpc
from vaegan.service.runtime import Runtime
from vaegan.service.server.codec import array_to_tensor, decode_output
from vaegan.service.server.config import ServiceConfig
from vaegan.service.server.logs import JsonFormatter, RequestIdFilter
from vaegan.service.server.testing import ServerThread, sample_sum

SERVICE = "vaegan.v1.OutlierService"


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, runtime: Runtime) -> Iterator[ServerThread]:
    cfg = ServiceConfig(
        model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1,
        max_batch_size=8, max_delay_ms=30.0, decode_workers=2,
    )
    with ServerThread(cfg, runtime) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.OutlierServiceStub:
    return pb_grpc.OutlierServiceStub(channel)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """Mixed sizes and channel counts, as a client would send them."""
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
        rng.integers(0, 256, (40, 56, 3), dtype=np.uint8),
        rng.integers(0, 256, (32, 32), dtype=np.uint8),
        np.full((20, 24, 3), 128, np.uint8),
        rng.integers(0, 256, (64, 48, 4), dtype=np.uint8),
    ]


def request_images(images: list[np.ndarray]) -> list[pb.Image]:
    """Alternate encodings: PNG, raw uint8, raw float32 (in [0, 1])."""
    out = []
    for i, a in enumerate(images):
        if i % 3 == 0:
            out.append(pb.Image(id=f"img{i}", encoded=png(a)))
        elif i % 3 == 1:
            out.append(pb.Image(id=f"img{i}", tensor=array_to_tensor(a)))
        else:
            out.append(pb.Image(id=f"img{i}", tensor=array_to_tensor(a.astype(np.float32) / 255.0)))
    return out


def test_score_matches_the_runtime(stub, runtime: Runtime, images) -> None:
    opts = pb.ScoreOptions(return_anomaly_map=True, return_reconstruction=True, image_format=pb.IMAGE_FORMAT_RAW)
    resp = stub.Score(pb.ScoreRequest(images=request_images(images), options=opts))
    ref = runtime.score(images, with_reconstruction=True)
    assert [r.id for r in resp.results] == [f"img{i}" for i in range(len(images))]
    np.testing.assert_allclose([r.score for r in resp.results], ref.score, rtol=1e-5, atol=1e-6)
    assert [r.is_outlier for r in resp.results] == list(ref.is_outlier)
    np.testing.assert_allclose([r.tail_probability for r in resp.results], ref.tail_probability)
    assert set(ref.components) == {"pixel", "feature", "disc", "pixel_local", "disc_local"}
    for k in ref.components:  # every component, local ones included, as the runtime computes it
        np.testing.assert_allclose([getattr(r.components, k) for r in resp.results], ref.components[k], rtol=1e-5)
    for i, r in enumerate(resp.results):
        assert r.threshold == pytest.approx(ref.threshold)
        np.testing.assert_allclose(decode_output(r.anomaly_map), ref.anomaly_map[i], atol=1e-5)
        np.testing.assert_array_equal(decode_output(r.reconstruction), ref.reconstruction[i])
        assert not r.HasField("repaired")


def test_png_pictures_and_repair(stub, runtime: Runtime, images, tiny_bundle) -> None:
    opts = pb.ScoreOptions(return_anomaly_map=True, return_repaired=True)  # PNG is the default
    resp = stub.Score(pb.ScoreRequest(images=request_images(images[:2]), options=opts))
    ref = runtime.score(images[:2])
    fixed, masks = runtime.repair(images[:2])
    scale = stub.GetModelInfo(pb.GetModelInfoRequest()).anomaly_map_full_scale
    for i, r in enumerate(resp.results):
        amap = decode_output(r.anomaly_map)
        assert amap.dtype == np.uint8 and amap.shape == (32, 32)
        np.testing.assert_allclose(amap / 255.0 * scale, np.minimum(ref.anomaly_map[i], scale), atol=scale / 255)
        np.testing.assert_array_equal(decode_output(r.repaired), fixed[i])
        np.testing.assert_array_equal(decode_output(r.repair_mask) > 0, masks[i])
        assert decode_output(r.repaired).shape == images[i].shape[:2] + (3,)


def test_weight_and_threshold_overrides(stub, runtime: Runtime, images) -> None:
    opts = pb.ScoreOptions(weights=pb.Components(disc=0.0), threshold=0.5)
    resp = stub.Score(pb.ScoreRequest(images=request_images(images), options=opts))
    ref = runtime.score(images, weights={"disc": 0.0}, threshold=0.5)
    np.testing.assert_allclose([r.score for r in resp.results], ref.score, rtol=1e-5, atol=1e-6)
    assert [r.is_outlier for r in resp.results] == list(ref.score > 0.5)
    assert all(r.threshold == 0.5 for r in resp.results)


def test_large_request_is_split_over_several_batches(stub, runtime: Runtime) -> None:
    batch = np.random.default_rng(1).integers(0, 256, (21, 32, 32, 3), dtype=np.uint8)  # max batch 8
    req = pb.ScoreRequest(images=[pb.Image(tensor=array_to_tensor(a)) for a in batch])
    resp = stub.Score(req)
    np.testing.assert_allclose([r.score for r in resp.results], runtime.score(batch).score, rtol=1e-5, atol=1e-6)


def test_concurrent_requests_are_merged_by_the_batcher(server: ServerThread, stub) -> None:
    reg = server.server.metrics.registry
    before_runs = sample_sum(reg, "vaegan_batch_size_count") or 0.0
    before_images = sample_sum(reg, "vaegan_batch_size_sum") or 0.0
    img = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    req = pb.ScoreRequest(images=[pb.Image(tensor=array_to_tensor(img))])
    futures = [stub.Score.future(req) for _ in range(16)]
    scores = [f.result(timeout=30).results[0].score for f in futures]
    assert len(set(np.round(scores, 6))) == 1  # same image, same score, whatever the batch
    runs = sample_sum(reg, "vaegan_batch_size_count") - before_runs
    merged = sample_sum(reg, "vaegan_batch_size_sum") - before_images
    assert merged == 16
    assert runs < 16, f"16 concurrent requests ran as {runs} batches: nothing was merged"
    assert sample_sum(reg, "vaegan_batch_size_bucket", {"le": "1.0"}) < sample_sum(reg, "vaegan_batch_size_count")


def test_score_stream_answers_in_order(stub, runtime: Runtime, images) -> None:
    rng = np.random.default_rng(3)
    batches = [rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (1, 3, 8, 2, 5, 1)]

    def requests():
        for k, b in enumerate(batches):
            yield pb.ScoreRequest(images=[pb.Image(id=f"{k}-{j}", tensor=array_to_tensor(a)) for j, a in enumerate(b)])

    responses = list(stub.ScoreStream(requests(), timeout=30))
    assert len(responses) == len(batches)
    for k, (resp, b) in enumerate(zip(responses, batches, strict=True)):
        assert [r.id for r in resp.results] == [f"{k}-{j}" for j in range(len(b))]
        np.testing.assert_allclose([r.score for r in resp.results], runtime.score(b).score, rtol=1e-5, atol=1e-6)


def test_inpaint_matches_the_runtime(stub, runtime: Runtime, images) -> None:
    masks = []
    for a in images[:3]:
        m = np.zeros(a.shape[:2], np.uint8)
        m[4:12, 6:14] = 1
        masks.append(m)
    req = pb.InpaintRequest(
        images=request_images(images[:3]),
        masks=[pb.Image(encoded=png(m * 255)) if i == 0 else pb.Image(tensor=array_to_tensor(m)) for i, m in enumerate(masks)],
        image_format=pb.IMAGE_FORMAT_RAW,
    )
    resp = stub.Inpaint(req)
    ref = runtime.inpaint(images[:3], masks)
    assert [r.id for r in resp.results] == ["img0", "img1", "img2"]
    for r, want, a, m in zip(resp.results, ref, images, masks, strict=False):
        got = decode_output(r.image)
        np.testing.assert_array_equal(got, want)
        if a.ndim == 3:  # pixels outside the mask come back unchanged
            np.testing.assert_array_equal(got[m == 0], a[m == 0])


def test_inpaint_edge_masks_have_documented_results(stub, runtime: Runtime, images) -> None:
    """All-zero masks return the image bit for bit; all-one masks replace every pixel with the
    model's completion; an RGB mask counts a pixel as a hole when any channel is non-zero
    (as a grey mask of the channel maximum)."""
    a = images[0]  # 32x32 RGB
    grey = np.zeros(a.shape[:2], np.uint8)
    grey[8:20, 4:16] = 255
    rgb = np.zeros((*a.shape[:2], 3), np.uint8)
    rgb[8:20, 4:16, 1] = 200  # only the green channel marks the hole
    masks = [np.zeros(a.shape[:2], np.uint8), np.full(a.shape[:2], 255, np.uint8), rgb, grey]
    req = pb.InpaintRequest(images=request_images([a] * 4), masks=[pb.Image(encoded=png(m)) for m in masks],
                            image_format=pb.IMAGE_FORMAT_RAW)
    got = [decode_output(r.image) for r in stub.Inpaint(req).results]
    np.testing.assert_array_equal(got[0], a)  # nothing to fill: unchanged
    full = got[1]
    assert full.shape == a.shape and full.dtype == np.uint8
    np.testing.assert_array_equal(full, runtime.inpaint([a], [np.ones(a.shape[:2], bool)])[0])
    assert (full != a).mean() > 0.5  # every pixel was the model's to fill
    np.testing.assert_array_equal(got[2], got[3])  # RGB mask == grey mask of its channel maximum
    assert (got[3][grey == 0] == a[grey == 0]).all() and (got[3][grey > 0] != a[grey > 0]).any()


def test_model_info(stub, runtime: Runtime) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.name, info.version) == (runtime.bundle.name, runtime.bundle.version)
    assert (info.image.channels, info.image.height, info.image.width) == (3, 32, 32)
    assert list(info.providers) == runtime.providers
    assert info.batching.max_batch_size == 8 and info.batching.max_delay_ms == 30.0
    cal = runtime.bundle.calibration
    assert info.calibration.calibrated and info.calibration.n == cal.n
    assert info.calibration.threshold == pytest.approx(cal.threshold())
    assert set(info.calibration.components) == {"pixel", "feature", "disc", "pixel_local", "disc_local"}


def test_request_id_is_echoed_or_generated(stub, images) -> None:
    req = pb.ScoreRequest(images=request_images(images[:1]))
    _, call = stub.Score.with_call(req, metadata=(("x-request-id", "trace-42"),))
    assert ("x-request-id", "trace-42") in [tuple(m) for m in call.trailing_metadata()]
    _, call = stub.Score.with_call(req)
    rid = dict(call.trailing_metadata())["x-request-id"]
    assert len(rid) == 16


def test_health_serving_for_server_and_service(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        resp = health.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(channel) -> None:
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    reqs = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    resp = next(refl.ServerReflectionInfo(reqs))
    names = {s.name for s in resp.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    reqs = iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)])
    resp = next(refl.ServerReflectionInfo(reqs))
    assert resp.file_descriptor_response.file_descriptor_proto


def test_many_clients_at_once(stub, runtime: Runtime) -> None:
    rng = np.random.default_rng(4)
    batches = [rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (1, 2, 5, 9, 3, 1, 7, 4)]

    def one(b):
        return stub.Score(pb.ScoreRequest(images=[pb.Image(tensor=array_to_tensor(a)) for a in b]), timeout=30)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, batches))
    for resp, b in zip(responses, batches, strict=True):
        np.testing.assert_allclose([r.score for r in resp.results], runtime.score(b).score, rtol=1e-5, atol=1e-6)


def test_logs_carry_the_request_id(stub, images, caplog) -> None:
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO, logger="vaegan.service.server"):
        stub.Score(pb.ScoreRequest(images=request_images(images[:1])), metadata=(("x-request-id", "trace-7"),))
    access = [r for r in caplog.records if r.name == "vaegan.service.server.interceptor" and "Score OK" in r.getMessage()]
    assert access and access[-1].request_id == "trace-7"
    line = json.loads(JsonFormatter().format(access[-1]))
    assert line["request_id"] == "trace-7" and line["level"] == "INFO"


def test_raw_fast_path_equals_full_decoding(runtime: Runtime) -> None:
    from vaegan.service.runtime.preprocess import normalize
    from vaegan.service.server import convert

    batch = np.random.default_rng(5).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    images = [pb.Image(tensor=array_to_tensor(a)) for a in batch]
    limits = convert.Limits(64, 1 << 20)
    fast = convert.raw_model_batch(images, runtime.spec, limits)
    assert fast is not None
    np.testing.assert_array_equal(fast, convert.model_batch(convert.decode_images(images, limits), runtime.spec))
    np.testing.assert_array_equal(fast, batch)  # uint8 (N, H, W, C): the batcher normalizes
    np.testing.assert_array_equal(normalize(fast, runtime.spec), runtime.preprocess(list(batch)))
    other = images + [pb.Image(tensor=array_to_tensor(batch[0][:16]))]  # not at model size
    assert convert.raw_model_batch(other, runtime.spec, limits) is None
