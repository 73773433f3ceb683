"""The runtime: a verified bundle in three ONNX Runtime sessions, and the public Python API.

    rt = Runtime.load("runs/demo/bundle")
    res = rt.score(images)          # ScoreResult
    recon = rt.reconstruct(images)  # uint8 (N, H, W, C)
    filled = rt.inpaint(images, masks)
    fixed = rt.repair(images)
    samples = rt.sample(16, seed=0)           # uint8 (16, H, W, C) drawn from the prior
    path = rt.interpolate(a, b, steps=8)      # uint8 (8, H, W, C) from G(mu(a)) to G(mu(b))

A conditional bundle (``vaegan train --conditional``) scores each image against a class: the
one given (``classes=[...]``, one per image) or, by default, its *best class*, the class under
which the image scores lowest (:meth:`Runtime.forward_images`); ``ScoreResult.classes`` says which.

Numpy and onnxruntime only. The server's dynamic batcher calls :meth:`Runtime.forward_images` on
merged batches and :meth:`Runtime.score_forward` per request.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vaegan.service.runtime import generative
from vaegan.service.runtime.bundle import GRAPHS, Bundle, load_bundle
from vaegan.service.runtime.errors import InvalidInput, ModelNotReady
from vaegan.service.runtime.inpaint import (
    dilate,
    hole_start,
    mask_to_input,
    mask_to_model,
    prepare_mask,
    seam_correction,
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
    classes: np.ndarray | None = None  # (N,) int64: the class each row ran with; None: unconditional

    def __getitem__(self, s: slice | np.ndarray) -> Forward:
        """Rows ``s`` (a slice, or an index array)."""
        return Forward(
            self.x[s], self.x_hat[s], self.logit[s], self.feat_x[s], self.feat_xhat[s],
            None if self.patch is None else self.patch[s], None if self.classes is None else self.classes[s],
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
    # (N,) int64: the class each image was scored against (a conditional bundle: the one asked
    # for, or the best class); -1 for an unconditional bundle. Left empty: all -1.
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        n = len(self.score)
        if len(self.classes) == 0:
            self.classes = np.full(n, -1, np.int64)
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
        inpaint_iterations: int | None = None,
        spin: bool = True,
        fuse: bool = True,
    ) -> None:
        self.bundle = bundle
        self.spec = bundle.spec
        self.max_batch_size = max_batch_size
        # model runs per inpainting: a bundle trained with holes completes them best in 2 (more
        # drift toward the class mean: centre squares 9.42 dB at 2, 9.07 at 4, 8.76 at 8 on MNIST),
        # one trained without them needs 4 to pull the hole toward the image (8.03 at 2, 8.24 at 4)
        self.inpaint_iterations = inpaint_iterations or (2 if bundle.trained_with_holes else 4)
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
        label = {"label": [None]} if self.bundle.conditional else {}
        signature = {
            "inputs": {"images": [None, s.height, s.width, s.channels], **label},
            "outputs": {"x": sigs["encoder"]["inputs"]["x"], **sigs["generator"]["outputs"], **sigs["discriminator"]["outputs"]},
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

    # ---- classes of a conditional bundle ------------------------------------------------
    @property
    def num_classes(self) -> int:
        """The classes of a conditional bundle; 0 for an unconditional one."""
        return self.bundle.num_classes

    def check_classes(self, classes: Sequence[int | None] | np.ndarray | None, n: int) -> np.ndarray | None:
        """Validate per-image classes for ``n`` images -> int64 (n,), -1 = "the best class"
        (an entry None or -1), or None when no class applies (``classes`` None on an
        unconditional bundle; all entries "best" on a conditional one stay (n,) -1).

        InvalidInput naming the entry: a class for an unconditional bundle, a class out of
        0..num_classes-1, a non-integer, or a length other than ``n``.
        """
        k = self.num_classes
        if classes is None:
            return np.full(n, -1, np.int64) if k else None
        if isinstance(classes, np.ndarray) and classes.ndim != 1:
            raise InvalidInput(f"classes: expected one class per image, (N,), got shape {classes.shape}")
        entries = list(classes)
        if len(entries) != n:
            raise InvalidInput(f"classes: got {len(entries)} classes for {n} images")
        out = np.full(n, -1, np.int64)
        for i, c in enumerate(entries):
            if c is None or (generative.is_int(c) and int(c) == -1):
                continue
            if not generative.is_int(c):
                raise InvalidInput(f"classes[{i}]: a class id must be an integer, got {c!r}")
            if k == 0:
                raise InvalidInput(
                    f"classes[{i}]: this model is not conditional (trained without --conditional); send no class"
                )
            if not 0 <= int(c) < k:
                raise InvalidInput(f"classes[{i}]: class {int(c)} is out of range; this model has classes 0..{k - 1}")
            out[i] = int(c)
        return out if k else None

    def _with_classes(
        self, run: Callable[[np.ndarray | None], Forward], labels: np.ndarray | None
    ) -> Forward:
        """``run(labels)`` -> Forward, with each -1 of ``labels`` (int64 (N,)) replaced by the
        image's best class: the model runs once per class and every such image keeps the class
        under which it scores lowest with the bundle's own weights (:meth:`class_scores`).
        ``labels`` None (unconditional): one plain run."""
        if labels is None:
            return run(None)
        best = labels < 0
        if not best.any():
            return dataclasses.replace(run(labels), classes=labels)
        n = len(labels)
        fwds = [run(np.where(best, k, labels)) for k in range(self.num_classes)]
        scores = np.stack([self.class_scores(f) for f in fwds])  # (K, N)
        chosen = np.where(best, scores.argmin(axis=0), labels).astype(np.int64)
        rows = Forward.concat(fwds)[chosen * n + np.arange(n)]
        return dataclasses.replace(rows, classes=chosen)

    def class_scores(self, fwd: Forward) -> np.ndarray:
        """The score that picks a conditional bundle's best class, float64 (N,): the combined
        score under the bundle's calibrated weights, or for an uncalibrated bundle the raw
        pixel component (the score it reports). Per-request weights never change the choice."""
        cal = self.bundle.calibration
        if cal is None:
            return raw_components(fwd.x, fwd.x_hat, fwd.feat_x, fwd.feat_xhat, fwd.logit, maps={})["pixel"]
        return cal.combine(raw_components(fwd.x, fwd.x_hat, fwd.feat_x, fwd.feat_xhat, fwd.logit, fwd.patch))

    # ---- low level: ONNX Runtime runs ---------------------------------------------------
    def forward_images(
        self, images: np.ndarray, timings: dict[str, float] | None = None,
        classes: Sequence[int | None] | np.ndarray | None = None,
    ) -> Forward:
        """Normalize uint8 images (N, H, W, C) at model size and run E, G and D on them.

        One ONNX Runtime call of the composed pipeline graph, normalization included; or
        (``fuse=False``, or graphs that could not be composed) numpy normalization and
        :meth:`forward`. ``timings``, when given, receives each call's time in seconds, by graph
        name (``pipeline`` for the composed graph), summed over the calls.

        ``classes`` (conditional bundles): one class per image, None or -1 for its best class
        (see :meth:`check_classes`); the model then runs once per class for those images.
        ``Forward.classes`` says which class each row ran with.
        """
        labels = self.check_classes(classes, len(images))
        if self.pipeline is None:
            return self._with_classes(lambda lab: self._forward(normalize(images, self.spec), lab, timings), labels)
        pipeline = self.pipeline
        n = images.shape[0]

        def run(lab: np.ndarray | None) -> Forward:
            feeds = {"images": images} if lab is None else {"images": images, "label": lab}
            x, x_hat, logit, feats, *patch = self._run("pipeline", pipeline, timings, **feeds)
            return Forward(x, x_hat, logit[:n], feats[:n], feats[n:], patch[0][:n] if patch else None)

        return self._with_classes(run, labels)

    def forward(
        self, x: np.ndarray, timings: dict[str, float] | None = None,
        classes: Sequence[int | None] | np.ndarray | None = None,
    ) -> Forward:
        """Run E, G and D, one call each, on a normalized batch (N, C, H, W); D sees x and
        x_hat in one call. ``timings`` and ``classes`` as in :meth:`forward_images`."""
        return self._with_classes(lambda lab: self._forward(x, lab, timings), self.check_classes(classes, len(x)))

    def _forward(self, x: np.ndarray, labels: np.ndarray | None, timings: dict[str, float] | None) -> Forward:
        """:meth:`forward` with ``labels`` int64 (N,), each a class (None: unconditional)."""
        n = x.shape[0]
        lab = {} if labels is None else {"label": labels}
        mu, _ = self._run("encoder", self.graphs["encoder"], timings, x=x, **lab)
        (x_hat,) = self._run("generator", self.graphs["generator"], timings, z=mu, **lab)
        d_in = np.concatenate([x, x_hat])  # (2N, C, H, W)
        d_lab = {} if labels is None else {"label": np.concatenate([labels, labels])}
        logit, feats, *patch = self._run("discriminator", self.graphs["discriminator"], timings, x=d_in, **d_lab)
        return Forward(x, x_hat, logit[:n], feats[:n], feats[n:], patch[0][:n] if patch else None)

    @staticmethod
    def _run(name: str, graph: Graph, timings: dict[str, float] | None, **feeds: np.ndarray) -> list[Any]:
        if timings is None:
            return graph.run(**feeds)
        t0 = time.perf_counter()
        out = graph.run(**feeds)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        return out

    def forward_chunked(self, images: np.ndarray, classes: Sequence[int | None] | np.ndarray | None = None) -> Forward:
        """:meth:`forward_images` in chunks of ``max_batch_size``."""
        step = self.max_batch_size
        if len(images) <= step:
            return self.forward_images(images, classes=classes)
        labels = self.check_classes(classes, len(images))
        return Forward.concat([
            self.forward_images(images[i : i + step], classes=None if labels is None else labels[i : i + step])
            for i in range(0, len(images), step)
        ])

    def reconstruct_normalized(self, x: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """G(mu(x)) for a normalized batch; only E and G run. ``labels``: int64 (N,) classes of
        a conditional bundle (each in range; see :meth:`check_classes`)."""
        lab = {} if labels is None else {"label": labels}
        mu, _ = self.graphs["encoder"].run(x=x, **lab)
        (x_hat,) = self.graphs["generator"].run(z=mu, **lab)
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
        classes = np.full(len(score), -1, np.int64) if fwd.classes is None else np.asarray(fwd.classes, np.int64)
        return ScoreResult(score, score > thr, tail, thr, comps, amap, recon, spec=self.spec, classes=classes)

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
        classes: Sequence[int | None] | np.ndarray | None = None,
    ) -> ScoreResult:
        """Score images: uint8 (N, H, W[, C]) arrays, PIL images, paths or encoded bytes.

        The result also says where each input landed (``regions``, ``input_sizes``,
        ``conversions``); :meth:`ScoreResult.map_at_input` gives a map at the input's size.

        ``classes`` (conditional bundles only; InvalidInput on others): one class id per image
        to score it against, None or -1 for its best class; ``None`` (the default): every image
        against its best class, the one under which it scores lowest with the bundle's own
        weights. ``ScoreResult.classes`` reports the class used (-1: unconditional bundle).
        """
        prepared = prepare_inputs(images, self.spec)
        fwd = self.forward_chunked(prepared.batch, self.check_classes(classes, len(prepared.batch)))
        res = self.score_forward(fwd, weights, threshold, with_reconstruction)
        return res.with_inputs(self.spec, prepared.sizes, prepared.conversions)

    def reconstruct(
        self, images: Sequence[ImageLike] | np.ndarray, classes: Sequence[int | None] | np.ndarray | None = None
    ) -> np.ndarray:
        """uint8 (N, H, W, C) reconstructions at model resolution. A conditional bundle
        reconstructs each image in its given class (``classes`` as in :meth:`score`), else in
        its best class."""
        if self.bundle.conditional:
            fwd = self.forward_chunked(prepare_inputs(images, self.spec).batch, classes)
            return denormalize(fwd.x_hat, self.spec)
        self.check_classes(classes, len(images))  # none may be given
        x = self.preprocess(images)
        out = [self.reconstruct_normalized(x[i : i + self.max_batch_size]) for i in range(0, len(x), self.max_batch_size)]
        return denormalize(np.concatenate(out), self.spec)

    def inpaint_normalized(self, x: np.ndarray, mask: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """Fill ``mask`` (bool (N, H, W), True = fill) in a normalized batch (N, C, H, W).

        The hole starts as training marks holes (:func:`~service.runtime.inpaint.hole_start`:
        the normalization mean), then ``x_k = x (1-m) + G(mu(x_{k-1})) m``, ``inpaint_iterations``
        times (2 for a bundle trained with holes, 4 otherwise); the fill
        is then Poisson-blended into its surroundings
        (:func:`~service.runtime.inpaint.seam_correction`), so no seam shows. ``labels``: int64 (N,)
        classes of a conditional bundle (each in range).
        """
        m = mask[:, None].astype(np.float32)  # (N, 1, H, W)
        cur = hole_start(x, mask)
        gen = cur
        for _ in range(max(1, self.inpaint_iterations)):
            gen = self.reconstruct_normalized(cur, labels)
            cur = x * (1 - m) + gen * m
        gen = gen + seam_correction(x, gen, mask)
        return x * (1 - m) + gen * m  # denormalize() clips to the pixel range

    def inpaint(
        self,
        images: Sequence[ImageLike] | np.ndarray,
        masks: Sequence[ImageLike] | np.ndarray,
        classes: Sequence[int | None] | np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """Fill the masked pixels (non-zero = fill). Returns uint8 images at each input's size
        with the model's channel count; pixels outside the mask are returned unchanged, and so
        are masked pixels the model does not see (outside the centre box of ``center_crop``).
        A grey input into an RGB model gets a grey fill. A conditional bundle fills each image
        in its given class (``classes`` as in :meth:`score`) or else in the best class of the
        image with its holes marked as training marks them."""
        originals, conversions = self._originals(images)
        if len(masks) != len(originals):
            raise InvalidInput(f"masks: got {len(masks)} masks for {len(originals)} images")
        labels = self.check_classes(classes, len(originals))
        full_masks = [prepare_mask(m, o.shape[:2], f"mask {i}") for i, (m, o) in enumerate(zip(masks, originals, strict=True))]
        return self._inpaint_originals(originals, full_masks, conversions, labels)

    def repair(
        self, images: Sequence[ImageLike] | np.ndarray, dilation: int = 1, scored: ScoreResult | None = None,
        classes: Sequence[int | None] | np.ndarray | None = None,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Inpaint each image where its anomaly map exceeds the calibrated map threshold.

        Returns (repaired images at input size, bool masks at input size). The masks follow
        the spec's geometry, so only pixels the model scored can change: never letterbox
        padding, never the border that ``center_crop`` cuts away. ``scored``: these images'
        :meth:`score` result when already at hand (not scored again; its ``conversions`` say
        which inputs were grey). A conditional bundle scores with ``classes`` (as in
        :meth:`score`) and fills each image in the class it was scored against.
        """
        cal = self.bundle.calibration
        if cal is None:
            raise ModelNotReady("repair needs a calibrated bundle (no map threshold)")
        originals, conversions = self._originals(images)
        if scored is None:
            res = self.score(originals, classes=classes)
        else:
            res, conversions = scored, scored.conversions
        masks_small = dilate(res.anomaly_map > cal.map_threshold, dilation)
        masks = [
            mask_to_input(m, o.shape[0], o.shape[1], self.spec) for m, o in zip(masks_small, originals, strict=True)
        ]
        labels = self.check_classes(res.classes, len(originals))  # the classes scored against
        return self._inpaint_originals(originals, masks, conversions, labels), masks

    def sample(
        self, n: int, seed: int | None = None, temperature: float = 1.0,
        classes: int | Sequence[int] | np.ndarray | None = None,
    ) -> np.ndarray:
        """``n`` images drawn from the model: uint8 (n, H, W, C) at model size.

        z ~ N(0, temperature^2 I) from numpy's ``default_rng(seed)`` (float32 (n, Z)), decoded
        by the generator in chunks of ``max_batch_size`` and denormalized as reconstructions
        are. The same seed gives the same images (and a larger ``n`` the same first ones);
        ``seed=None`` draws fresh ones. ``n`` in 1..1024, ``temperature`` finite and > 0
        (InvalidInput otherwise); lower temperatures give more typical, less varied images.

        ``classes`` (conditional bundles only): one class for all images, or one per image;
        None: the classes in turn (0, 1, ..., K-1, 0, ...). The codes do not depend on it.
        """
        z = generative.latent_samples(n, self.bundle.latent_dim, seed, temperature)
        labels = self._sample_labels(len(z), classes)
        return generative.decode_latents(self.graphs["generator"], z, self.spec, self.max_batch_size, labels)

    def _sample_labels(self, n: int, classes: int | Sequence[int] | np.ndarray | None) -> np.ndarray | None:
        """int64 (n,) classes for :meth:`sample` (round-robin when None), or None (unconditional)."""
        if generative.is_int(classes):
            classes = [int(classes)] * n  # type: ignore[arg-type]
        elif classes is None and self.bundle.conditional:
            classes = np.arange(n) % self.num_classes
        labels = self.check_classes(classes, n)  # type: ignore[arg-type]
        if labels is not None and (labels < 0).any():
            raise InvalidInput(f"classes[{int(np.argmax(labels < 0))}]: sampling needs a class (no image to choose one for)")
        return labels

    def interpolate(
        self, a: ImageLike, b: ImageLike, steps: int = 8, method: str = "linear", class_id: int | None = None
    ) -> np.ndarray:
        """The decoded path between two images' codes: uint8 (steps, H, W, C) at model size.

        ``a`` and ``b`` (any size and mode, as :meth:`score` takes them; errors name them ``a``
        and ``b``) are preprocessed as for scoring and encoded to mu (float32 (Z,) each); the
        ``steps`` codes from mu(a) to mu(b), both included, are spaced evenly on the line
        (``"linear"``) or on the great circle through them (``"slerp"``, which falls back to the
        line for nearly parallel codes), and decoded. The first and last images are the
        reconstructions G(mu(a)) and G(mu(b)) (:meth:`reconstruct`). ``steps`` in 2..256.

        A conditional bundle walks the whole path in one class: ``class_id``, or else ``a``'s
        best class; both ends are encoded and every code decoded in it.
        """
        steps, method = generative.check_steps(steps), generative.check_method(method)
        ends = [decode_image(img, where=name) for name, img in (("a", a), ("b", b))]
        x = self.preprocess(ends)  # (2, C, H, W)
        label = self.check_classes(None if class_id is None else [class_id], 1)
        if label is not None and label[0] < 0:  # a's best class
            label = self.forward(x[:1], classes=label).classes
        pair = None if label is None else np.repeat(label, 2)
        mu, _ = self.graphs["encoder"].run(x=x, **({} if pair is None else {"label": pair}))  # (2, Z)
        z = generative.latent_path(mu[0], mu[1], steps, method)
        path_labels = None if label is None else np.repeat(label, len(z))
        return generative.decode_latents(self.graphs["generator"], z, self.spec, self.max_batch_size, path_labels)

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
        self, originals: list[np.ndarray], masks: list[np.ndarray], conversions: Sequence[str],
        labels: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """Inpaint in the model frame (the images and masks as the model sees them), then write
        the fill back into the masked input pixels the model saw. ``labels``: int64 (N,)
        classes of a conditional bundle, -1 = the best class of the image with its holes
        marked (:func:`~service.runtime.inpaint.hole_start`)."""
        s = self.spec
        small = np.stack([to_model_size(o, s) for o in originals])  # (N, H, W, C)
        small_masks = np.stack([mask_to_model(m, s) for m in masks])  # (N, H, W)
        x = normalize(small, s)
        filled = []
        for i in range(0, len(x), self.max_batch_size):
            sl = slice(i, i + self.max_batch_size)
            lab = None if labels is None else labels[sl]
            if lab is not None and (lab < 0).any():
                lab = self.forward(hole_start(x[sl], small_masks[sl]), classes=lab).classes
            filled.append(self.inpaint_normalized(x[sl], small_masks[sl], lab))
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

