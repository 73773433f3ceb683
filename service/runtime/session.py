"""ONNX Runtime sessions: provider selection and one wrapper per graph."""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

# Without this, every session start writes ~/.cache/Microsoft/DeveloperTools/.onnxruntime/
# (a device id and a database) and $TMPDIR/.ses: a server must write nothing it was not asked to.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort  # noqa: E402 - after the variable above

from vaegan.service.runtime.errors import BundleError

__all__ = ["PROVIDER_ALIASES", "Graph", "check_provider_started", "cuda_driver_present", "resolve_providers"]

GPU_INSTALL = "pip install 'vaegan[gpu]' (see the README's GPU install)"

logger = logging.getLogger(__name__)

if hasattr(ort, "disable_telemetry_events"):  # no usage events leave the machine (Windows builds send them)
    ort.disable_telemetry_events()

PROVIDER_ALIASES = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def cuda_driver_present() -> bool:
    """True when the NVIDIA driver library loads (a GPU machine); asked before CUDA is tried."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def resolve_providers(choice: str) -> list[str]:
    """``auto|cpu|cuda|tensorrt`` -> ONNX Runtime provider list, best first.

    ``auto`` asks for CUDA only when the build has it *and* the driver loads, so CPU machines
    never see ONNX Runtime's loud CUDA load errors. An explicit ``cuda``/``tensorrt`` that is
    not in this build raises.
    """
    choice = choice.lower()
    available = ort.get_available_providers()
    if choice == "auto":
        if "CUDAExecutionProvider" in available and cuda_driver_present():
            _preload_cuda_libraries()
            return PROVIDER_ALIASES["cuda"]
        return PROVIDER_ALIASES["cpu"]
    if choice not in PROVIDER_ALIASES:
        raise ValueError(f"providers must be auto, cpu, cuda or tensorrt, got {choice!r}")
    wanted = PROVIDER_ALIASES[choice]
    if wanted[0] not in available:
        raise ValueError(f"--providers {choice}: {_why_no_gpu_build(wanted[0])}")
    if choice != "cpu":
        if not cuda_driver_present():
            raise ValueError(f"--providers {choice}: no NVIDIA driver on this machine (libcuda.so.1 does not load)")
        _preload_cuda_libraries()
    return wanted


def _installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def _why_no_gpu_build(provider: str) -> str:
    """Why ``provider`` is not in the onnxruntime that Python imported, and the fix."""
    if _installed("onnxruntime-gpu") and _installed("onnxruntime"):
        return (f"{provider} is missing because both onnxruntime (CPU) and onnxruntime-gpu are installed and the "
                "CPU build's files won; keep only the GPU one: pip uninstall -y onnxruntime onnxruntime-gpu && "
                "pip install 'onnxruntime-gpu[cuda,cudnn]==" + ort.__version__ + "'")
    return f"{provider} is not in this onnxruntime build (the CPU one); {GPU_INSTALL}"


def _preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the NVIDIA wheels of the gpu extra, where they are installed, so
    ONNX Runtime finds them without LD_LIBRARY_PATH (system libraries work too)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as e:  # noqa: BLE001 - best effort: the session start reports what is missing
        logger.debug("onnxruntime.preload_dlls(): %s", e)


def check_provider_started(choice: str, wanted: list[str], started: list[str]) -> None:
    """An explicit ``cuda``/``tensorrt`` that ONNX Runtime could not start (it falls back to
    the CPU with errors in its own log) is an error; ``auto`` falling back is logged."""
    if started and started[0] == wanted[0]:
        return
    if choice.lower() in ("cuda", "tensorrt"):
        raise ValueError(
            f"--providers {choice.lower()}: ONNX Runtime could not start {wanted[0]} and fell back to "
            f"{started[0] if started else 'nothing'} (CUDA or cuDNN libraries missing or mismatched: {GPU_INSTALL})"
        )
    logger.warning("%s could not start; running on %s", wanted[0], started[0] if started else "nothing")


class Graph:
    """One ONNX graph in one InferenceSession, with its declared signature checked on load."""

    def __init__(
        self,
        path: Path,
        signature: dict[str, dict[str, list[int | None]]],
        providers: list[str],
        intra_op_threads: int = 0,
        spin: bool = True,
        model: bytes | None = None,
    ) -> None:
        """``model``: a serialized model to use instead of the file (``path`` then only names
        it in messages, e.g. the pipeline composed in memory)."""
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        if not spin:  # idle ORT threads sleep instead of busy-waiting (shared cores, servers)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            source = str(path) if model is None else model
            self.session = ort.InferenceSession(source, sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises several unrelated types here
            raise BundleError(f"{path}: ONNX Runtime cannot load it ({e})") from e
        self.path = path
        self.providers: list[str] = self.session.get_providers()
        self._check(signature)
        self.input_names = list(signature["inputs"])
        self.output_names = list(signature["outputs"])

    def _check(self, signature: dict[str, dict[str, list[int | None]]]) -> None:
        for kind, metas in (("inputs", self.session.get_inputs()), ("outputs", self.session.get_outputs())):
            found = {m.name: m.shape for m in metas}
            for name, shape in signature[kind].items():
                if name not in found:
                    raise BundleError(f"{self.path}: {kind[:-1]} {name!r} missing (has {list(found)})")
                got = found[name]
                fixed_ok = len(got) == len(shape) and all(
                    s is None or g == s for g, s in zip(got, shape, strict=True)
                )
                if not fixed_ok:
                    raise BundleError(
                        f"{self.path}: {kind[:-1]} {name!r} has shape {got}, manifest says {shape}"
                    )

    def run(self, **feeds: np.ndarray) -> list[Any]:
        return self.session.run(self.output_names, feeds)
