"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService``.

Served on the same port as ``vaegan.v1``, so a Triton or KServe client (``tritonclient.grpc``)
can use the service as it would a Triton server. ``ModelInfer`` is a thin translation onto
``vaegan.v1`` Score: the same validation, decode budget, dynamic batcher and scoring, so the
two protocols give identical numbers.

Inputs (one):

- ``IMAGES`` ``UINT8`` ``[N, H, W, C]`` or ``[N, H, W]``: raw pixels, any size (resized by the
  model's policy), C = 1 or 3;
- or ``IMAGES`` ``BYTES`` ``[N]``: encoded image files (PNG, JPEG, ... as ``--image-formats``).

Outputs (the first four when the request names none):

=================== ======== ================= ==========================================
name                datatype shape             what
=================== ======== ================= ==========================================
SCORE               FP32     [N]               calibrated outlier score
IS_OUTLIER          BOOL     [N]               score > threshold
TAIL_PROBABILITY    FP32     [N]               conformal p-value of the score among normals
COMPONENTS          FP32     [N, K]            raw components, in the order of the model's
                                               metadata parameter ``components``
ANOMALY_MAP         FP32     [N, H, W]         at the model's size (H, W of the model)
RECONSTRUCTION      UINT8    [N, H, W, C]      G(mu(x)) at the model's size
REPAIRED            BYTES    [N]               each image repaired, PNG at its input size
INPAINTED           BYTES    [N]               with the optional input MASKS ([N, H, W] UINT8,
                                               non-zero = fill, or BYTES of mask files): each
                                               image inpainted there, PNG at its input size
                                               (a default output when MASKS is sent)
=================== ======== ================= ==========================================

Outputs are returned in ``raw_output_contents`` (as Triton does; tritonclient reads them).
Errors use the service's status mapping: a missing or malformed tensor is INVALID_ARGUMENT
naming it, an unknown model or version NOT_FOUND.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grpc
import numpy as np

from vaegan.protos.inference.v2 import grpc_predict_v2_pb2 as oip
from vaegan.protos.inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
from vaegan.service.runtime import InvalidInput, ModelNotReady
from vaegan.service.runtime.errors import FailedPrecondition, NotFound
from vaegan.service.runtime.scoring import ALL_COMPONENTS
from vaegan.service.server.codec import array_to_png, array_to_tensor, decode_output
from vaegan.service.server.repository import LoadedModel
from vaegan.service.server.servicer import OutlierServicer

__all__ = [
    "INPUT", "OIP_SERVICE", "OUTPUTS", "InferenceServicer", "check_inputs", "pack_bytes", "requested_outputs",
    "tensor_bytes", "tensor_images", "tensor_shape", "unpack_bytes",
]

OIP_SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
INPUT = "IMAGES"
MASKS = "MASKS"  # optional: the pixels to inpaint, one mask per image
DEFAULT_OUTPUTS = ("SCORE", "IS_OUTLIER", "TAIL_PROBABILITY", "COMPONENTS")
SCORE_OUTPUTS = (*DEFAULT_OUTPUTS, "ANOMALY_MAP", "RECONSTRUCTION", "REPAIRED")
OUTPUTS = (*SCORE_OUTPUTS, "INPAINTED")
PLATFORM = "vaegan"
# calls that say whether the server is up: open like gRPC health (probes carry no token)
OPEN_METHODS = frozenset({"ServerLive", "ServerReady", "ModelReady"})


def pack_bytes(items: Sequence[bytes]) -> bytes:
    """A BYTES tensor's raw form: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def unpack_bytes(raw: bytes, count: int, where: str) -> list[bytes]:
    """The ``count`` elements of a raw BYTES tensor (InvalidInput if the bytes do not add up)."""
    out, pos = [], 0
    view = memoryview(raw)
    for i in range(count):
        if pos + 4 > len(raw):
            raise InvalidInput(f"{where}: raw BYTES contents end before element {i} of {count}")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise InvalidInput(f"{where}: element {i} declares {n} bytes, only {len(raw) - pos} remain")
        out.append(bytes(view[pos : pos + n]))
        pos += n
    if pos != len(raw):
        raise InvalidInput(f"{where}: {len(raw) - pos} bytes left after the {count} elements of shape [{count}]")
    return out


def _inputs(request: oip.ModelInferRequest) -> tuple[list[pb.Image], list[pb.Image] | None]:
    """The request's IMAGES (and MASKS, if sent) as vaegan.v1 Images."""
    names = [t.name for t in request.inputs]
    check_inputs(names)
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents: {len(request.raw_input_contents)} entries for {len(request.inputs)} inputs"
        )
    got: dict[str, list[pb.Image]] = {}
    for i, t in enumerate(request.inputs):
        raw = request.raw_input_contents[i] if request.raw_input_contents else None
        got[t.name] = tensor_images(t.datatype, list(t.shape), raw, t.contents.uint_contents, t.contents.bytes_contents, t.name)
    return got[INPUT], got.get(MASKS)


def check_inputs(names: Sequence[str]) -> None:
    if sorted(names) not in ([INPUT], sorted([INPUT, MASKS])):
        raise InvalidInput(
            f"inputs: expected '{INPUT}' and optionally '{MASKS}', got {list(names) or 'none'}"
        )


def tensor_images(
    datatype: str, shape: Sequence[int], raw: bytes | None, values: Sequence[int] = (), items: Sequence[bytes] = (),
    name: str = INPUT,
) -> list[pb.Image]:
    """The IMAGES (or MASKS) tensor, from its raw bytes or typed ``values`` (UINT8) / ``items``
    (BYTES), as vaegan.v1 Images: the one reader for gRPC and HTTP requests."""
    shape = [int(s) for s in shape]
    where = f"input '{name}'"
    if any(s < 0 for s in shape):
        raise InvalidInput(f"{where}: negative dimension in shape {shape}")
    if datatype == "BYTES":
        if len(shape) != 1:
            raise InvalidInput(f"{where}: a BYTES tensor of encoded images has shape [N], got {shape}")
        files = unpack_bytes(raw, shape[0], where) if raw is not None else list(items)
        if len(files) != shape[0]:
            raise InvalidInput(f"{where}: shape {shape} but {len(files)} elements in contents")
        return [pb.Image(encoded=f) for f in files]  # errors name "image <index>" / "mask <index>"
    if datatype == "UINT8":
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
            raise InvalidInput(f"{where}: a UINT8 tensor has shape [N, H, W] or [N, H, W, C] with C 1 or 3, got {shape}")
        count = int(np.prod(shape, dtype=np.int64))
        if raw is not None:
            if len(raw) != count:
                raise InvalidInput(f"{where}: shape {shape} needs {count} bytes, raw contents have {len(raw)}")
            arr = np.frombuffer(raw, np.uint8).reshape(shape)
        else:
            if len(values) != count:
                raise InvalidInput(f"{where}: shape {shape} needs {count} values, the contents have {len(values)}")
            flat = np.asarray(values, np.int64)
            if flat.size and (int(flat.max()) > 255 or int(flat.min()) < 0):
                raise InvalidInput(f"{where}: UINT8 values outside 0..255 in the contents")
            arr = flat.astype(np.uint8).reshape(shape)
        return [pb.Image(tensor=array_to_tensor(a)) for a in arr]
    raise InvalidInput(f"{where}: datatype must be UINT8 (pixels) or BYTES (encoded files), got {datatype!r}")


def requested_outputs(names: Sequence[str], with_masks: bool = False) -> list[str]:
    """The outputs to compute: those named, or the defaults (and INPAINTED when masks came)."""
    names = list(names) or [*DEFAULT_OUTPUTS, *(["INPAINTED"] if with_masks else [])]
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise InvalidInput(f"outputs: unknown output {unknown[0]!r} (this model has {', '.join(OUTPUTS)})")
    return names


class _Output:
    """How one output is built from the vaegan.v1 results."""

    def __init__(self, datatype: str, build: Callable[[Sequence[pb.ImageScore]], np.ndarray | list[bytes]]) -> None:
        self.datatype = datatype
        self.build = build


def _components(model: LoadedModel) -> list[str]:
    """The components every result carries, in the runtime's order (disc_local only with D's
    per-pixel head)."""
    return [c for c in ALL_COMPONENTS if c != "disc_local" or model.runtime.bundle.patch_head]


def tensor_shape(value: np.ndarray | list[bytes]) -> list[int]:
    """An output's shape: [N] for a BYTES list, the array's shape otherwise."""
    return [len(value)] if isinstance(value, list) else list(value.shape)


def tensor_bytes(value: np.ndarray | list[bytes]) -> bytes:
    """An output's raw form (gRPC raw_output_contents, HTTP binary data): little-endian array
    bytes, or length-prefixed elements for BYTES."""
    return pack_bytes(value) if isinstance(value, list) else np.ascontiguousarray(value).tobytes()


def _raw_tensor(name: str, datatype: str, value: np.ndarray | list[bytes]) -> tuple[oip.ModelInferResponse.InferOutputTensor, bytes]:
    tensor = oip.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=tensor_shape(value))
    return tensor, tensor_bytes(value)


class RepositoryControl(Protocol):
    """What loads and unloads models (the server, in explicit model-control mode)."""

    async def load_model(self, name: str) -> None: ...

    async def unload_model(self, name: str) -> None: ...


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """OIP calls onto an :class:`OutlierServicer` (which owns the model and its batcher)."""

    def __init__(self, outlier: OutlierServicer, server_version: str) -> None:
        self.outlier = outlier
        self.server_version = server_version
        self.serving: Callable[[], bool] = lambda: True  # the server says when it stops serving
        self.control: RepositoryControl | None = None  # load/unload (explicit model control)

    def _model(self, name: str, version: str) -> LoadedModel:
        return self.outlier.models.resolve(name, version)

    async def ServerLive(self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self.ready())

    async def ModelReady(self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(ready=self.model_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name="vaegan", version=self.server_version, extensions=[])

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        return self.metadata(request.name, request.version)

    async def ModelInfer(self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext) -> oip.ModelInferResponse:
        self._model(request.model_name, request.model_version)  # an unknown model first, as Triton
        images, masks = _inputs(request)
        model, outputs = await self.infer(
            request.model_name, request.model_version, images, [o.name for o in request.outputs], masks
        )
        response = oip.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
        for name, datatype, value in outputs:
            tensor, raw = _raw_tensor(name, datatype, value)
            response.outputs.append(tensor)
            response.raw_output_contents.append(raw)
        return response

    async def RepositoryIndex(
        self, request: oip.RepositoryIndexRequest, context: grpc.aio.ServicerContext | None
    ) -> oip.RepositoryIndexResponse:
        """Every model version the server has loaded, is loading, or failed to load (and why)."""
        serving = self.serving()
        rows = []
        for name, version, state, reason in self.outlier.models.states():
            if state == "READY" and not serving:
                state, reason = "UNAVAILABLE", "the server is draining or stopped serving"
            if request.ready and state != "READY":
                continue
            rows.append(oip.RepositoryIndexResponse.ModelIndex(name=name, version=version, state=state, reason=reason))
        return oip.RepositoryIndexResponse(models=rows)

    async def RepositoryModelLoad(
        self, request: oip.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext | None
    ) -> oip.RepositoryModelLoadResponse:
        await self._control().load_model(request.model_name)
        return oip.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: oip.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext | None
    ) -> oip.RepositoryModelUnloadResponse:
        await self._control().unload_model(request.model_name)
        return oip.RepositoryModelUnloadResponse()

    def _control(self) -> RepositoryControl:
        if self.control is None:
            raise FailedPrecondition("this server has no model repository (--model-repository) to load from")
        return self.control

    async def infer(
        self, model_name: str, model_version: str, images: list[pb.Image], output_names: Sequence[str],
        masks: list[pb.Image] | None = None,
    ) -> tuple[LoadedModel, list[tuple[str, str, np.ndarray | list[bytes]]]]:
        """Score ``images`` through vaegan.v1 (and inpaint them where ``masks`` say) and build the
        requested outputs: (the model, and (name, datatype, value) per output). Shared by OIP
        over gRPC and over HTTP. The version is held for the whole call: a version switch in
        between does not fail it."""
        names = requested_outputs(output_names, with_masks=masks is not None)
        if "INPAINTED" in names and masks is None:
            raise InvalidInput(f"output 'INPAINTED' needs the input '{MASKS}' (one mask per image)")
        outputs: list[tuple[str, str, np.ndarray | list[bytes]]] = []
        with self.outlier.models.use(model_name, model_version) as model:
            score_names = [n for n in names if n in SCORE_OUTPUTS]
            results: Sequence[pb.ImageScore] = ()
            if score_names:
                score_request = pb.ScoreRequest(
                    images=images,
                    options=pb.ScoreOptions(
                        return_anomaly_map="ANOMALY_MAP" in names,
                        return_reconstruction="RECONSTRUCTION" in names,
                        return_repaired="REPAIRED" in names,
                        image_format=pb.IMAGE_FORMAT_RAW,
                    ),
                )
                results = (await self.outlier._score_with(score_request, model, "ModelInfer")).results
            inpainted: list[bytes] = []
            if "INPAINTED" in names:
                assert masks is not None
                filled = await self.outlier._inpaint_with(
                    pb.InpaintRequest(images=images, masks=masks, image_format=pb.IMAGE_FORMAT_PNG), model
                )
                inpainted = [r.image.encoded for r in filled.results]
        self.outlier.metrics.images.labels("ModelInfer", model.name, model.version).inc(len(images))
        builders = self._outputs(model)
        for n in names:
            if n == "INPAINTED":
                outputs.append((n, "BYTES", inpainted))
            else:
                outputs.append((n, builders[n].datatype, builders[n].build(results)))
        return model, outputs

    def metadata(self, name: str, version: str) -> oip.ModelMetadataResponse:
        model = self._model(name, version)
        rt = model.runtime
        s = rt.spec
        meta = oip.ModelMetadataResponse.TensorMetadata
        k = len(_components(model))
        versions = sorted(self.outlier.models.models.get(model.name, {}), key=lambda v: (len(v), v))
        return oip.ModelMetadataResponse(
            name=model.name, versions=versions, platform=PLATFORM,
            inputs=[
                meta(name=INPUT, datatype="UINT8", shape=[-1, -1, -1, s.channels]),
                meta(name=MASKS, datatype="UINT8", shape=[-1, -1, -1]),  # optional
            ],
            outputs=[
                meta(name="SCORE", datatype="FP32", shape=[-1]),
                meta(name="IS_OUTLIER", datatype="BOOL", shape=[-1]),
                meta(name="TAIL_PROBABILITY", datatype="FP32", shape=[-1]),
                meta(name="COMPONENTS", datatype="FP32", shape=[-1, k]),
                meta(name="ANOMALY_MAP", datatype="FP32", shape=[-1, s.height, s.width]),
                meta(name="RECONSTRUCTION", datatype="UINT8", shape=[-1, s.height, s.width, s.channels]),
                meta(name="REPAIRED", datatype="BYTES", shape=[-1]),
                meta(name="INPAINTED", datatype="BYTES", shape=[-1]),
            ],
        )

    def ready(self) -> bool:
        # explicit model control: ready with no model loaded yet (models come through the API)
        return (bool(self.outlier.models) or self.control is not None) and self.serving()

    def model_ready(self, name: str, version: str) -> bool:
        try:
            self._model(name, version)
        except (ModelNotReady, NotFound, InvalidInput):  # as Triton: not ready, rather than an error
            return False
        return self.serving()

    def _outputs(self, model: LoadedModel) -> dict[str, _Output]:
        comps = _components(model)

        def column(get: Callable[[pb.ImageScore], Any], dtype: Any) -> Callable[[Sequence[pb.ImageScore]], np.ndarray]:
            return lambda rs: np.array([get(r) for r in rs], dtype)

        def components(rs: Sequence[pb.ImageScore]) -> np.ndarray:
            return np.array([[getattr(r.components, c) for c in comps] for r in rs], "<f4").reshape(len(rs), len(comps))

        def pictures(field: str) -> Callable[[Sequence[pb.ImageScore]], np.ndarray]:
            return lambda rs: np.stack([decode_output(getattr(r, field)) for r in rs])

        return {
            "SCORE": _Output("FP32", column(lambda r: r.score, "<f4")),
            "IS_OUTLIER": _Output("BOOL", column(lambda r: r.is_outlier, np.bool_)),
            "TAIL_PROBABILITY": _Output("FP32", column(lambda r: r.tail_probability, "<f4")),
            "COMPONENTS": _Output("FP32", components),
            "ANOMALY_MAP": _Output("FP32", lambda rs: pictures("anomaly_map")(rs).astype("<f4")),
            "RECONSTRUCTION": _Output("UINT8", lambda rs: _nhwc(pictures("reconstruction")(rs))),
            "REPAIRED": _Output("BYTES", lambda rs: [array_to_png(decode_output(r.repaired)) for r in rs]),
        }


def _nhwc(x: np.ndarray) -> np.ndarray:
    return x[..., None] if x.ndim == 3 else x
