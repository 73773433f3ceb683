"""The serving runtime: bundle loading, preprocessing, scoring, calibration, inpainting.

Numpy, Pillow and onnxruntime only: never torch.
"""

from service.runtime.bundle import Bundle, load_bundle
from service.runtime.errors import (
    BundleError,
    InvalidInput,
    ModelNotReady,
    ResourceExhausted,
    ServiceError,
)
from service.runtime.preprocess import ImageSpec
from service.runtime.runtime import Forward, Runtime, ScoreResult
from service.runtime.scoring import COMPONENTS, Calibration

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
