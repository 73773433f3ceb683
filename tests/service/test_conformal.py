"""The conformal threshold and tail probability of ``Calibration``, and its refusal of
non-finite values. Numpy only."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from vaegan.service.runtime import Calibration, InvalidInput
from vaegan.service.runtime.scoring import COMPONENTS, conformal_rank

DRAWS = 2000
UNIT = {k: (0.0, 1.0) for k in COMPONENTS}  # stats that leave the pixel component as it is
PIXEL_ONLY = {"pixel": 1.0, "feature": 0.0, "disc": 0.0}


def _uniform_cal(u: np.ndarray, target_fpr: float) -> Calibration:
    """Calibration whose score is the pixel component itself; a score ~ U(0, 1) has the exact
    false positive rate 1 - threshold."""
    return Calibration.fit({"pixel": u, "feature": u, "disc": u}, PIXEL_ONLY, target_fpr=target_fpr, stats=UNIT)


@pytest.mark.parametrize("n,a", [(50, 0.05), (100, 0.05), (200, 0.05), (200, 0.01), (120, 0.1)])
def test_conformal_threshold_meets_its_guarantee(n: int, a: float) -> None:
    """Over many calibration sets of exchangeable scores, the mean FPR at the threshold is at
    most the target, and at least target - 1/(n+1); the plain quantile rule misses it."""
    rng = np.random.default_rng(n * 1000 + int(a * 1000))
    draws = rng.random((DRAWS, n))
    fpr = np.array([1.0 - _uniform_cal(u, a).threshold() for u in draws])
    se = fpr.std() / math.sqrt(DRAWS)
    k = conformal_rank(n, a)
    assert k <= n
    exact = (n + 1 - k) / (n + 1)  # E[FPR] = P(a new score ranks above the k-th of n)
    assert fpr.mean() == pytest.approx(exact, abs=4 * se)
    assert fpr.mean() <= a + 3 * se
    assert fpr.mean() >= a - 1 / (n + 1) - 3 * se
    # the rule this replaced: np.quantile(1 - a) of the calibration scores exceeds the target
    old = 1.0 - np.quantile(draws, 1.0 - a, axis=1)
    assert old.mean() > a + 3 * old.std() / math.sqrt(DRAWS)


def test_threshold_is_the_kth_smallest_score() -> None:
    u = np.random.default_rng(1).random(99)
    cal = _uniform_cal(u, 0.05)
    k = math.ceil(100 * 0.95)
    assert cal.rank == k == 95 and not cal.capped
    assert cal.threshold() == np.sort(u)[k - 1]
    assert cal.to_dict()["threshold_rule"]["k"] == k


def test_tail_probability_is_the_conformal_p_value_and_matches_the_threshold() -> None:
    rng = np.random.default_rng(2)
    cal = _uniform_cal(rng.random(300), 0.05)
    s = np.r_[rng.random(2000), cal.calibration_scores()]  # new scores, and ties with the calibration set
    p = cal.tail_probability(s)
    ref = cal.calibration_scores()
    assert p == pytest.approx([(1 + np.sum(ref >= v)) / (len(ref) + 1) for v in s])
    assert np.array_equal(p <= cal.target_fpr, s > cal.threshold())
    assert p.min() >= 1 / (cal.n + 1) and p.max() <= 1.0


def test_too_few_calibration_images_cap_at_the_max_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    from vaegan.service.runtime import scoring

    scoring._WARNED_CAPPED.clear()  # the warning is logged once per process and size
    u = np.random.default_rng(3).random(30)
    with caplog.at_level(logging.WARNING, logger="vaegan.service.runtime.scoring"):
        cal = _uniform_cal(u, 0.01)
    assert cal.capped and cal.n_needed == 99
    assert cal.threshold() == u.max()  # never +inf: the service still flags something
    assert cal.to_dict()["threshold_rule"]["capped"] is True
    assert "cannot set a threshold" in caplog.text and "need >= 99" in caplog.text
    assert not _uniform_cal(np.random.default_rng(4).random(99), 0.01).capped  # n = 1/a - 1 is enough


def test_stats_come_from_the_given_part_not_the_samples() -> None:
    rng = np.random.default_rng(5)
    calib = {k: rng.normal(10.0, 2.0, 200) for k in COMPONENTS}
    stats = {"pixel": (9.0, 3.0), "feature": (1.0, 0.5), "disc": (0.0, 1.0)}
    cal = Calibration.fit(calib, {"pixel": 1.0, "feature": 1.0, "disc": 0.0}, stats=stats)
    assert cal.stats == stats and cal.stats_source == "selection part"
    one = {"pixel": np.array([12.0]), "feature": np.array([2.0]), "disc": np.array([0.0])}
    assert cal.combine(one)[0] == pytest.approx((12 - 9) / 3 + (2 - 1) / 0.5)
    again = Calibration.from_dict(cal.to_dict())
    assert again.stats == stats and again.threshold() == cal.threshold()
    # a manifest from before the two parts: stats derived from its samples, as written then
    old = cal.to_dict()
    del old["stats_source"]
    legacy = Calibration.from_dict(old)
    assert legacy.stats["pixel"] == pytest.approx((calib["pixel"].mean(), calib["pixel"].std()))
    assert legacy.stats_source == "calibration samples"


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda d: d["weights"].update(feature=float("nan")), "weight of component 'feature'"),
        (lambda d: d["weights"].update(disc=float("inf")), "weight of component 'disc'"),
        (lambda d: d["samples"]["pixel"].__setitem__(3, float("nan")), "samples of component 'pixel'"),
        (lambda d: d["components"]["disc"].update(std=float("nan")), "std of component 'disc'"),
        (lambda d: d["components"]["feature"].update(mean=float("-inf")), "mean of component 'feature'"),
        (lambda d: d["components"]["pixel"].update(std=0.0), "std of component 'pixel'"),
    ],
)
def test_non_finite_values_are_refused_naming_the_component(change, needle: str) -> None:  # noqa: ANN001
    rng = np.random.default_rng(6)
    d = Calibration.fit({k: rng.random(50) for k in COMPONENTS}, PIXEL_ONLY, stats=UNIT).to_dict()
    change(d)
    with pytest.raises(ValueError, match=needle):
        Calibration.from_dict(d)


def test_non_finite_request_weights_are_invalid_input() -> None:
    cal = _uniform_cal(np.random.default_rng(7).random(50), 0.05)
    with pytest.raises(InvalidInput, match="finite"):
        cal.combine(cal.samples, {"pixel": float("nan")})
