"""Input regions, sizes, conversions and input-size anomaly maps over real gRPC and the client."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
from vaegan.protos.vaegan.v1 import outlier_service_pb2_grpc as pb_grpc
from vaegan.service.client import OutlierClient
from vaegan.service.runtime import Runtime, load_bundle
from vaegan.service.server.codec import array_to_tensor, decode_output
from vaegan.service.server.config import ServiceConfig
from vaegan.service.server.testing import ServerThread


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def rt_crop(tiny_bundle: Path) -> Runtime:
    """The tiny bundle's graphs with the center_crop policy, so regions are real boxes."""
    bundle = load_bundle(tiny_bundle)
    return Runtime(dataclasses.replace(bundle, spec=dataclasses.replace(bundle.spec, resize="center_crop")), providers="cpu")


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, rt_crop: Runtime) -> Iterator[ServerThread]:
    cfg = ServiceConfig(model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1, max_batch_size=8)
    with ServerThread(cfg, rt_crop) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.OutlierServiceStub]:
    with grpc.insecure_channel(server.target) as ch:
        yield pb_grpc.OutlierServiceStub(ch)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, (32, 64, 3), dtype=np.uint8),  # wide
        rng.integers(0, 256, (48, 20), dtype=np.uint8),  # tall, grey
        rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),  # at model size
    ]


def test_score_returns_regions_sizes_conversions_and_input_size_maps(stub, rt_crop: Runtime, images) -> None:
    req = pb.ScoreRequest(
        images=[pb.Image(id="wide", encoded=png(images[0])), pb.Image(id="tall", tensor=array_to_tensor(images[1])),
                pb.Image(id="square", tensor=array_to_tensor(images[2]))],
        options=pb.ScoreOptions(return_anomaly_map=True, anomaly_map_input_size=True, image_format=pb.IMAGE_FORMAT_RAW),
    )
    resp = stub.Score(req)
    ref = rt_crop.score(images)
    assert ref.regions.tolist() == [[0, 16, 32, 32], [14, 0, 20, 20], [0, 0, 32, 32]]
    for i, (r, img) in enumerate(zip(resp.results, images, strict=True)):
        assert (r.region.top, r.region.left, r.region.height, r.region.width) == tuple(ref.regions[i])
        assert (r.input_height, r.input_width) == img.shape[:2]
        assert r.conversion == ref.conversions[i]
        amap = decode_output(r.anomaly_map)
        assert amap.dtype == np.float32 and amap.shape == img.shape[:2]
        np.testing.assert_allclose(amap, ref.map_at_input(i), atol=1e-5)
    assert [r.conversion for r in resp.results] == ["", "grey->rgb", ""]
    assert (decode_output(resp.results[0].anomaly_map)[:, :16] == 0).all()  # never scored


def test_model_size_maps_stay_the_default(stub, rt_crop: Runtime, images) -> None:
    req = pb.ScoreRequest(images=[pb.Image(encoded=png(images[0]))], options=pb.ScoreOptions(return_anomaly_map=True))
    r = stub.Score(req).results[0]
    amap = decode_output(r.anomaly_map)
    assert amap.shape == (32, 32) and amap.dtype == np.uint8  # PNG at model resolution
    assert (r.input_height, r.input_width) == (32, 64) and r.region.left == 16
    req.options.anomaly_map_input_size = True
    assert decode_output(stub.Score(req).results[0].anomaly_map).shape == (32, 64)  # PNG too


def test_raw_fast_path_reports_model_size(stub, images) -> None:
    req = pb.ScoreRequest(images=[pb.Image(tensor=array_to_tensor(images[2]))])  # on the event loop
    r = stub.Score(req).results[0]
    assert (r.input_height, r.input_width, r.conversion) == (32, 32, "")
    assert (r.region.top, r.region.left, r.region.height, r.region.width) == (0, 0, 32, 32)


def test_repair_over_grpc_stays_inside_the_region(stub, images) -> None:
    req = pb.ScoreRequest(images=[pb.Image(encoded=png(images[0]))],
                          options=pb.ScoreOptions(return_repaired=True, image_format=pb.IMAGE_FORMAT_RAW))
    r = stub.Score(req).results[0]
    fixed, mask = decode_output(r.repaired), decode_output(r.repair_mask) > 0
    assert mask[:, 16:48].any() and not mask[:, :16].any() and not mask[:, 48:].any()
    np.testing.assert_array_equal(fixed[:, :16], images[0][:, :16])
    np.testing.assert_array_equal(fixed[:, 48:], images[0][:, 48:])


def test_client_exposes_geometry_and_sends_16bit_pil_images(server: ServerThread, rt_crop: Runtime, images) -> None:
    ramp = (np.linspace(0, 65535, 40 * 24).reshape(40, 24)).astype(np.uint16)
    pil16 = Image.fromarray(ramp)  # mode I;16: sent losslessly, decoded by the server's rules
    with OutlierClient(server.target, timeout=30) as client:
        results = client.score([images[0], pil16], anomaly_maps=True, anomaly_map_input_size=True)
        assert client.model_info().resize == "center_crop"
    ref = rt_crop.score([images[0], np.rint(ramp / 257.0).astype(np.uint8)])
    np.testing.assert_allclose([r.score for r in results], ref.score, rtol=1e-5, atol=1e-6)
    assert results[0].region == (0, 16, 32, 32) and results[0].input_size == (32, 64)
    assert results[1].input_size == (40, 24) and results[1].conversion == "grey->rgb"
    assert results[1].anomaly_map is not None and results[1].anomaly_map.shape == (40, 24)
    np.testing.assert_allclose(results[1].anomaly_map, ref.map_at_input(1), atol=1e-5)
