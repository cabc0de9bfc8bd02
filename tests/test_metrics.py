"""metrics.py against scikit-learn and closed forms: AUROC, AUPRC, NaN (unobserved) labels,
bootstrap intervals and paired differences."""
import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

import evaluate
from vkd.metrics import (
    CHEXPERT5,
    SUMMARY_KEYS,
    auroc,
    auroc_summary,
    average_precision,
    average_ranks,
    bootstrap_draws,
    bootstrap_indices,
    metric_summary,
    paired_difference,
)
from vkd.calibration import expected_calibration_error
from vkd.reports import LABELS


def test_average_ranks_with_ties():
    np.testing.assert_array_equal(average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])),
                                  [4, 1, 4, 2, 4])


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_auprc_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.3
    score = np.round(rng.random(300) + 0.3 * y, 1)             # rounding makes many ties
    assert auroc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert average_precision(y, score) == pytest.approx(average_precision_score(y, score),
                                                        abs=1e-12)
    continuous = rng.random(300) + 0.5 * y
    assert average_precision(y, continuous) == pytest.approx(
        average_precision_score(y, continuous), abs=1e-12)


def test_degenerate_cases_are_undefined_not_zero():
    for metric in (auroc, average_precision):
        assert np.isnan(metric([0, 0, 0], [0.1, 0.2, 0.3]))    # one class: undefined, not 0
        assert np.isnan(metric([1, 1], [0.1, 0.2]))
        assert np.isnan(metric([np.nan, np.nan], [0.1, 0.2]))  # nothing observed
        assert metric([0, 1], [0.2, 0.9]) == 1.0
    assert auroc([0, 1], [0.9, 0.2]) == 0.0
    assert average_precision([0, 1], [0.9, 0.2]) == 0.5
    assert auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5   # all tied
    assert average_precision([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_nan_labels_are_left_out_of_every_metric():
    rng = np.random.default_rng(4)
    y = (rng.random((400, 5)) < 0.3).astype(float)
    p = rng.random((400, 5)) * 0.6 + 0.4 * y
    y[rng.random((400, 5)) < 0.25] = np.nan                    # a quarter not observed
    y[:, 2] = np.nan                                           # a label never observed
    for k in (0, 1, 3, 4):
        keep = ~np.isnan(y[:, k])
        assert auroc(y[:, k], p[:, k]) == pytest.approx(
            roc_auc_score(y[keep, k], p[keep, k]), abs=1e-12)
        assert average_precision(y[:, k], p[:, k]) == pytest.approx(
            average_precision_score(y[keep, k], p[keep, k]), abs=1e-12)
    s = auroc_summary(y, p)
    keep = ~np.isnan(y)
    assert np.isnan(s["per_label"][2]) and s["defined"].sum() == 4
    assert s["micro"] == pytest.approx(roc_auc_score(y[keep], p[keep]), abs=1e-12)
    metrics = evaluate.metrics_report(y, p, np.arange(400) // 2, num_resamples=50,
                                      label_names=list("ABCDE"))
    assert "NaN" not in json.dumps(metrics)
    assert metrics["per_label"]["A"]["positives"] == int(np.nansum(y[:, 0]))
    assert metrics["per_label"]["A"]["observed"] == int(keep[:, 0].sum())
    assert (metrics["per_label"]["C"]["auroc"] is None
            and metrics["labels_skipped_in_macro"] == ["C"])
    assert expected_calibration_error(y[:, 0], p[:, 0]) == pytest.approx(
        expected_calibration_error(y[keep[:, 0], 0], p[keep[:, 0], 0]))


def test_macro_and_micro_match_sklearn_and_skip_undefined_labels():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 14)) < 0.3).astype(float)
    p = rng.random((200, 14)) * 0.5 + 0.5 * y * rng.random((200, 14))
    y[:, 4] = 0                                                # label 4 has no positive
    keep = [k for k in range(14) if k != 4]
    s = auroc_summary(y, p)
    assert s["macro"] == pytest.approx(roc_auc_score(y[:, keep], p[:, keep], average="macro"))
    assert s["micro"] == pytest.approx(roc_auc_score(y, p, average="micro"))
    assert np.isnan(s["per_label"][4]) and not s["defined"][4] and s["defined"].sum() == 13
    s = metric_summary(average_precision, y, p)
    assert s["macro"] == pytest.approx(average_precision_score(y[:, keep], p[:, keep],
                                                               average="macro"))
    assert s["micro"] == pytest.approx(average_precision_score(y, p, average="micro"))


def test_bootstrap_on_a_rare_label_never_gives_nan():
    rng = np.random.default_rng(1)
    y = (rng.random((120, 14)) < 0.3).astype(float)
    y[:, 3] = 0
    y[7, 3] = 1                                        # one positive: many resamples have one class
    y[:, 5] = 0                                        # never positive: no interval at all
    p = rng.random((120, 14))
    groups = np.repeat(np.arange(60), 2)               # two images per report
    draws = bootstrap_draws(y, [p], groups, num_resamples=200)[0]
    assert np.isnan(draws["auroc"][:, 3]).any() and not np.isnan(draws["auroc"][:, 3]).all()
    assert not np.isnan(draws["macro_auroc"]).any() and not np.isnan(draws["macro_auprc"]).any()
    metrics = evaluate.metrics_report(y, p, groups, num_resamples=200)
    assert "NaN" not in json.dumps(metrics)
    assert (metrics["per_label"]["Edema"]["auroc"] is None
            and metrics["per_label"]["Edema"]["auroc_ci95"] is None)
    assert metrics["per_label"]["Edema"]["auprc_ci95"] is None
    assert metrics["labels_skipped_in_macro"] == ["Edema"]
    for metric in ("auroc", "auprc"):
        lo, hi = metrics["per_label"]["Lung Lesion"][f"{metric}_ci95"]
        assert 0 <= lo <= hi <= 1
    lo, hi = metrics["macro_auroc_ci95"]
    assert lo < metrics["macro_auroc"] < hi


def test_paired_bootstrap_of_identical_predictions_is_exactly_zero():
    rng = np.random.default_rng(2)
    y = (rng.random((100, 14)) < 0.3).astype(float)
    p = rng.random((100, 14))
    a, b = bootstrap_draws(y, [p, p.copy()], np.arange(100) // 2, num_resamples=100,
                           label_names=LABELS)
    for key in SUMMARY_KEYS:
        assert paired_difference(b[key] - a[key]) == {"ci95": [0.0, 0.0], "p": 1.0}


def test_paired_bootstrap_detects_a_real_difference():
    rng = np.random.default_rng(3)
    y = (rng.random((300, 14)) < 0.3).astype(float)
    weak = rng.random((300, 14)) + 0.2 * y
    strong = rng.random((300, 14)) + 1.0 * y
    a, b = bootstrap_draws(y, [weak, strong], np.arange(300), num_resamples=200)
    for key in ("macro_auroc", "macro_auprc"):
        difference = paired_difference(b[key] - a[key])
        assert difference["ci95"][0] > 0 and difference["p"] < 0.01


def test_the_five_label_mean_is_the_mean_of_the_five_competition_labels():
    rng = np.random.default_rng(4)
    y = (rng.random((200, 14)) < 0.3).astype(float)
    p = rng.random((200, 14)) + 0.5 * y * np.arange(14) / 14    # labels differ in how well told
    metrics = evaluate.metrics_report(y, p, np.arange(200) // 2, num_resamples=50,
                                      label_names=LABELS)
    five = [roc_auc_score(y[:, LABELS.index(n)], p[:, LABELS.index(n)]) for n in CHEXPERT5]
    assert metrics["chexpert5_auroc"] == pytest.approx(np.mean(five))
    assert metrics["chexpert5_auroc"] != pytest.approx(metrics["macro_auroc"])
    lo, hi = metrics["chexpert5_auroc_ci95"]
    assert lo < metrics["chexpert5_auroc"] < hi
    assert "CheXpert 5 mean" in evaluate.format_metrics(metrics, "title")
    y[:, LABELS.index("Edema")] = 0           # one of the five undefined: no mean of the other four
    metrics = evaluate.metrics_report(y, p, np.arange(200) // 2, num_resamples=20,
                                      label_names=LABELS)
    assert metrics["chexpert5_auroc"] is None and metrics["chexpert5_auroc_ci95"] is None
    assert metrics["macro_auroc"] is not None


def test_the_five_label_mean_is_not_made_up_for_other_labels():
    rng = np.random.default_rng(5)
    y, p = (rng.random((60, 2)) < 0.5).astype(float), rng.random((60, 2))
    metrics = evaluate.metrics_report(y, p, np.arange(60), num_resamples=20,
                                      label_names=["Atelectasis", "Nodule"])
    assert metrics["chexpert5_auroc"] is None and metrics["chexpert5_auroc_ci95"] is None
    assert "n/a (not all five defined)" in evaluate.format_metrics(metrics, "title")


def test_the_metrics_say_what_the_bootstrap_resampled():
    rng = np.random.default_rng(3)
    y, p = (rng.random((60, 2)) < 0.5).astype(float), rng.random((60, 2))
    metrics = evaluate.metrics_report(y, p, np.arange(60) // 6, num_resamples=20,
                                      label_names=["A", "B"], unit="patients")
    assert metrics["bootstrap_unit"] == "patients" and metrics["num_bootstrap_units"] == 10
    assert "95% bootstrap over 10 patients" in evaluate.format_metrics(metrics, "title")


def test_bootstrap_keeps_the_images_of_a_report_together():
    groups = np.array([0, 0, 1, 1, 1, 2])
    for idx in bootstrap_indices(groups, 20, seed=0):
        counts = np.bincount(idx, minlength=6)
        assert counts[0] == counts[1] and counts[2] == counts[3] == counts[4]
