"""The Open Inference Protocol over gRPC: a real server subprocess, the real Triton client.

tritonclient registers its own ``inference`` protobuf package, which clashes with the service's
in one process; so the client runs in a subprocess of its own (``oip/triton_checks.py``, which
prints what it saw as JSON) and this module compares that with ``vaegan.v1`` Score."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from vaegan.protos.inference.v2 import grpc_predict_v2_pb2 as oip
from vaegan.protos.inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
from vaegan.protos.vaegan.v1 import outlier_service_pb2_grpc as pb_grpc
from vaegan.service.server.codec import array_to_tensor, decode_output
from vaegan.service.server.oip import pack_bytes, unpack_bytes

REPO = Path(__file__).resolve().parents[2]
HAVE_TRITON = importlib.util.find_spec("tritonclient") is not None


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    d = tmp_path_factory.mktemp("oip")
    ready = d / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vaegan.service.server", "--model", str(tiny_bundle), "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "-1", "--http-port", "0", "--providers", "cpu", "--ready-file", str(ready),
         "--log-level", "WARNING"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert proc.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.05)
        manifest = json.loads((tiny_bundle / "manifest.json").read_text())
        ports = json.loads(ready.read_text())
        yield {"url": f"127.0.0.1:{ports['port']}", "http": f"127.0.0.1:{ports['http_port']}",
               "name": manifest["name"], "version": str(manifest["version"]), "dir": d}
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 40, 52, 3), dtype=np.uint8)  # not the model's size


@pytest.fixture(scope="module")
def seen(server: dict, images: np.ndarray) -> dict:
    """What tritonclient saw (run once, in its own interpreter)."""
    if not HAVE_TRITON:
        pytest.skip("tritonclient is not installed (pip install -e '.[dev]')")
    path = server["dir"] / "images.npy"
    np.save(path, images)
    out = subprocess.run(
        [sys.executable, str(REPO / "tests/service/oip/triton_checks.py"), server["url"], server["name"],
         server["version"], str(path), server["http"]],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def _score(url: str, batch: np.ndarray, **options: bool) -> list[pb.ImageScore]:
    """The same images through the service's own protocol."""
    req = pb.ScoreRequest(images=[pb.Image(id=str(i), tensor=array_to_tensor(a)) for i, a in enumerate(batch)],
                          options=pb.ScoreOptions(image_format=pb.IMAGE_FORMAT_RAW, **options))
    with grpc.insecure_channel(url) as ch:
        return list(pb_grpc.OutlierServiceStub(ch).Score(req, timeout=30).results)


def test_health_and_metadata(seen: dict, server: dict) -> None:
    assert seen["live"] and seen["ready"] and seen["model_ready"] and seen["model_version_ready"]
    assert seen["other_ready"] is False and seen["bad_version_ready"] is False
    assert seen["server_metadata"]["name"] == "vaegan"
    meta = seen["model_metadata"]
    assert meta["name"] == server["name"] and meta["versions"] == [server["version"]]
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("IMAGES", "UINT8"), ("MASKS", "UINT8")]
    outputs = {o["name"]: (o["datatype"], [int(s) for s in o["shape"]]) for o in meta["outputs"]}
    assert outputs["SCORE"] == ("FP32", [-1]) and outputs["IS_OUTLIER"] == ("BOOL", [-1])
    assert outputs["COMPONENTS"] == ("FP32", [-1, 5])  # pixel, feature, disc, pixel_local, disc_local
    assert seen["unknown_metadata"][0] == "StatusCode.NOT_FOUND" and "not served here" in seen["unknown_metadata"][1]


def test_uint8_infer_equals_vaegan_v1_score(seen: dict, server: dict, images: np.ndarray) -> None:
    ref = _score(server["url"], images, return_anomaly_map=True, return_reconstruction=True)
    got = seen["uint8"]
    np.testing.assert_allclose(got["SCORE"], [r.score for r in ref], rtol=1e-6, atol=1e-6)
    assert got["IS_OUTLIER"] == [r.is_outlier for r in ref]
    np.testing.assert_allclose(got["TAIL_PROBABILITY"], [r.tail_probability for r in ref], rtol=1e-6, atol=1e-7)
    order = ("pixel", "feature", "disc", "pixel_local", "disc_local")
    expected = [[getattr(r.components, c) for c in order] for r in ref]
    np.testing.assert_allclose(got["COMPONENTS"], expected, rtol=1e-6)
    np.testing.assert_allclose(got["ANOMALY_MAP"], np.stack([decode_output(r.anomaly_map) for r in ref]), rtol=1e-6)
    recon = np.stack([decode_output(r.reconstruction) for r in ref])
    recon = recon[..., None] if recon.ndim == 3 else recon
    assert np.array_equal(np.asarray(got["RECONSTRUCTION"], np.uint8), recon)
    assert seen["uint8_dtypes"] == {"SCORE": "float32", "IS_OUTLIER": "bool", "TAIL_PROBABILITY": "float32",
                                    "COMPONENTS": "float32", "ANOMALY_MAP": "float32", "RECONSTRUCTION": "uint8"}
    assert seen["uint8_id"] == "r-1"


def test_bytes_infer_of_encoded_files_and_repairs(seen: dict, server: dict, images: np.ndarray) -> None:
    ref = _score(server["url"], images)  # PNG is lossless: the same pixels
    np.testing.assert_allclose(seen["bytes_score"], [r.score for r in ref], rtol=1e-6, atol=1e-6)
    assert seen["repaired_shapes"][0][:2] == [40, 52]  # repaired at the input's own size


def test_grey_input_and_default_outputs(seen: dict, server: dict, images: np.ndarray) -> None:
    assert seen["default_outputs"] == ["SCORE", "IS_OUTLIER", "TAIL_PROBABILITY", "COMPONENTS"]
    ref = _score(server["url"], np.ascontiguousarray(images[:1, :, :, 0]))
    np.testing.assert_allclose(seen["grey_score"], [r.score for r in ref], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        ("fp32", "INVALID_ARGUMENT", "input 'IMAGES': datatype must be UINT8"),
        ("wrong_name", "INVALID_ARGUMENT", "expected 'IMAGES' and optionally 'MASKS', got ['PIXELS']"),
        ("inpainted_without_masks", "INVALID_ARGUMENT", "output 'INPAINTED' needs the input 'MASKS'"),
        ("mask_size", "INVALID_ARGUMENT", "mask 0: mask is 8x8 but its image is 40x52"),
        ("five_channels", "INVALID_ARGUMENT", "C 1 or 3, got [1, 4, 4, 5]"),
        ("not_an_image", "INVALID_ARGUMENT", "image 0: cannot decode image bytes"),
        ("unknown_model", "NOT_FOUND", "model 'other' is not served here"),
        ("unknown_version", "NOT_FOUND", "no version '999'"),
        ("unknown_output", "INVALID_ARGUMENT", "unknown output 'LOGITS'"),
    ],
)
def test_bad_requests_get_a_status_naming_the_tensor(seen: dict, case: str, status: str, message: str) -> None:
    got_status, got_message = seen["errors"][case]
    assert got_status == f"StatusCode.{status}", (case, got_status, got_message)
    assert message in got_message, (case, got_message)


def test_raw_bytes_that_do_not_match_the_shape(server: dict) -> None:
    """tritonclient checks shapes itself, so this is sent with the plain stub."""
    req = oip.ModelInferRequest(
        model_name=server["name"],
        inputs=[oip.ModelInferRequest.InferInputTensor(name="IMAGES", datatype="UINT8", shape=[2, 8, 8, 3])],
        raw_input_contents=[bytes(100)],
    )
    with grpc.insecure_channel(server["url"]) as ch:
        stub = oip_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'IMAGES': shape [2, 8, 8, 3] needs 384 bytes, raw contents have 100" in err.value.details()
        # typed contents (no raw bytes) work too
        typed = oip.ModelInferRequest(model_name=server["name"], inputs=[oip.ModelInferRequest.InferInputTensor(
            name="IMAGES", datatype="UINT8", shape=[1, 8, 8, 3],
            contents=oip.InferTensorContents(uint_contents=[7] * 192))])
        resp = stub.ModelInfer(typed, timeout=30)
        assert [o.name for o in resp.outputs] == ["SCORE", "IS_OUTLIER", "TAIL_PROBABILITY", "COMPONENTS"]
        (score,) = np.frombuffer(resp.raw_output_contents[0], "<f4")
        (ref,) = _score(server["url"], np.full((1, 8, 8, 3), 7, np.uint8))
        assert abs(float(score) - ref.score) < 1e-5


def test_bytes_tensor_packing_round_trips_and_refuses_bad_lengths() -> None:
    items = [b"", b"abc", bytes(300)]
    assert unpack_bytes(pack_bytes(items), 3, "x") == items
    from vaegan.service.runtime import InvalidInput

    with pytest.raises(InvalidInput, match="element 1 declares 3 bytes, only 2 remain"):
        unpack_bytes(pack_bytes(items)[:10], 3, "x")
    with pytest.raises(InvalidInput, match="bytes left after the 2 elements"):
        unpack_bytes(pack_bytes(items), 2, "x")


# ---- over HTTP/REST -------------------------------------------------------------------------------
def test_http_health_metadata_and_infer_equal_grpc(seen: dict, server: dict, images: np.ndarray) -> None:
    h = seen["http"]
    assert h["live"] and h["ready"] and h["model_ready"] and h["other_ready"] is False
    assert h["server_metadata"]["name"] == "vaegan"
    http_outputs = [(o["name"], o["datatype"], [int(x) for x in o["shape"]]) for o in h["model_metadata"]["outputs"]]
    grpc_outputs = [(o["name"], o["datatype"], [int(x) for x in o["shape"]]) for o in seen["model_metadata"]["outputs"]]
    assert http_outputs == grpc_outputs
    ref = _score(server["url"], images, return_anomaly_map=True)
    for key in ("binary", "json"):  # the binary data extension and plain JSON tensors
        got = h[key]
        np.testing.assert_allclose(got["SCORE"], [r.score for r in ref], rtol=1e-6, atol=1e-6)
        assert got["IS_OUTLIER"] == [r.is_outlier for r in ref]
        np.testing.assert_allclose(got["COMPONENTS"], seen["uint8"]["COMPONENTS"], rtol=1e-6)
        np.testing.assert_allclose(got["ANOMALY_MAP"], seen["uint8"]["ANOMALY_MAP"], rtol=1e-6)
        assert h[key + "_id"] == "h-1"
    np.testing.assert_allclose(h["bytes_score"], seen["bytes_score"], rtol=1e-6)
    assert h["repaired_shapes"] == seen["repaired_shapes"]
    assert h["errors"]["five_channels"][0] == "400" and "C 1 or 3" in h["errors"]["five_channels"][1]
    assert h["errors"]["unknown_model"][0] == "404"


def _http(server: dict, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://{server['http']}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_http_json_infer_and_errors_name_the_tensor(server: dict) -> None:
    name = server["name"]
    data = [[[[7, 7, 7]] * 8] * 8]  # nested lists are accepted, as flat ones
    body = {"id": "j", "inputs": [{"name": "IMAGES", "datatype": "UINT8", "shape": [1, 8, 8, 3], "data": data}]}
    status, headers, raw = _http(server, "POST", f"/v2/models/{name}/infer", json.dumps(body).encode())
    assert status == 200, raw
    doc = json.loads(raw)
    assert [o["name"] for o in doc["outputs"]] == ["SCORE", "IS_OUTLIER", "TAIL_PROBABILITY", "COMPONENTS"]
    (ref,) = _score(server["url"], np.full((1, 8, 8, 3), 7, np.uint8))
    assert abs(doc["outputs"][0]["data"][0] - ref.score) < 1e-5 and doc["id"] == "j"
    cases = [
        (b"{not json", None, 400, "not valid JSON"),
        (json.dumps({"inputs": [{"name": "IMAGES", "datatype": "UINT8", "shape": [1, 2, 2], "data": [1, 2, 3]}]}).encode(),
         None, 400, "shape [1, 2, 2] needs 4 values, the contents have 3"),
        (json.dumps({"inputs": [{"name": "IMAGES", "datatype": "UINT8", "shape": [1, 2, 2], "data": [1, 2, 3, 300]}]}).encode(),
         None, 400, "outside 0..255"),
        (json.dumps({"inputs": [{"name": "IMAGES", "datatype": "UINT8", "shape": [1, 2, 2],
                                 "parameters": {"binary_data_size": 4}}]}).encode() + b"\0\0",
         "bin", 400, "binary_data_size is 4, but 2 bytes follow"),
        (json.dumps({"inputs": []}).encode(), None, 400, "expected 'IMAGES' and optionally 'MASKS'"),
    ]
    for payload, kind, code, message in cases:
        headers = {}
        if kind == "bin":
            headers = {"Inference-Header-Content-Length": str(payload.index(b"\0"))}
        status, _, raw = _http(server, "POST", f"/v2/models/{name}/infer", payload, headers)
        assert status == code and message in json.loads(raw)["error"], (status, raw)
    assert _http(server, "POST", "/v2/models/other/infer", json.dumps(body).encode())[0] == 404
    assert _http(server, "GET", f"/v2/models/{name}/versions/999/ready")[0] == 503
    assert _http(server, "GET", "/v2/health/ready")[0] == 200
    status, _, raw = _http(server, "POST", "/v2/repository/index", b"{}")
    assert status == 200 and json.loads(raw) == [{"name": name, "version": server["version"], "state": "READY", "reason": ""}]


def test_http_needs_the_token_except_for_health(tiny_bundle: Path, tmp_path: Path) -> None:
    from vaegan.service.runtime import Runtime
    from vaegan.service.server.auth import hash_token
    from vaegan.service.server.config import ServiceConfig
    from vaegan.service.server.testing import ServerThread

    tokens = tmp_path / "tokens.txt"
    tokens.write_text(hash_token("tok") + "\n")
    cfg = ServiceConfig(model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1, http_port=0, auth_tokens_file=tokens)
    with ServerThread(cfg, Runtime.load(tiny_bundle, providers="cpu")) as srv:
        server = {"http": f"127.0.0.1:{srv.ports.http}"}
        name = srv.server.runtime.bundle.name
        body = json.dumps({"inputs": [{"name": "IMAGES", "datatype": "UINT8", "shape": [1, 2, 2], "data": [1, 2, 3, 4]}]}).encode()
        assert _http(server, "GET", "/v2/health/ready")[0] == 200
        assert _http(server, "GET", f"/v2/models/{name}/ready")[0] == 200
        status, _, raw = _http(server, "POST", f"/v2/models/{name}/infer", body)
        assert status == 401 and "bearer token" in json.loads(raw)["error"]
        assert _http(server, "POST", f"/v2/models/{name}/infer", body, {"Authorization": "Bearer nope"})[0] == 401
        assert _http(server, "POST", f"/v2/models/{name}/infer", body, {"Authorization": "Bearer tok"})[0] == 200
        assert _http(server, "GET", f"/v2/models/{name}")[0] == 401


def test_masks_inpaint_over_grpc_and_http_as_vaegan_v1_inpaint(seen: dict, server: dict, images: np.ndarray) -> None:
    """MASKS (UINT8 [N, H, W]) with the INPAINTED output: the vaegan.v1 Inpaint answer, known
    pixels unchanged, over both protocols."""
    masks = np.zeros(images.shape[:3], np.uint8)
    masks[:, 10:20, 15:30] = 1
    req = pb.InpaintRequest(images=[pb.Image(tensor=array_to_tensor(a)) for a in images],
                            masks=[pb.Image(tensor=array_to_tensor(m)) for m in masks])
    with grpc.insecure_channel(server["url"]) as ch:
        ref = [decode_output(r.image) for r in pb_grpc.OutlierServiceStub(ch).Inpaint(req, timeout=60).results]
    for key in ("inpainted", "http_inpainted"):
        got = [np.asarray(x, np.uint8) for x in seen[key]]
        assert len(got) == 3
        for g, r, img, m in zip(got, ref, images, masks, strict=True):
            assert np.array_equal(g, r)
            assert np.array_equal(g[m == 0], img[m == 0])  # known pixels unchanged
    assert seen["inpaint_outputs"] == ["SCORE", "IS_OUTLIER", "TAIL_PROBABILITY", "COMPONENTS", "INPAINTED"]
