"""Property-based fuzzing of Score, ScoreStream and Inpaint against a real server: whatever a
client sends, the answer is OK or a client-error status (never INTERNAL or UNKNOWN), and the
server stays healthy and correct afterwards.

``VAEGAN_FUZZ_EXAMPLES`` sets the number of examples per RPC (default 300, about 900 calls; CI runs the default).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
from vaegan.protos.vaegan.v1 import outlier_service_pb2_grpc as pb_grpc
from vaegan.service.runtime import Runtime
from vaegan.service.server.config import ServiceConfig
from vaegan.service.server.testing import ServerThread

EXAMPLES = int(os.environ.get("VAEGAN_FUZZ_EXAMPLES", "300"))
FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


def _png(h: int, w: int, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 100 if mode in ("L", "P", "1", "I") else (100,) * len(mode)).save(buf, format="PNG")
    return buf.getvalue()


VALID_PNGS = [_png(h, w, m) for h, w, m in ((32, 32, "RGB"), (7, 90, "L"), (50, 20, "RGBA"), (1, 1, "P"))]

# an image: encoded bytes (valid, corrupted, truncated, random) or a tensor (any shape/dtype/length)
encoded = st.one_of(
    st.sampled_from(VALID_PNGS),
    st.builds(lambda b, i, x: b[:i] + bytes([x]) + b[i + 1:], st.sampled_from(VALID_PNGS),
              st.integers(0, 60), st.integers(0, 255)),
    st.builds(lambda b, n: b[:n], st.sampled_from(VALID_PNGS), st.integers(0, 80)),
    st.binary(max_size=200),
).map(lambda data: pb.Image(encoded=data))
tensor = st.builds(
    lambda shape, dtype, extra, fill: pb.Tensor(
        shape=shape, dtype=dtype,
        data=bytes([fill % 256]) * max(0, int(np.prod(shape or [0])) * (4 if dtype == pb.DTYPE_FLOAT32 else 1) + extra),
    ),
    st.lists(st.integers(-2, 40), max_size=4),
    st.sampled_from([pb.DTYPE_UNSPECIFIED, pb.DTYPE_UINT8, pb.DTYPE_FLOAT32, 7]),
    st.sampled_from([0, 0, 0, -1, 1, 3]),
    st.integers(0, 255),
).map(lambda t: pb.Image(tensor=t))
image = st.builds(lambda img, i: pb.Image(id=i, encoded=img.encoded) if img.WhichOneof("data") == "encoded"
                  else pb.Image(id=i, tensor=img.tensor),
                  st.one_of(encoded, tensor, st.just(pb.Image())), st.text(max_size=20))
number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, -1.0, 1e308, 1e-300]))
options = st.builds(
    lambda maps, recon, rep, fmt, w, thr, at_input: pb.ScoreOptions(
        return_anomaly_map=maps, return_reconstruction=recon, return_repaired=rep, image_format=fmt,
        weights=pb.Components(**w), threshold=thr, anomaly_map_input_size=at_input,
    ),
    st.booleans(), st.booleans(), st.booleans(), st.sampled_from([0, 1, 2, 9]),
    st.dictionaries(st.sampled_from(["pixel", "feature", "disc", "pixel_local", "disc_local"]), number, max_size=3),
    st.one_of(st.none(), number), st.booleans(),
)
score_request = st.builds(lambda imgs, opts: pb.ScoreRequest(images=imgs, options=opts),
                          st.lists(image, max_size=5), options)


@pytest.fixture(scope="module")
def server(tiny_bundle: Path) -> Iterator[tuple[ServerThread, pb_grpc.OutlierServiceStub, Runtime]]:
    rt = Runtime.load(tiny_bundle, providers="cpu")
    cfg = ServiceConfig(model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1, max_delay_ms=0.5,
                        max_images_per_request=4, max_image_pixels=128 * 128)
    with ServerThread(cfg, rt) as srv, grpc.insecure_channel(srv.target) as ch:
        yield srv, pb_grpc.OutlierServiceStub(ch), rt


def _no_fault(call) -> None:  # noqa: ANN001 - a zero-argument callable
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() not in FAULTS, f"{e.code().name}: {e.details()}"


@FUZZ
@given(request=score_request)
def test_score_never_faults(server, request: pb.ScoreRequest) -> None:
    _no_fault(lambda: server[1].Score(request, timeout=30))


@FUZZ
@given(requests=st.lists(score_request, min_size=1, max_size=3))
def test_score_stream_never_faults(server, requests: list[pb.ScoreRequest]) -> None:
    _no_fault(lambda: list(server[1].ScoreStream(iter(requests), timeout=30)))


@FUZZ
@given(images=st.lists(image, max_size=3), masks=st.lists(image, max_size=3), fmt=st.sampled_from([0, 1, 2, 5]))
def test_inpaint_never_faults(server, images: list[pb.Image], masks: list[pb.Image], fmt: int) -> None:
    request = pb.InpaintRequest(images=images, masks=masks, image_format=fmt)
    _no_fault(lambda: server[1].Inpaint(request, timeout=30))


def test_after_the_fuzz_the_server_is_healthy_and_correct(server) -> None:
    srv, stub, rt = server
    with grpc.insecure_channel(srv.target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    got = stub.Score(pb.ScoreRequest(images=[pb.Image(encoded=_png_array(img))]), timeout=30).results[0].score
    assert got == pytest.approx(float(rt.score(img[None]).score[0]), abs=1e-5)


def _png_array(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
