"""Hostile inputs that used to come back INTERNAL or reach exotic decoders: a format allow-list,
every decoder failure INVALID_ARGUMENT naming the image, capped ids."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
from vaegan.protos.vaegan.v1 import outlier_service_pb2_grpc as pb_grpc
from vaegan.service.runtime import InvalidInput, Runtime
from vaegan.service.runtime.preprocess import DEFAULT_IMAGE_FORMATS, decode_image
from vaegan.service.server.config import ServiceConfig
from vaegan.service.server.testing import ServerThread, sample_sum


def encoded(fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (32, 32), 90 if mode == "L" else (90, 100, 110)).save(buf, format=fmt)
    return buf.getvalue()


def dds_with_unknown_pixel_format() -> bytes:
    """A DDS header whose FourCC Pillow does not implement: it raises NotImplementedError."""
    hdr = bytearray(124)
    struct.pack_into("<IIIIIII", hdr, 0, 124, 0x1007, 4, 4, 0, 0, 0)
    struct.pack_into("<II4s", hdr, 72, 32, 0x4, b"XYZW")
    return b"DDS " + bytes(hdr) + b"\0" * 64


@pytest.fixture(scope="module")
def stubs(tiny_bundle: Path) -> Iterator[dict[str, pb_grpc.OutlierServiceStub]]:
    """A default server and one that accepts every format Pillow has."""
    rt = Runtime.load(tiny_bundle, providers="cpu")
    base = {"model": tiny_bundle, "host": "127.0.0.1", "port": 0, "metrics_port": -1, "max_delay_ms": 1.0}
    with ServerThread(ServiceConfig(**base), rt) as default, \
            ServerThread(ServiceConfig(**base, image_formats="all"), rt) as everything, \
            grpc.insecure_channel(default.target) as c1, grpc.insecure_channel(everything.target) as c2:
        yield {"default": pb_grpc.OutlierServiceStub(c1), "all": pb_grpc.OutlierServiceStub(c2)}


def _score(stub: pb_grpc.OutlierServiceStub, data: bytes, image_id: str = "x") -> pb.ScoreResponse:
    return stub.Score(pb.ScoreRequest(images=[pb.Image(id=image_id, encoded=data)]), timeout=30)


def _code(stub: pb_grpc.OutlierServiceStub, data: bytes, image_id: str = "x") -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        _score(stub, data, image_id)
    return err.value.code(), err.value.details() or ""


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP"])
def test_the_default_formats_are_served(stubs, fmt: str) -> None:
    assert len(_score(stubs["default"], encoded(fmt)).results) == 1


@pytest.mark.parametrize("fmt", ["GIF", "EPS", "PCX", "TGA"])
def test_other_formats_are_refused_by_default_naming_the_accepted_ones(stubs, fmt: str) -> None:
    code, details = _code(stubs["default"], encoded(fmt, "L" if fmt == "EPS" else "RGB"), image_id="odd")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 0 (id 'odd')" in details and "accepted formats: PNG, JPEG, BMP, TIFF, WEBP" in details


def test_all_formats_when_asked(stubs) -> None:
    assert len(_score(stubs["all"], encoded("GIF")).results) == 1


def test_a_decoder_that_raises_an_unusual_type_is_invalid_argument(stubs) -> None:
    """Pillow's DDS plugin raises NotImplementedError: it was INTERNAL; the server keeps serving."""
    code, details = _code(stubs["all"], dds_with_unknown_pixel_format(), image_id="tex.dds")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "tex.dds" in details and "NotImplementedError" in details
    assert len(_score(stubs["all"], encoded("PNG")).results) == 1


def test_long_ids_are_refused_and_never_echoed_whole(stubs) -> None:
    long_id = "a" * (1 << 20)
    code, details = _code(stubs["default"], encoded("PNG"), image_id=long_id)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 256" in details and len(details) < 300
    # raw tensors skip decoding: the id is still checked
    raw = pb.Image(id=long_id, tensor=pb.Tensor(shape=[32, 32, 3], dtype=pb.DTYPE_UINT8, data=bytes(32 * 32 * 3)))
    with pytest.raises(grpc.RpcError) as err:
        stubs["default"].Score(pb.ScoreRequest(images=[raw]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(_score(stubs["default"], encoded("PNG"), image_id="b" * 256).results) == 1  # 256 bytes pass


def test_decode_image_turns_every_decoder_failure_into_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="NotImplementedError"):
        decode_image(dds_with_unknown_pixel_format(), where="image 3")
    with pytest.raises(InvalidInput, match="accepted format"):
        decode_image(encoded("GIF"), formats=DEFAULT_IMAGE_FORMATS)
    assert decode_image(encoded("GIF")).shape == (32, 32, 3)  # the library default: every format


def test_unknown_format_names_are_refused_at_start() -> None:
    with pytest.raises(ValueError, match="image_formats: foo not known to Pillow"):
        ServiceConfig(model=Path("m"), image_formats="png,foo")
    assert ServiceConfig(model=Path("m"), image_formats="PNG, jpg").formats == ("PNG", "JPEG")
    assert ServiceConfig(model=Path("m"), image_formats="all").formats is None
    np.testing.assert_equal(ServiceConfig(model=Path("m")).formats, DEFAULT_IMAGE_FORMATS)


def test_huge_weights_are_refused_not_an_infinite_score(stubs, runtime: Runtime) -> None:
    """Weights of 1e308 gave score inf and threshold NaN."""
    request = pb.ScoreRequest(images=[pb.Image(id="x", encoded=encoded("PNG"))],
                              options=pb.ScoreOptions(weights=pb.Components(pixel=1e308)))
    with pytest.raises(grpc.RpcError) as err:
        stubs["default"].Score(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "within +-1e+06" in (err.value.details() or "")
    with pytest.raises(InvalidInput, match="threshold must be a finite number"):
        runtime.score(np.zeros((1, 32, 32, 3), np.uint8), threshold=float("nan"))


def test_a_nan_model_output_is_a_fault_not_a_verdict(runtime: Runtime) -> None:
    fwd = runtime.forward_images(np.zeros((2, 32, 32, 3), np.uint8))
    fwd.x_hat[1] = np.nan
    with pytest.raises(RuntimeError, match="non-finite score for image 1"):
        runtime.score_forward(fwd)


def _raw(channel: grpc.Channel, method: str, streaming: bool = False):
    """A call that sends bytes as they are (no protobuf serialization)."""
    path = f"/vaegan.v1.OutlierService/{method}"
    make = channel.stream_stream if streaming else channel.unary_unary
    return make(path, request_serializer=lambda b: b, response_deserializer=pb.ScoreResponse.FromString)


def test_malformed_protobuf_is_invalid_argument_and_counted(tiny_bundle: Path, runtime: Runtime) -> None:
    cfg = ServiceConfig(model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1, max_delay_ms=1.0)
    garbage = b"\xff\xff\xff\xff"
    with ServerThread(cfg, runtime) as srv, grpc.insecure_channel(srv.target) as ch:
        for method in ("Score", "Inpaint", "GetModelInfo"):
            with pytest.raises(grpc.RpcError) as err:
                _raw(ch, method)(garbage, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "malformed vaegan.v1." in (err.value.details() or "")
        # mid-stream: the results already computed arrive, then INVALID_ARGUMENT
        good = pb.ScoreRequest(images=[pb.Image(id="g", encoded=encoded("PNG"))]).SerializeToString()
        responses = _raw(ch, "ScoreStream", streaming=True)(iter([good, garbage]), timeout=30)
        got = []
        with pytest.raises(grpc.RpcError) as err:
            for r in responses:
                got.append(r)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [r.results[0].id for r in got] == ["g"]
        registry = srv.server.metrics.registry
        assert sample_sum(registry, "vaegan_requests_total", {"method": "Score", "code": "INVALID_ARGUMENT"}) == 1
        assert len(pb_grpc.OutlierServiceStub(ch).Score(pb.ScoreRequest(images=[pb.Image(encoded=encoded("PNG"))])).results) == 1
