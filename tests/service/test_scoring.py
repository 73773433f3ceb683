"""Scoring and calibration math on hand-made arrays (DESIGN.md section 4)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vaegan.service.runtime import Calibration, InvalidInput
from vaegan.service.runtime.scoring import anomaly_map, raw_components, softplus
from vaegan.service.runtime.stats import auroc, average_precision, rates_at_threshold, roc_curve


def test_known_residuals_give_known_components() -> None:
    x = np.zeros((2, 1, 2, 2), np.float32)
    x_hat = x.copy()
    x_hat[0] += 0.5  # every pixel off by 0.5 -> pixel 0.25
    x_hat[1, 0, 0, 0] = 2.0  # one of four off by 2 -> pixel 1.0
    f = np.zeros((2, 4), np.float32)
    f_hat = np.array([[1, 1, 1, 1], [0, 0, 0, 2]], np.float32)
    logit = np.array([[0.0], [50.0]], np.float32)
    c = raw_components(x, x_hat, f, f_hat, logit)
    assert c["pixel"] == pytest.approx([0.25, 1.0])
    assert c["feature"] == pytest.approx([1.0, 1.0])
    assert c["disc"] == pytest.approx([np.log(2.0), 0.0], abs=1e-12)
    amap = anomaly_map(x, x_hat)
    assert amap.shape == (2, 2, 2)
    assert amap[0] == pytest.approx(np.full((2, 2), 0.5))
    assert amap[1, 0, 0] == pytest.approx(2.0) and amap[1, 1, 1] == 0.0


def test_softplus_is_stable() -> None:
    v = softplus(np.array([-1000.0, 0.0, 1000.0]))
    assert np.all(np.isfinite(v))
    assert v == pytest.approx([0.0, np.log(2.0), 1000.0])


def _cal(n: int = 2000, seed: int = 0, fpr: float = 0.01, weights=None) -> Calibration:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    comps = {"pixel": rng.normal(2.0, 0.5, n), "feature": rng.normal(10.0, 3.0, n), "disc": rng.normal(0.5, 0.1, n)}
    return Calibration.fit(comps, weights or {"pixel": 1.0, "feature": 1.0, "disc": 0.0}, target_fpr=fpr)


def test_combined_score_standardizes_each_component() -> None:
    cal = _cal()
    (pm, ps), (fm, fs) = cal.stats["pixel"], cal.stats["feature"]
    assert pm == pytest.approx(2.0, abs=0.05) and ps == pytest.approx(0.5, abs=0.05)
    comps = {"pixel": np.array([pm + 2 * ps]), "feature": np.array([fm - fs]), "disc": np.array([123.0])}
    assert cal.combine(comps)[0] == pytest.approx(2.0 - 1.0)  # disc has weight 0
    assert cal.combine(comps, {"disc": 0.0, "feature": 0.0})[0] == pytest.approx(2.0)


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.2])
def test_threshold_at_target_fpr(fpr: float) -> None:
    cal = _cal(n=4000, fpr=fpr)
    scores = cal.calibration_scores()
    assert np.mean(scores > cal.threshold()) == pytest.approx(fpr, abs=0.002)
    # fresh samples of the same distribution: observed FPR close to the target
    fresh = _cal(n=4000, seed=1)
    fresh_scores = cal.combine(fresh.samples)
    assert np.mean(fresh_scores > cal.threshold()) == pytest.approx(fpr, abs=max(0.01, fpr * 0.25))


def test_calibration_quantiles_of_a_known_distribution() -> None:
    # a single component ~ N(0, 1): the 0.99 quantile of z-scores is ~2.326
    rng = np.random.default_rng(3)
    z = rng.normal(0, 1, 4000)
    cal = Calibration.fit({"pixel": z, "feature": z * 0 + rng.normal(0, 1, 4000), "disc": z}, {"pixel": 1, "feature": 0, "disc": 0})
    assert cal.threshold() == pytest.approx(2.326, abs=0.12)
    assert cal.tail_probability(np.array([0.0]))[0] == pytest.approx(0.5, abs=0.03)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=30))
def test_tail_probability_is_monotone(scores: list[float]) -> None:
    cal = _cal(n=300)
    s = np.sort(np.asarray(scores))
    tail = cal.tail_probability(s)
    assert np.all(np.diff(tail) <= 0)
    assert np.all((tail >= 0) & (tail <= 1))
    assert cal.tail_probability(np.array([-1e9]))[0] == 1.0
    # the conformal p-value never reaches 0: a score above every calibration score gets 1/(n+1)
    assert cal.tail_probability(np.array([1e9]))[0] == pytest.approx(1 / (cal.n + 1))


def test_round_trip_and_bad_weights() -> None:
    cal = _cal()
    again = Calibration.from_dict(cal.to_dict())
    assert again.threshold() == pytest.approx(cal.threshold())
    assert again.weights == cal.weights
    with pytest.raises(InvalidInput, match="unknown score components"):
        cal.combine(cal.samples, {"bogus": 1.0})
    with pytest.raises(ValueError, match="target_fpr"):
        Calibration.fit(cal.samples, cal.weights, target_fpr=1.5)


def test_metrics_match_hand_computed_values() -> None:
    labels = np.array([0, 0, 1, 1])
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), labels) == pytest.approx(0.75)
    assert auroc(np.array([1, 1, 1, 1.0]), labels) == pytest.approx(0.5)  # ties
    assert average_precision(np.array([0.1, 0.4, 0.35, 0.8]), labels) == pytest.approx((1 + 2 / 3) / 2)
    fpr, tpr = roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), labels)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    r = rates_at_threshold(np.array([0.1, 0.4, 0.35, 0.8]), labels, 0.3)
    assert r["fpr"] == 0.5 and r["tpr"] == 1.0 and r["f1"] == pytest.approx(0.8)
