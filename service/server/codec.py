"""numpy <-> ``vaegan.v1.Tensor`` / ``Image`` codec, shared by the server and the client.

Numpy, Pillow and the generated protobuf modules only (no onnxruntime), so that
:mod:`service.client` stays light. Failures raise ``ValueError``; the server's
:mod:`service.server.convert` turns them into ``InvalidInput`` naming the image.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb

__all__ = ["array_to_png", "array_to_tensor", "decode_output", "tensor_to_array"]

_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_UINT8: np.dtype(np.uint8),
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
}


def array_to_tensor(arr: np.ndarray) -> pb.Tensor:
    """uint8 or floating array -> Tensor (floats sent as little-endian float32)."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        dtype = pb.DTYPE_UINT8
    elif np.issubdtype(arr.dtype, np.floating):
        arr, dtype = arr.astype("<f4", copy=False), pb.DTYPE_FLOAT32
    else:
        raise ValueError(f"unsupported dtype {arr.dtype} (send uint8 or float32)")
    return pb.Tensor(shape=arr.shape, dtype=dtype, data=np.ascontiguousarray(arr).tobytes())


def tensor_to_array(t: pb.Tensor) -> np.ndarray:
    """Tensor -> read-only array view of its bytes; checks dtype, shape and byte length."""
    if t.dtype not in _DTYPES:
        raise ValueError(f"tensor dtype must be DTYPE_UINT8 or DTYPE_FLOAT32, got {t.dtype}")
    shape = tuple(int(s) for s in t.shape)
    if not shape or any(s < 0 for s in shape):
        raise ValueError(f"invalid tensor shape {list(shape)}")
    dtype = _DTYPES[t.dtype]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(t.data) != expected:
        raise ValueError(
            f"tensor of shape {list(shape)} and {dtype.name} needs {expected} bytes, got {len(t.data)}"
        )
    return np.frombuffer(t.data, dtype=dtype).reshape(shape)


def array_to_png(arr: np.ndarray) -> bytes:
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> PNG bytes (fast, lossless compression)."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_output(img: pb.Image) -> np.ndarray:
    """A returned picture -> array: raw tensors as sent, PNGs as uint8 (H, W) or (H, W, 3)."""
    kind = img.WhichOneof("data")
    if kind == "tensor":
        return tensor_to_array(img.tensor)
    if kind == "encoded":
        with Image.open(io.BytesIO(img.encoded)) as im:
            return np.asarray(im)
    raise ValueError("the image has no data")
