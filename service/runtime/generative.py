"""The generator as a generative model: samples from the prior and walks between latent codes.

    z = latent_samples(n, latent_dim, seed, temperature)   # float32 (n, Z), z ~ N(0, t^2 I)
    path = latent_path(mu_a, mu_b, steps, "slerp")          # float32 (steps, Z), both ends included
    images = decode_latents(generator, path, spec, chunk)   # uint8 (steps, H, W, C)

:meth:`Runtime.sample <service.runtime.runtime.Runtime.sample>` and
:meth:`Runtime.interpolate <service.runtime.runtime.Runtime.interpolate>` are thin wrappers
over these; the argument checks raise :class:`InvalidInput` messages that start with the
argument's name, which is also the name of the gRPC request field. Numpy only (the generator
is any object with ``run(z=...)``, a :class:`~service.runtime.session.Graph`).
"""

from __future__ import annotations

import math
import secrets
from typing import Any, Protocol

import numpy as np

from vaegan.service.runtime.errors import InvalidInput
from vaegan.service.runtime.preprocess import ImageSpec, denormalize

__all__ = [
    "DEFAULT_STEPS",
    "MAX_SAMPLES",
    "MAX_STEPS",
    "METHODS",
    "MIN_STEPS",
    "check_method",
    "check_n",
    "check_seed",
    "check_steps",
    "check_temperature",
    "decode_latents",
    "draw_seed",
    "is_int",
    "latent_path",
    "latent_samples",
    "lerp",
    "slerp",
]

MAX_SAMPLES = 1024  # images per sample() call
MIN_STEPS, MAX_STEPS = 2, 256  # images on an interpolation path, both ends included
DEFAULT_STEPS = 8
METHODS = ("linear", "slerp")
# slerp falls back to lerp when sin(angle) between the two codes is below this (parallel or
# opposite codes: the great circle is not defined)
PARALLEL_SIN = 1e-6


class _Generator(Protocol):
    def run(self, **feeds: np.ndarray) -> list[Any]: ...


# ---- argument checks ----------------------------------------------------------------------
def is_int(v: object) -> bool:
    """An int or numpy integer, not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_n(n: int) -> int:
    """``n`` as an int in 1..:data:`MAX_SAMPLES`, else InvalidInput naming it."""
    if not is_int(n) or not 1 <= int(n) <= MAX_SAMPLES:
        raise InvalidInput(f"n must be an integer in 1..{MAX_SAMPLES}, got {n!r}")
    return int(n)


def check_steps(steps: int) -> int:
    """``steps`` as an int in :data:`MIN_STEPS`..:data:`MAX_STEPS`, else InvalidInput."""
    if not is_int(steps) or not MIN_STEPS <= int(steps) <= MAX_STEPS:
        raise InvalidInput(f"steps must be an integer in {MIN_STEPS}..{MAX_STEPS}, got {steps!r}")
    return int(steps)


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else InvalidInput."""
    if method not in METHODS:
        raise InvalidInput(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return str(method)


def check_temperature(temperature: float) -> float:
    """``temperature`` as a finite float > 0, else InvalidInput."""
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        t = math.nan
    if isinstance(temperature, (bool, np.bool_)) or not (math.isfinite(t) and t > 0):
        raise InvalidInput(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def check_seed(seed: int | None) -> int | None:
    """``seed`` as None or an int >= 0 (what numpy's ``default_rng`` takes), else InvalidInput."""
    if seed is None:
        return None
    if not is_int(seed) or int(seed) < 0:
        raise InvalidInput(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def draw_seed() -> int:
    """A fresh random seed (32 bits), for callers that report the seed they used."""
    return secrets.randbits(32)


# ---- latent codes -------------------------------------------------------------------------
def latent_samples(n: int, latent_dim: int, seed: int | None = None, temperature: float = 1.0) -> np.ndarray:
    """float32 (n, latent_dim) draws of N(0, temperature^2 I) from ``default_rng(seed)``.

    The same seed gives the same codes, and a larger ``n`` extends a smaller one (the first
    rows are the same). ``seed=None``: fresh entropy.
    """
    n, t, seed = check_n(n), check_temperature(temperature), check_seed(seed)
    z = np.random.default_rng(seed).standard_normal((n, latent_dim), dtype=np.float32)
    return z if t == 1.0 else z * np.float32(t)


def lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """float64 (T, Z): ``(1 - t) a + t b`` for each t of ``t`` (T,); exact at t = 0 and 1."""
    a64, b64, t64 = (np.asarray(v, np.float64) for v in (a, b, t))
    return (1.0 - t64)[:, None] * a64[None] + t64[:, None] * b64[None]


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """float64 (T, Z): spherical interpolation from ``a`` to ``b`` (Z,) along the great circle
    through them (White 2016), for each t of ``t`` (T,); norms are interpolated with it.

    Falls back to :func:`lerp` when the codes are nearly parallel or opposite (the angle's sine
    below :data:`PARALLEL_SIN`) or one of them is zero.
    """
    a64, b64, t64 = (np.asarray(v, np.float64) for v in (a, b, t))
    na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    if na == 0.0 or nb == 0.0:
        return lerp(a64, b64, t64)
    omega = math.acos(min(1.0, max(-1.0, float(a64 @ b64) / (na * nb))))
    s = math.sin(omega)
    if s < PARALLEL_SIN:
        return lerp(a64, b64, t64)
    wa = np.sin((1.0 - t64) * omega) / s
    wb = np.sin(t64 * omega) / s
    return wa[:, None] * a64[None] + wb[:, None] * b64[None]


def latent_path(a: np.ndarray, b: np.ndarray, steps: int = DEFAULT_STEPS, method: str = "linear") -> np.ndarray:
    """float32 (steps, Z): ``steps`` evenly spaced codes from ``a`` to ``b`` (each (Z,)), both
    included (row 0 is ``a`` and the last row ``b``, exactly)."""
    steps, method = check_steps(steps), check_method(method)
    t = np.linspace(0.0, 1.0, steps)
    walk = lerp if method == "linear" else slerp
    path = walk(a, b, t).astype(np.float32)
    path[0], path[-1] = a, b  # the ends exactly as encoded, whatever the rounding on the way
    return path


# ---- decoding -----------------------------------------------------------------------------
def decode_latents(
    generator: _Generator, z: np.ndarray, spec: ImageSpec, chunk: int, labels: np.ndarray | None = None
) -> np.ndarray:
    """uint8 (N, H, W, C) images G(z) for codes float32 (N, Z), ``chunk`` codes per generator
    call, denormalized as reconstructions are (:func:`~service.runtime.preprocess.denormalize`).
    ``labels``: int64 (N,) classes, for the generator of a conditional bundle."""
    z = np.ascontiguousarray(z, np.float32)
    step = max(1, int(chunk))

    def feeds(i: int) -> dict[str, np.ndarray]:
        part = {"z": z[i : i + step]}
        if labels is not None:
            part["label"] = np.ascontiguousarray(labels[i : i + step], np.int64)
        return part

    parts = [generator.run(**feeds(i))[0] for i in range(0, len(z), step)]
    return denormalize(parts[0] if len(parts) == 1 else np.concatenate(parts), spec)
