"""ONNX Runtime sessions: provider selection and one wrapper per graph."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.runtime.errors import BundleError

__all__ = ["PROVIDER_ALIASES", "Graph", "cuda_driver_present", "resolve_providers"]

logger = logging.getLogger(__name__)

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
            return PROVIDER_ALIASES["cuda"]
        return PROVIDER_ALIASES["cpu"]
    if choice not in PROVIDER_ALIASES:
        raise ValueError(f"providers must be auto, cpu, cuda or tensorrt, got {choice!r}")
    wanted = PROVIDER_ALIASES[choice]
    if wanted[0] not in available:
        raise ValueError(f"{wanted[0]} is not in this onnxruntime build (has {available})")
    return wanted


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
