"""Every kind of bad input gets its status code and a message naming the image; the server
keeps serving after each; unknown faults become INTERNAL with the traceback in the log."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
from vaegan.protos.vaegan.v1 import outlier_service_pb2_grpc as pb_grpc
from vaegan.service.runtime import Runtime
from vaegan.service.server.codec import array_to_tensor
from vaegan.service.server.config import ServiceConfig
from vaegan.service.server.testing import ServerThread, sample_sum

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
GOOD = np.full((32, 32, 3), 100, np.uint8)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def img(arr: np.ndarray, image_id: str = "") -> pb.Image:
    return pb.Image(id=image_id, tensor=array_to_tensor(arr))


@pytest.fixture(scope="module")
def server(tiny_bundle: Path) -> Iterator[ServerThread]:
    cfg = ServiceConfig(
        model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1, max_delay_ms=1.0,
        max_images_per_request=8, max_image_pixels=64 * 64, decode_workers=2,
    )
    with ServerThread(cfg, Runtime.load(tiny_bundle, providers="cpu")) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.OutlierServiceStub]:
    with grpc.insecure_channel(server.target) as ch:
        yield pb_grpc.OutlierServiceStub(ch)


def score(*images: pb.Image, **options) -> Callable[[pb_grpc.OutlierServiceStub], object]:
    return lambda stub: stub.Score(pb.ScoreRequest(images=list(images), options=pb.ScoreOptions(**options)))


def inpaint(images: list[pb.Image], masks: list[pb.Image]) -> Callable[[pb_grpc.OutlierServiceStub], object]:
    return lambda stub: stub.Inpaint(pb.InpaintRequest(images=images, masks=masks))


def stream(*requests: pb.ScoreRequest) -> Callable[[pb_grpc.OutlierServiceStub], object]:
    return lambda stub: list(stub.ScoreStream(iter(requests)))


NAN = np.full((32, 32, 3), 0.5, np.float32)
NAN[3, 4, 1] = np.nan
INF = np.full((32, 32), 0.5, np.float32)
INF[0, 0] = np.inf
BAD_LENGTH = pb.Image(id="short", tensor=pb.Tensor(shape=[32, 32, 3], dtype=pb.DTYPE_UINT8, data=b"\0" * 100))
NO_DTYPE = pb.Image(id="nodtype", tensor=pb.Tensor(shape=[2, 2], data=b"\0" * 4))

CASES = {
    "undecodable bytes": (
        score(img(GOOD, "ok"), pb.Image(id="junk", encoded=b"not an image")),
        INVALID, ["image 1 (id 'junk')", "cannot decode"],
    ),
    "truncated png": (
        score(pb.Image(id="cut", encoded=png(GOOD)[:60])), INVALID, ["image 0 (id 'cut')"],
    ),
    "two channels": (
        score(img(GOOD, "a"), img(GOOD, "b"), img(np.zeros((32, 32, 2), np.uint8), "two")),
        INVALID, ["image 2 (id 'two')", "(32, 32, 2)"],
    ),
    "one-dimensional tensor": (score(img(np.zeros(16, np.uint8), "flat")), INVALID, ["image 0 (id 'flat')"]),
    "empty request": (score(), INVALID, ["no images"]),
    "image without data": (score(pb.Image(id="nothing")), INVALID, ["image 0 (id 'nothing')", "no image data"]),
    "tensor byte length": (score(BAD_LENGTH), INVALID, ["image 0 (id 'short')", "3072 bytes, got 100"]),
    "tensor without dtype": (score(NO_DTYPE), INVALID, ["image 0 (id 'nodtype')", "dtype"]),
    "nan in float tensor": (score(img(NAN, "nan")), INVALID, ["image 0 (id 'nan')", "NaN"]),
    "inf in float tensor": (score(img(GOOD), img(INF, "inf")), INVALID, ["image 1 (id 'inf')", "infinite"]),
    "nan threshold": (score(img(GOOD), threshold=float("nan")), INVALID, ["threshold"]),
    "too many images": (score(*[img(GOOD)] * 9), EXHAUSTED, ["9 images", "limit is 8"]),
    "tensor over pixel limit": (
        score(img(GOOD), img(np.zeros((65, 64, 3), np.uint8), "big")),
        EXHAUSTED, ["image 1 (id 'big')", "65x64", "4096"],
    ),
    "png over pixel limit": (
        score(pb.Image(id="bigpng", encoded=png(np.zeros((100, 100), np.uint8)))),
        EXHAUSTED, ["image 0 (id 'bigpng')", "10000 pixels"],
    ),
    "mask shape mismatch": (
        inpaint([img(GOOD, "a"), img(GOOD, "b")], [img(np.ones((32, 32), np.uint8)), img(np.ones((16, 32), np.uint8))]),
        INVALID, ["mask 1 (id 'b')", "16x32", "32x32"],
    ),
    "mask count mismatch": (inpaint([img(GOOD, "a")], []), INVALID, ["0 masks for 1 images"]),
    "undecodable mask": (
        inpaint([img(GOOD, "a")], [pb.Image(encoded=b"junk")]), INVALID, ["mask 0 (id 'a')"],
    ),
    "bad request in a stream": (
        stream(pb.ScoreRequest(images=[img(GOOD)]), pb.ScoreRequest(images=[img(GOOD), pb.Image(id="x", encoded=b"?")])),
        INVALID, ["request 1", "image 1 (id 'x')"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_its_status_and_the_next_request_succeeds(stub, server: ServerThread, case: str) -> None:
    call, code, fragments = CASES[case]
    reg = server.server.metrics.registry
    with pytest.raises(grpc.RpcError) as info:
        call(stub)
    err = info.value
    assert err.code() == code, err.details()
    for fragment in fragments:
        assert fragment in err.details()
    assert "x-request-id" in dict(err.trailing_metadata())
    good = stub.Score(pb.ScoreRequest(images=[img(GOOD, "fine")]))
    assert good.results[0].id == "fine"
    method = "ScoreStream" if case.startswith("bad request in a stream") else ("Inpaint" if "mask" in case else "Score")
    assert sample_sum(reg, "vaegan_requests_total", {"method": method, "code": code.name}) >= 1


def test_unknown_fault_is_internal_with_a_generic_message(stub, server: ServerThread, caplog) -> None:
    batcher = server.server.model.batcher
    real = batcher.run

    def broken(x, timings):
        raise ZeroDivisionError("secret detail")

    batcher.run = broken
    try:
        with caplog.at_level(logging.ERROR, logger="vaegan.service.server.interceptor"):
            with pytest.raises(grpc.RpcError) as info:
                stub.Score(pb.ScoreRequest(images=[img(GOOD)]), metadata=(("x-request-id", "bug-1"),))
    finally:
        batcher.run = real
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in info.value.details() and "bug-1" in info.value.details()
    logged = [r for r in caplog.records if r.exc_info and "ZeroDivisionError" in caplog.text]
    assert logged, "the traceback was not logged"
    assert stub.Score(pb.ScoreRequest(images=[img(GOOD)])).results


def test_calls_before_the_model_is_loaded_are_unavailable(tiny_bundle: Path) -> None:
    cfg = ServiceConfig(model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1)
    with ServerThread(cfg, load=False) as srv, grpc.insecure_channel(srv.target) as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.OutlierServiceStub(ch).GetModelInfo(pb.GetModelInfoRequest())
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not loaded" in info.value.details()
