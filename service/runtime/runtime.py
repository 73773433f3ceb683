"""The runtime: a verified bundle in three ONNX Runtime sessions, and the public Python API.

    rt = Runtime.load("runs/demo/bundle")
    res = rt.score(images)          # ScoreResult
    recon = rt.reconstruct(images)  # uint8 (N, H, W, C)
    filled = rt.inpaint(images, masks)
    fixed = rt.repair(images)
    samples = rt.sample(16, seed=0)           # uint8 (16, H, W, C) drawn from the prior
    path = rt.interpolate(a, b, steps=8)      # uint8 (8, H, W, C) from G(mu(a)) to G(mu(b))

Numpy and onnxruntime only. The server's dynamic batcher calls :meth:`Runtime.forward_images` on
merged batches and :meth:`Runtime.score_forward` per request.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vaegan.service.runtime import generative
from vaegan.service.runtime.bundle import GRAPHS, Bundle, load_bundle
from vaegan.service.runtime.errors import InvalidInput, ModelNotReady
from vaegan.service.runtime.inpaint import (
    border_offset,
    dilate,
    hole_start,
    mask_to_input,
    mask_to_model,
    prepare_mask,
)
from vaegan.service.runtime.preprocess import (
    ImageLike,
    ImageSpec,
    decode_image,
    denormalize,
    frame_to_input,
    input_region,
    map_to_input,
    match_channels,
    normalize,
    prepare_inputs,
    to_channels,
    to_model_size,
)
from vaegan.service.runtime.scoring import anomaly_map, combined_map, local_maps, raw_components
from vaegan.service.runtime.session import Graph, check_provider_started, resolve_providers

__all__ = ["Forward", "Runtime", "ScoreResult"]

logger = logging.getLogger(__name__)


@dataclass
class Forward:
    """Raw outputs of the three graphs for one normalized batch x (N, C, H, W)."""

    x: np.ndarray  # (N, C, H, W) float32 normalized input
    x_hat: np.ndarray  # (N, C, H, W) float32 reconstruction G(mu(x))
    logit: np.ndarray  # (N, 1) discriminator logit of x
    feat_x: np.ndarray  # (N, F) discriminator features of x
    feat_xhat: np.ndarray  # (N, F) discriminator features of x_hat
    patch: np.ndarray | None = None  # (N, 1, H, W) D's per-pixel logits of x; None: no patch head

    def __getitem__(self, s: slice) -> Forward:
        return Forward(
            self.x[s], self.x_hat[s], self.logit[s], self.feat_x[s], self.feat_xhat[s],
            None if self.patch is None else self.patch[s],
        )

    @classmethod
    def concat(cls, parts: Sequence[Forward]) -> Forward:
        """Concatenate along the batch axis (the inverse of slicing)."""
        if len(parts) == 1:
            return parts[0]
        def cat(name: str) -> Any:
            return None if getattr(parts[0], name) is None else np.concatenate([getattr(p, name) for p in parts])

        return cls(**{f.name: cat(f.name) for f in dataclasses.fields(cls)})


def _no_rows(width: int) -> np.ndarray:
    return np.zeros((0, width), np.int64)


@dataclass
class ScoreResult:
    """Per-image results; every array has the batch length N first.

    ``input_sizes``, ``regions`` and ``conversions`` describe each input as it came in; left
    empty, they say "already at model size, nothing converted".
    """

    score: np.ndarray  # (N,) combined calibrated score (raw pixel component if uncalibrated)
    is_outlier: np.ndarray  # (N,) bool, score > threshold
    tail_probability: np.ndarray  # (N,) share of calibration scores >= score
    threshold: float
    # "pixel" | "feature" | "disc" | "pixel_local" | "disc_local" (with a patch head) -> (N,)
    components: dict[str, np.ndarray]
    anomaly_map: np.ndarray  # (N, H, W) float32 at model resolution (scoring.combined_map)
    reconstruction: np.ndarray | None = field(default=None)  # (N, H, W, C) uint8 when asked
    # (N, 4) int64: the part of each input the model scored, (top, left, height, width) in
    # input pixels (preprocess.input_region): the whole input unless the policy is center_crop
    regions: np.ndarray = field(default_factory=lambda: _no_rows(4))
    input_sizes: np.ndarray = field(default_factory=lambda: _no_rows(2))  # (N, 2) (height, width)
    conversions: list[str] = field(default_factory=list)  # per image: "", "grey->rgb", "rgb->grey"
    spec: ImageSpec | None = field(default=None, repr=False)  # the model's, for map_at_input

    def __post_init__(self) -> None:
        n = len(self.score)
        h, w = self.anomaly_map.shape[1:3]
        if len(self.input_sizes) == 0:
            self.input_sizes = np.tile(np.array([h, w], np.int64), (n, 1))
        if len(self.regions) == 0:
            self.regions = np.tile(np.array([0, 0, h, w], np.int64), (n, 1))
        if not self.conversions:
            self.conversions = [""] * n

    def __len__(self) -> int:
        return len(self.score)

    def with_inputs(self, spec: ImageSpec, sizes: np.ndarray, conversions: Sequence[str]) -> ScoreResult:
        """This result for inputs of ``sizes`` (N, 2) (height, width) that went through
        ``conversions``: fills ``input_sizes``, ``regions``, ``conversions`` and ``spec``."""
        sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
        if len(sizes) != len(self) or len(conversions) != len(self):
            raise ValueError(f"{len(sizes)} sizes and {len(conversions)} conversions for {len(self)} images")
        regions = np.array([input_region(int(h), int(w), spec) for h, w in sizes], np.int64).reshape(-1, 4)
        return dataclasses.replace(
            self, regions=regions, input_sizes=sizes, conversions=list(conversions), spec=spec
        )

    def map_at_input(self, i: int) -> np.ndarray:
        """Image ``i``'s anomaly map at its input's size, float32 (h, w)
        (:func:`~service.runtime.preprocess.map_to_input`: for ``center_crop`` the border the
        model did not see is 0.0)."""
        h, w = (int(v) for v in self.input_sizes[i])
        if self.spec is None:
            if (h, w) != self.anomaly_map.shape[1:3]:
                raise ValueError("map_at_input needs the model's spec (see with_inputs)")
            return np.array(self.anomaly_map[i], np.float32)
        return map_to_input(self.anomaly_map[i], h, w, self.spec)


class Runtime:
    """Scores, reconstructs, inpaints and samples images with a bundle's three ONNX graphs."""

    def __init__(
        self,
        bundle: Bundle,
        providers: str = "auto",
        intra_op_threads: int = 0,
        max_batch_size: int = 64,
        inpaint_iterations: int = 4,
        spin: bool = True,
        fuse: bool = True,
    ) -> None:
        self.bundle = bundle
        self.spec = bundle.spec
        self.max_batch_size = max_batch_size
        self.inpaint_iterations = inpaint_iterations
        chosen = resolve_providers(providers)
        sigs = bundle.signatures()
        self.graphs = {
            g: Graph(bundle.graph_path(g), sigs[g], chosen, intra_op_threads, spin) for g in GRAPHS
        }
        self.providers = self.graphs["encoder"].providers
        check_provider_started(providers, chosen, self.providers)
        # E -> G -> D as one graph for forward() (service.runtime.compose); None: three calls
        self.pipeline: Graph | None = None
        if fuse:
            self.pipeline = self._compose(sigs, chosen, intra_op_threads, spin)
        logger.info(
            "loaded %s version %s from %s on %s",
            bundle.name, bundle.version, bundle.path, self.providers[0],
        )

    def _compose(
        self, sigs: dict[str, Any], providers: list[str], intra_op_threads: int, spin: bool
    ) -> Graph | None:
        """The composed pipeline: the bundle's ``pipeline.onnx`` (written at export), or for an
        older bundle the three graphs composed now (this imports onnx, about a second)."""
        s = self.spec
        signature = {
            "inputs": {"images": [None, s.height, s.width, s.channels]},
            "outputs": {**sigs["encoder"]["inputs"], **sigs["generator"]["outputs"], **sigs["discriminator"]["outputs"]},
        }
        if self.bundle.pipeline_path is not None:
            return Graph(self.bundle.pipeline_path, signature, providers, intra_op_threads, spin)
        try:
            import onnx

            from vaegan.service.runtime import compose
        except ModuleNotFoundError:  # a serving-only install: onnx comes with the train extra
            logger.warning(
                "%s has no pipeline.onnx (written by export since this version) and onnx is not installed "
                "to compose one: serving the three graphs one by one (slower; re-export the bundle, or "
                "pip install onnx)", self.bundle.path,
            )
            return None

        e, g, d = (self.bundle.graph_path(name) for name in GRAPHS)
        try:
            model = compose.compose_pipeline(e, g, d, mean=s.mean, std=s.std)
        except (ValueError, onnx.checker.ValidationError) as err:  # still correct, just slower
            logger.warning("serving the three graphs separately: cannot compose them (%s)", err)
            return None
        where = self.bundle.path / "(encoder+generator+discriminator)"
        return Graph(where, signature, providers, intra_op_threads, spin, model=model)

    @classmethod
    def load(
        cls,
        path: str | Path,
        providers: str = "auto",
        intra_op_threads: int = 0,
        max_batch_size: int = 64,
        warmup: bool = True,
        spin: bool = True,
        fuse: bool = True,
    ) -> Runtime:
        """Verify the bundle (checksums, shapes), open the sessions and warm them up.

        ``spin=False`` stops idle ONNX Runtime threads from busy-waiting: better when the cores
        are shared with other work (the gRPC server's event loop and decoders). ``fuse=False``
        runs the three graphs one by one in :meth:`forward` instead of as one composed graph.
        """
        rt = cls(load_bundle(path), providers, intra_op_threads, max_batch_size, spin=spin, fuse=fuse)
        if warmup:
            rt.warmup()
        return rt

    @property
    def provider(self) -> str:
        """The execution provider actually used, e.g. ``CPUExecutionProvider``."""
        return self.providers[0]

    def warmup(self) -> None:
        s = self.spec
        self.forward_images(np.zeros((1, s.height, s.width, s.channels), np.uint8))

    # ---- low level: ONNX Runtime runs ---------------------------------------------------
    def forward_images(self, images: np.ndarray, timings: dict[str, float] | None = None) -> Forward:
        """Normalize uint8 images (N, H, W, C) at model size and run E, G and D on them.

        One ONNX Runtime call of the composed pipeline graph, normalization included; or
        (``fuse=False``, or graphs that could not be composed) numpy normalization and
        :meth:`forward`. ``timings``, when given, receives each call's time in seconds, by graph
        name (``pipeline`` for the composed graph).
        """
        if self.pipeline is None:
            return self.forward(normalize(images, self.spec), timings)
        n = images.shape[0]
        x, x_hat, logit, feats, *patch = self._run("pipeline", self.pipeline, timings, images=images)
        return Forward(x, x_hat, logit[:n], feats[:n], feats[n:], patch[0][:n] if patch else None)

    def forward(self, x: np.ndarray, timings: dict[str, float] | None = None) -> Forward:
        """Run E, G and D, one call each, on a normalized batch (N, C, H, W); D sees x and
        x_hat in one call. ``timings`` as in :meth:`forward_images`."""
        n = x.shape[0]
        mu, _ = self._run("encoder", self.graphs["encoder"], timings, x=x)
        (x_hat,) = self._run("generator", self.graphs["generator"], timings, z=mu)
        d_in = np.concatenate([x, x_hat])  # (2N, C, H, W)
        logit, feats, *patch = self._run("discriminator", self.graphs["discriminator"], timings, x=d_in)
        return Forward(x, x_hat, logit[:n], feats[:n], feats[n:], patch[0][:n] if patch else None)

    @staticmethod
    def _run(name: str, graph: Graph, timings: dict[str, float] | None, **feeds: np.ndarray) -> list[Any]:
        if timings is None:
            return graph.run(**feeds)
        t0 = time.perf_counter()
        out = graph.run(**feeds)
        timings[name] = time.perf_counter() - t0
        return out

    def forward_chunked(self, images: np.ndarray) -> Forward:
        """:meth:`forward_images` in chunks of ``max_batch_size``."""
        step = self.max_batch_size
        if len(images) <= step:
            return self.forward_images(images)
        return Forward.concat([self.forward_images(images[i : i + step]) for i in range(0, len(images), step)])

    def reconstruct_normalized(self, x: np.ndarray) -> np.ndarray:
        """G(mu(x)) for a normalized batch; only E and G run."""
        mu, _ = self.graphs["encoder"].run(x=x)
        (x_hat,) = self.graphs["generator"].run(z=mu)
        return x_hat

    def score_forward(
        self,
        fwd: Forward,
        weights: Mapping[str, float] | None = None,
        threshold: float | None = None,
        with_reconstruction: bool = False,
    ) -> ScoreResult:
        """Components, calibrated score and anomaly map (:func:`~service.runtime.scoring.combined_map`)
        from a :class:`Forward`."""
        residual = anomaly_map(fwd.x, fwd.x_hat)  # computed once: the local maps start from it
        local = local_maps(fwd.x, fwd.x_hat, fwd.patch, residual)
        comps = raw_components(fwd.x, fwd.x_hat, fwd.feat_x, fwd.feat_xhat, fwd.logit, fwd.patch, local)
        cal = self.bundle.calibration
        if threshold is not None and not math.isfinite(threshold):
            raise InvalidInput(f"threshold must be a finite number, got {threshold}")
        amap = combined_map(local, residual, cal, weights)
        if cal is None:  # uncalibrated bundle: the raw pixel error, no decision
            if weights:
                raise InvalidInput("component weights need a calibrated bundle")
            score = comps["pixel"]
            thr = float("inf") if threshold is None else float(threshold)
            tail = np.full(len(score), np.nan)
        else:
            score = cal.combine(comps, weights)
            thr = cal.threshold(weights) if threshold is None else float(threshold)
            tail = cal.tail_probability(score, weights)
        bad = np.flatnonzero(~np.isfinite(score))
        if len(bad) or math.isnan(thr):  # never a NaN verdict: a fault (INTERNAL), not an answer
            raise RuntimeError(
                f"non-finite score for image {int(bad[0]) if len(bad) else 0} of the batch "
                f"(threshold {thr}): the model produced NaN or inf; refusing to answer"
            )
        recon = denormalize(fwd.x_hat, self.spec) if with_reconstruction else None
        return ScoreResult(score, score > thr, tail, thr, comps, amap, recon, spec=self.spec)

    # ---- public API ---------------------------------------------------------------------
    def preprocess(self, images: Sequence[ImageLike] | np.ndarray) -> np.ndarray:
        """Decode, resize, normalize -> float32 (N, C, H, W)."""
        return normalize(prepare_inputs(images, self.spec).batch, self.spec)

    def score(
        self,
        images: Sequence[ImageLike] | np.ndarray,
        weights: Mapping[str, float] | None = None,
        threshold: float | None = None,
        with_reconstruction: bool = False,
    ) -> ScoreResult:
        """Score images: uint8 (N, H, W[, C]) arrays, PIL images, paths or encoded bytes.

        The result also says where each input landed (``regions``, ``input_sizes``,
        ``conversions``); :meth:`ScoreResult.map_at_input` gives a map at the input's size.
        """
        prepared = prepare_inputs(images, self.spec)
        res = self.score_forward(self.forward_chunked(prepared.batch), weights, threshold, with_reconstruction)
        return res.with_inputs(self.spec, prepared.sizes, prepared.conversions)

    def reconstruct(self, images: Sequence[ImageLike] | np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) reconstructions at model resolution."""
        x = self.preprocess(images)
        out = [self.reconstruct_normalized(x[i : i + self.max_batch_size]) for i in range(0, len(x), self.max_batch_size)]
        return denormalize(np.concatenate(out), self.spec)

    def inpaint_normalized(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Fill ``mask`` (bool (N, H, W), True = fill) in a normalized batch (N, C, H, W).

        The hole starts as training marks holes (:func:`~service.runtime.inpaint.hole_start`:
        the normalization mean), then ``x_k = x (1-m) + G(mu(x_{k-1})) m`` a few times; the fill
        is shifted to match the brightness of the ring around the hole.
        """
        m = mask[:, None].astype(np.float32)  # (N, 1, H, W)
        cur = hole_start(x, mask)
        gen = cur
        for _ in range(max(1, self.inpaint_iterations)):
            gen = self.reconstruct_normalized(cur)
            cur = x * (1 - m) + gen * m
        gen = gen + border_offset(x, gen, mask)
        return x * (1 - m) + gen * m  # denormalize() clips to the pixel range

    def inpaint(
        self,
        images: Sequence[ImageLike] | np.ndarray,
        masks: Sequence[ImageLike] | np.ndarray,
    ) -> list[np.ndarray]:
        """Fill the masked pixels (non-zero = fill). Returns uint8 images at each input's size
        with the model's channel count; pixels outside the mask are returned unchanged, and so
        are masked pixels the model does not see (outside the centre box of ``center_crop``).
        A grey input into an RGB model gets a grey fill."""
        originals, conversions = self._originals(images)
        if len(masks) != len(originals):
            raise InvalidInput(f"masks: got {len(masks)} masks for {len(originals)} images")
        full_masks = [prepare_mask(m, o.shape[:2], f"mask {i}") for i, (m, o) in enumerate(zip(masks, originals, strict=True))]
        return self._inpaint_originals(originals, full_masks, conversions)

    def repair(
        self, images: Sequence[ImageLike] | np.ndarray, dilation: int = 1, scored: ScoreResult | None = None
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Inpaint each image where its anomaly map exceeds the calibrated map threshold.

        Returns (repaired images at input size, bool masks at input size). The masks follow
        the spec's geometry, so only pixels the model scored can change: never letterbox
        padding, never the border that ``center_crop`` cuts away. ``scored``: these images'
        :meth:`score` result when already at hand (not scored again; its ``conversions`` say
        which inputs were grey).
        """
        cal = self.bundle.calibration
        if cal is None:
            raise ModelNotReady("repair needs a calibrated bundle (no map threshold)")
        originals, conversions = self._originals(images)
        if scored is None:
            res = self.score(originals)
        else:
            res, conversions = scored, scored.conversions
        masks_small = dilate(res.anomaly_map > cal.map_threshold, dilation)
        masks = [
            mask_to_input(m, o.shape[0], o.shape[1], self.spec) for m, o in zip(masks_small, originals, strict=True)
        ]
        return self._inpaint_originals(originals, masks, conversions), masks

    def sample(self, n: int, seed: int | None = None, temperature: float = 1.0) -> np.ndarray:
        """``n`` images drawn from the model: uint8 (n, H, W, C) at model size.

        z ~ N(0, temperature^2 I) from numpy's ``default_rng(seed)`` (float32 (n, Z)), decoded
        by the generator in chunks of ``max_batch_size`` and denormalized as reconstructions
        are. The same seed gives the same images (and a larger ``n`` the same first ones);
        ``seed=None`` draws fresh ones. ``n`` in 1..1024, ``temperature`` finite and > 0
        (InvalidInput otherwise); lower temperatures give more typical, less varied images.
        """
        z = generative.latent_samples(n, self.bundle.latent_dim, seed, temperature)
        return generative.decode_latents(self.graphs["generator"], z, self.spec, self.max_batch_size)

    def interpolate(self, a: ImageLike, b: ImageLike, steps: int = 8, method: str = "linear") -> np.ndarray:
        """The decoded path between two images' codes: uint8 (steps, H, W, C) at model size.

        ``a`` and ``b`` (any size and mode, as :meth:`score` takes them; errors name them ``a``
        and ``b``) are preprocessed as for scoring and encoded to mu (float32 (Z,) each); the
        ``steps`` codes from mu(a) to mu(b), both included, are spaced evenly on the line
        (``"linear"``) or on the great circle through them (``"slerp"``, which falls back to the
        line for nearly parallel codes), and decoded. The first and last images are the
        reconstructions G(mu(a)) and G(mu(b)) (:meth:`reconstruct`). ``steps`` in 2..256.
        """
        steps, method = generative.check_steps(steps), generative.check_method(method)
        ends = [decode_image(img, where=name) for name, img in (("a", a), ("b", b))]
        mu, _ = self.graphs["encoder"].run(x=self.preprocess(ends))  # (2, Z)
        z = generative.latent_path(mu[0], mu[1], steps, method)
        return generative.decode_latents(self.graphs["generator"], z, self.spec, self.max_batch_size)

    # ---- helpers ------------------------------------------------------------------------
    def _originals(self, images: Sequence[ImageLike] | np.ndarray) -> tuple[list[np.ndarray], list[str]]:
        """Decode to uint8 (H, W, C) with the model's channel count, keeping each size; and
        each image's channel conversion."""
        if isinstance(images, np.ndarray):
            images = [images] if images.ndim == 2 else list(images)
        if len(images) == 0:
            raise InvalidInput("images: the batch is empty")
        out, conversions = [], []
        for i, img in enumerate(images):
            a, kind = match_channels(decode_image(img, where=f"image {i}"), self.spec.channels, f"image {i}")
            out.append(a)
            conversions.append(kind)
        return out, conversions

    def _inpaint_originals(
        self, originals: list[np.ndarray], masks: list[np.ndarray], conversions: Sequence[str]
    ) -> list[np.ndarray]:
        """Inpaint in the model frame (the images and masks as the model sees them), then write
        the fill back into the masked input pixels the model saw."""
        s = self.spec
        small = np.stack([to_model_size(o, s) for o in originals])  # (N, H, W, C)
        small_masks = np.stack([mask_to_model(m, s) for m in masks])  # (N, H, W)
        x = normalize(small, s)
        filled = []
        for i in range(0, len(x), self.max_batch_size):
            sl = slice(i, i + self.max_batch_size)
            filled.append(self.inpaint_normalized(x[sl], small_masks[sl]))
        filled_u8 = denormalize(np.concatenate(filled), s)  # (N, H, W, C)
        return [
            self._paste_fill(o, m, f, grey=kind == "grey->rgb")
            for o, m, f, kind in zip(originals, masks, filled_u8, conversions, strict=True)
        ]

    def _paste_fill(self, original: np.ndarray, mask: np.ndarray, filled: np.ndarray, grey: bool) -> np.ndarray:
        """original uint8 (h, w, C) with its ``mask`` pixels taken from ``filled`` (H, W, C),
        the model frame mapped back onto the input; ``grey``: the fill is made grey too."""
        if grey:
            filled = to_channels(to_channels(filled, 1), 3)
        h, w = original.shape[:2]
        content, (t, left, bh, bw) = frame_to_input(filled, h, w, self.spec)
        out = original.copy()
        box = out[t : t + bh, left : left + bw]  # a view: written in place
        inside = mask[t : t + bh, left : left + bw]
        box[inside] = content[inside]
        return out

