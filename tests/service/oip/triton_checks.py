"""Run by tests/service/test_oip.py in its own interpreter: the real Triton client against a
vaegan server. tritonclient registers its own ``inference`` protobuf package, which would clash
with the service's in one process, so the checks run here and print what they saw as JSON.

    python tests/service/oip/triton_checks.py HOST:PORT MODEL VERSION IMAGES.npy HOST:HTTP_PORT
"""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import tritonclient.grpc as tc
from PIL import Image
from tritonclient.utils import InferenceServerException


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _input(name: str, data: np.ndarray, datatype: str) -> tc.InferInput:
    inp = tc.InferInput(name, list(data.shape), datatype)
    inp.set_data_from_numpy(data)
    return inp


def _error(fn) -> list[str]:
    try:
        fn()
    except InferenceServerException as e:
        return [str(e.status()), str(e.message())]
    return ["OK", ""]


def http_checks(url: str, model: str, images: np.ndarray) -> dict:
    """The same through tritonclient.http (binary data extension and plain JSON)."""
    import tritonclient.http as th

    c = th.InferenceServerClient(url)
    out: dict = {
        "live": c.is_server_live(), "ready": c.is_server_ready(), "model_ready": c.is_model_ready(model),
        "other_ready": c.is_model_ready("other"), "server_metadata": c.get_server_metadata(),
        "model_metadata": c.get_model_metadata(model),
    }
    for binary in (True, False):
        inp = th.InferInput("IMAGES", list(images.shape), "UINT8")
        inp.set_data_from_numpy(images, binary_data=binary)
        outs = [th.InferRequestedOutput(n, binary_data=binary) for n in ("SCORE", "IS_OUTLIER", "COMPONENTS", "ANOMALY_MAP")]
        r = c.infer(model, [inp], outputs=outs, request_id="h-1")
        key = "binary" if binary else "json"
        out[key] = {n: r.as_numpy(n).tolist() for n in ("SCORE", "IS_OUTLIER", "COMPONENTS", "ANOMALY_MAP")}
        out[key + "_id"] = r.get_response()["id"]
    files = np.array([_png(a) for a in images], dtype=np.object_)
    inp = th.InferInput("IMAGES", [len(files)], "BYTES")
    inp.set_data_from_numpy(files, binary_data=True)
    r = c.infer(model, [inp], outputs=[th.InferRequestedOutput("SCORE"), th.InferRequestedOutput("REPAIRED", binary_data=True)])
    out["bytes_score"] = r.as_numpy("SCORE").tolist()
    out["repaired_shapes"] = [list(np.asarray(Image.open(io.BytesIO(b))).shape) for b in r.as_numpy("REPAIRED")]
    masks = np.zeros(images.shape[:3], np.uint8)
    masks[:, 10:20, 15:30] = 1
    inp = th.InferInput("IMAGES", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    mask_in = th.InferInput("MASKS", list(masks.shape), "UINT8")
    mask_in.set_data_from_numpy(masks)
    r = c.infer(model, [inp, mask_in], outputs=[th.InferRequestedOutput("INPAINTED", binary_data=True)])
    out["inpainted"] = [np.asarray(Image.open(io.BytesIO(b))).tolist() for b in r.as_numpy("INPAINTED")]
    bad = th.InferInput("IMAGES", [1, 4, 4, 5], "UINT8")
    bad.set_data_from_numpy(np.zeros((1, 4, 4, 5), np.uint8))
    out["errors"] = {
        "five_channels": _error(lambda: c.infer(model, [bad])),
        "unknown_model": _error(lambda: c.infer("other", [bad])),
    }
    c.close()
    return out


def main(url: str, model: str, version: str, images_path: str, http_url: str) -> dict:
    images = np.load(images_path)  # (N, H, W, 3) uint8
    c = tc.InferenceServerClient(url)
    out: dict = {
        "live": c.is_server_live(),
        "ready": c.is_server_ready(),
        "model_ready": c.is_model_ready(model),
        "model_version_ready": c.is_model_ready(model, version),
        "other_ready": c.is_model_ready("other"),
        "bad_version_ready": c.is_model_ready(model, "999"),
        "server_metadata": c.get_server_metadata(as_json=True),
        "model_metadata": c.get_model_metadata(model, as_json=True),
        "unknown_metadata": _error(lambda: c.get_model_metadata("no-such-model")),
    }
    names = ("SCORE", "IS_OUTLIER", "TAIL_PROBABILITY", "COMPONENTS", "ANOMALY_MAP", "RECONSTRUCTION")
    r = c.infer(model, [_input("IMAGES", images, "UINT8")], outputs=[tc.InferRequestedOutput(n) for n in names],
                request_id="r-1")
    out["uint8"] = {n: r.as_numpy(n).tolist() for n in names}
    out["uint8_dtypes"] = {n: str(r.as_numpy(n).dtype) for n in names}
    out["uint8_id"] = r.get_response().id
    files = np.array([_png(a) for a in images], dtype=np.object_)
    r = c.infer(model, [_input("IMAGES", files, "BYTES")], outputs=[tc.InferRequestedOutput("SCORE"), tc.InferRequestedOutput("REPAIRED")])
    out["bytes_score"] = r.as_numpy("SCORE").tolist()
    out["repaired_shapes"] = [list(np.asarray(Image.open(io.BytesIO(b))).shape) for b in r.as_numpy("REPAIRED")]
    r = c.infer(model, [_input("IMAGES", np.ascontiguousarray(images[:1, :, :, 0]), "UINT8")])
    out["default_outputs"] = [o.name for o in r.get_response().outputs]
    out["grey_score"] = r.as_numpy("SCORE").tolist()
    x = _input("IMAGES", images, "UINT8")
    masks = np.zeros(images.shape[:3], np.uint8)
    masks[:, 10:20, 15:30] = 1
    r = c.infer(model, [_input("IMAGES", images, "UINT8"), _input("MASKS", masks, "UINT8")])
    out["inpaint_outputs"] = [o.name for o in r.get_response().outputs]
    out["inpainted"] = [np.asarray(Image.open(io.BytesIO(b))).tolist() for b in r.as_numpy("INPAINTED")]
    out["errors"] = {
        "inpainted_without_masks": _error(lambda: c.infer(model, [x], outputs=[tc.InferRequestedOutput("INPAINTED")])),
        "mask_size": _error(lambda: c.infer(model, [x, _input("MASKS", np.zeros((3, 8, 8), np.uint8), "UINT8")])),
        "fp32": _error(lambda: c.infer(model, [_input("IMAGES", np.zeros((1, 4, 4, 3), np.float32), "FP32")])),
        "wrong_name": _error(lambda: c.infer(model, [_input("PIXELS", np.zeros((1, 4, 4, 3), np.uint8), "UINT8")])),
        "five_channels": _error(lambda: c.infer(model, [_input("IMAGES", np.zeros((1, 4, 4, 5), np.uint8), "UINT8")])),
        "not_an_image": _error(lambda: c.infer(model, [_input("IMAGES", np.array([b"not an image"], dtype=np.object_), "BYTES")])),
        "unknown_model": _error(lambda: c.infer("other", [x])),
        "unknown_version": _error(lambda: c.infer(model, [x], model_version="999")),
        "unknown_output": _error(lambda: c.infer(model, [x], outputs=[tc.InferRequestedOutput("LOGITS")])),
    }
    c.close()
    out["http"] = http_checks(http_url, model, images)
    out["http_inpainted"] = out["http"]["inpainted"]
    return out


if __name__ == "__main__":
    result = main(*sys.argv[1:6])
    print(json.dumps(result, default=lambda o: f"<unserializable {type(o).__name__}: {o!r:.300}>"))
