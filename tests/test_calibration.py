"""calibration.py against scikit-learn and closed forms: ECE and temperature scaling, thresholds and
operating points, rejection curves."""
import numpy as np
import pytest
from sklearn.metrics import roc_curve

from vkd.metrics import auroc, auroc_summary
from vkd.calibration import (
    apply_temperature,
    calibration_bins,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    operating_point,
    rejection_curve,
)


def test_ece_is_near_zero_when_calibrated_and_exact_on_known_cases():
    rng = np.random.default_rng(5)
    p = rng.random(200_000)
    y = (rng.random(200_000) < p).astype(float)       # P(y = 1 | p) = p: calibrated by construction
    assert expected_calibration_error(y, p) < 0.005
    y = np.r_[np.ones(60), np.zeros(40)]
    # says 90%, is 60%
    assert expected_calibration_error(y, np.full(100, 0.9)) == pytest.approx(0.3)
    # two bins, half each: p = 0.2 with 50% positive (|0.2 - 0.5|), p = 0.8 with 75% positive
    # (|0.8 - 0.75|)
    y = np.r_[np.ones(50), np.zeros(50), np.ones(75), np.zeros(25)]
    p = np.r_[np.full(100, 0.2), np.full(100, 0.8)]
    assert expected_calibration_error(y, p, num_bins=10) == pytest.approx(0.5 * 0.3 + 0.5 * 0.05)
    count, confidence, frequency = calibration_bins(y, p, num_bins=10)
    assert count.sum() == 200 and count[2] == count[8] == 100
    assert confidence[8] == pytest.approx(0.8) and frequency[2] == 0.5 and np.isnan(frequency[0])
    # p = 1 falls in the last bin, not past it
    assert calibration_bins([1.0], [1.0], num_bins=10)[0][-1] == 1


def test_temperature_scaling_recovers_a_known_overconfidence():
    rng = np.random.default_rng(6)
    logits = rng.normal(0, 2, size=(20_000, 2))
    y = (rng.random(logits.shape) < 1 / (1 + np.exp(-logits))).astype(float)
    overconfident = 1 / (1 + np.exp(-2.0 * logits))       # the true logits doubled: T = 2 undoes it
    temperature = fit_temperature(y, overconfident)
    assert temperature == pytest.approx(2.0, rel=0.05)
    scaled = apply_temperature(overconfident, temperature)
    assert expected_calibration_error(y, scaled) < expected_calibration_error(y, overconfident) / 3
    # ranking kept
    assert auroc(y[:, 0], scaled[:, 0]) == pytest.approx(auroc(y[:, 0], overconfident[:, 0]))


# --------------------------------------------------------------------------------- operating points

def test_youden_threshold_matches_sklearn_roc_and_target_sensitivity_is_reached():
    rng = np.random.default_rng(7)
    y = rng.random(500) < 0.3
    p = np.round(rng.random(500) * 0.7 + 0.3 * y, 2)
    fpr, tpr, thresholds = roc_curve(y, p)
    assert choose_threshold(y, p) == pytest.approx(thresholds[np.argmax(tpr - fpr)])
    for target in (0.5, 0.8, 0.95):
        t = choose_threshold(y, p, target)
        assert operating_point(y, p, t)["sensitivity"] >= target
        higher = np.unique(p[p > t])
        assert not len(higher) or operating_point(y, p, higher[0])["sensitivity"] < target
    assert np.isnan(choose_threshold(np.zeros(5), np.arange(5.0)))


def test_operating_point_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0, np.nan])
    p = np.array([0.9, 0.6, 0.2, 0.7, 0.3, 0.1, 0.05, 0.99])    # the unobserved 0.99 must not count
    point = operating_point(y, p, 0.5)                          # tp 2, fn 1, fp 1, tn 3
    assert point == {"threshold": 0.5, "sensitivity": pytest.approx(2 / 3), "specificity": 0.75,
                     "ppv": pytest.approx(2 / 3)}
    assert operating_point(y, p, 0.95)["ppv"] is None           # nothing called positive: undefined


# -------------------------------------------------------------------------------------- uncertainty

def test_rejection_curve_rises_when_uncertainty_marks_the_errors():
    rng = np.random.default_rng(8)
    y = (rng.random((1000, 3)) < 0.4).astype(float)
    hard = rng.random(1000) < 0.3                               # images whose predictions are noise
    p = np.where(hard[:, None], rng.random((1000, 3)), 0.3 + 0.4 * y + 0.2 * rng.random((1000, 3)))
    informative = rejection_curve(y, p, hard + 0.01 * rng.random(1000), (0.1, 0.3))
    assert informative[0.0] == pytest.approx(auroc_summary(y, p)["macro"])
    assert informative[0.0] < informative[0.1] < informative[0.3] == 1.0
    noise = rejection_curve(y, p, rng.random(1000), (0.3,))
    assert abs(noise[0.3] - noise[0.0]) < 0.03
