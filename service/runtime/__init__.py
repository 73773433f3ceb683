"""The serving runtime: bundle loading, preprocessing, scoring, calibration, inpainting.

Numpy, Pillow and onnxruntime only: never torch. The names below are imported on first use,
so that a light submodule (``service.runtime.preprocess``, which batch-scoring decode workers
import) does not pull in ONNX Runtime and ``onnx``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vaegan.service.lazy import lazy_attributes

if TYPE_CHECKING:
    from vaegan.service.runtime.bundle import Bundle, load_bundle
    from vaegan.service.runtime.errors import (
        BundleError,
        InvalidInput,
        ModelNotReady,
        ResourceExhausted,
        ServiceError,
    )
    from vaegan.service.runtime.preprocess import ImageSpec
    from vaegan.service.runtime.runtime import Forward, Runtime, ScoreResult
    from vaegan.service.runtime.scoring import COMPONENTS, Calibration

# public name -> the submodule that defines it
_WHERE = {
    "Bundle": "bundle",
    "load_bundle": "bundle",
    "BundleError": "errors",
    "InvalidInput": "errors",
    "ModelNotReady": "errors",
    "ResourceExhausted": "errors",
    "ServiceError": "errors",
    "ImageSpec": "preprocess",
    "Forward": "runtime",
    "Runtime": "runtime",
    "ScoreResult": "runtime",
    "COMPONENTS": "scoring",
    "Calibration": "scoring",
}

__all__ = [
    "COMPONENTS",
    "Bundle",
    "BundleError",
    "Calibration",
    "Forward",
    "ImageSpec",
    "InvalidInput",
    "ModelNotReady",
    "ResourceExhausted",
    "Runtime",
    "ScoreResult",
    "ServiceError",
    "load_bundle",
]


__getattr__ = lazy_attributes(__name__, _WHERE)
