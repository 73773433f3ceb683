"""The model-side work of one merged batch: run the model, then score.

The dynamic batcher runs a :class:`BatchRunner` on the merged uint8 images of many requests
(at model size): the model worker runs normalization and E -> G -> D on the merged batch (one
call of the composed graph), and the scores follow on a CPU thread. Scoring the whole batch at
once with the model's own weights and threshold costs about as much as scoring one image, so
every request with default options gets its rows of that :class:`ScoredBatch`; requests that
override weights or the threshold re-score their own rows of the Forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from vaegan.service.runtime import Forward, Runtime, ScoreResult

__all__ = ["BatchRunner", "ScoredBatch", "concat_scored", "slice_result"]


def slice_result(res: ScoreResult, s: slice) -> ScoreResult:
    """Rows ``s`` of a ScoreResult."""
    return ScoreResult(
        score=res.score[s],
        is_outlier=res.is_outlier[s],
        tail_probability=res.tail_probability[s],
        threshold=res.threshold,
        components={k: v[s] for k, v in res.components.items()},
        anomaly_map=res.anomaly_map[s],
        reconstruction=None if res.reconstruction is None else res.reconstruction[s],
        classes=res.classes[s],
    )


def _concat_results(parts: list[ScoreResult]) -> ScoreResult:
    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts])

    components = {k: np.concatenate([p.components[k] for p in parts]) for k in parts[0].components}
    return ScoreResult(
        cat("score"), cat("is_outlier"), cat("tail_probability"), parts[0].threshold, components,
        cat("anomaly_map"), classes=cat("classes"),
    )


@dataclass
class ScoredBatch:
    """Forward outputs and default-option scores of N images; slicing keeps rows."""

    fwd: Forward
    result: ScoreResult | None = None  # the model's weights and threshold, no reconstruction

    def __getitem__(self, s: slice) -> ScoredBatch:
        return ScoredBatch(self.fwd[s], None if self.result is None else slice_result(self.result, s))

    def __len__(self) -> int:
        return len(self.fwd.x)


def concat_scored(parts: list[ScoredBatch]) -> ScoredBatch:
    """Concatenate ScoredBatches along the batch axis (requests split over several runs)."""
    if len(parts) == 1:
        return parts[0]
    results = [p.result for p in parts]
    result = None if any(r is None for r in results) else _concat_results(results)  # type: ignore[arg-type]
    return ScoredBatch(Forward.concat([p.fwd for p in parts]), result)


class BatchRunner:
    """The two stages of a merged batch.

    ``runner(x, timings[, classes])`` on the ONNX Runtime thread: x uint8 (N, H, W, C) at model
    size -> :meth:`Runtime.forward_images` (normalized inside the composed graph; ``timings``
    gets each ONNX Runtime call's seconds, and ``forward`` for the whole step); ``classes``:
    int64 (N,) per-image classes of a conditional model, -1 (or no ``classes``) = best class.
    ``runner.score(batch)`` on a CPU thread, while the model runs the next batch: the scores
    under the model's own weights and threshold, for every request that uses them.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def __call__(self, x: np.ndarray, timings: dict[str, float], classes: np.ndarray | None = None) -> ScoredBatch:
        t0 = time.perf_counter()
        fwd = self.runtime.forward_images(x, timings, classes)
        timings["forward"] = time.perf_counter() - t0
        return ScoredBatch(fwd)

    def score(self, batch: ScoredBatch) -> ScoredBatch:
        return ScoredBatch(batch.fwd, self.runtime.score_forward(batch.fwd))
