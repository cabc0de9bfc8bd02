"""Metrics against scikit-learn and closed forms: AUROC, AUPRC, NaN (unobserved) labels, bootstrap intervals and
paired differences, ECE and temperature scaling, thresholds, rejection curves, grouping runs into methods."""
import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

import evaluate
from data import DataError
from evaluate import (auroc, auroc_summary, average_precision, average_ranks, bootstrap_draws, calibration_bins,
                      choose_threshold, expected_calibration_error, metrics_report, operating_point,
                      paired_difference)


def test_average_ranks_with_ties():
    np.testing.assert_array_equal(average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [4, 1, 4, 2, 4])


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_auprc_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.3
    score = np.round(rng.random(300) + 0.3 * y, 1)             # rounding makes many ties
    assert auroc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert average_precision(y, score) == pytest.approx(average_precision_score(y, score), abs=1e-12)
    continuous = rng.random(300) + 0.5 * y
    assert average_precision(y, continuous) == pytest.approx(average_precision_score(y, continuous), abs=1e-12)


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
        assert auroc(y[:, k], p[:, k]) == pytest.approx(roc_auc_score(y[keep, k], p[keep, k]), abs=1e-12)
        assert average_precision(y[:, k], p[:, k]) == pytest.approx(
            average_precision_score(y[keep, k], p[keep, k]), abs=1e-12)
    s = auroc_summary(y, p)
    keep = ~np.isnan(y)
    assert np.isnan(s["per_label"][2]) and s["defined"].sum() == 4
    assert s["micro"] == pytest.approx(roc_auc_score(y[keep], p[keep]), abs=1e-12)
    metrics = metrics_report(y, p, np.arange(400) // 2, num_resamples=50, label_names=list("ABCDE"))
    assert "NaN" not in json.dumps(metrics)
    assert metrics["per_label"]["A"]["positives"] == int(np.nansum(y[:, 0]))
    assert metrics["per_label"]["A"]["observed"] == int(keep[:, 0].sum())
    assert metrics["per_label"]["C"]["auroc"] is None and metrics["labels_skipped_in_macro"] == ["C"]
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
    s = evaluate.metric_summary(average_precision, y, p)
    assert s["macro"] == pytest.approx(average_precision_score(y[:, keep], p[:, keep], average="macro"))
    assert s["micro"] == pytest.approx(average_precision_score(y, p, average="micro"))


def test_bootstrap_on_a_rare_label_never_gives_nan():
    rng = np.random.default_rng(1)
    y = (rng.random((120, 14)) < 0.3).astype(float)
    y[:, 3] = 0
    y[7, 3] = 1                                                 # one positive: many resamples have one class
    y[:, 5] = 0                                                 # never positive: no interval at all
    p = rng.random((120, 14))
    groups = np.repeat(np.arange(60), 2)                        # two images per report
    draws = bootstrap_draws(y, [p], groups, num_resamples=200)[0]
    assert np.isnan(draws["auroc"][:, 3]).any() and not np.isnan(draws["auroc"][:, 3]).all()
    assert not np.isnan(draws["macro_auroc"]).any() and not np.isnan(draws["macro_auprc"]).any()
    metrics = metrics_report(y, p, groups, num_resamples=200)
    assert "NaN" not in json.dumps(metrics)
    assert metrics["per_label"]["Edema"]["auroc"] is None and metrics["per_label"]["Edema"]["auroc_ci95"] is None
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
    a, b = bootstrap_draws(y, [p, p.copy()], np.arange(100) // 2, num_resamples=100)
    for key in evaluate.SUMMARY_KEYS:
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


def test_the_metrics_say_what_the_bootstrap_resampled():
    rng = np.random.default_rng(3)
    y, p = (rng.random((60, 2)) < 0.5).astype(float), rng.random((60, 2))
    metrics = metrics_report(y, p, np.arange(60) // 6, num_resamples=20, label_names=["A", "B"], unit="patients")
    assert metrics["bootstrap_unit"] == "patients" and metrics["num_bootstrap_units"] == 10
    assert "95% bootstrap over 10 patients" in evaluate.format_metrics(metrics, "title")


def test_bootstrap_keeps_the_images_of_a_report_together():
    from evaluate import bootstrap_indices
    groups = np.array([0, 0, 1, 1, 1, 2])
    for idx in bootstrap_indices(groups, 20, seed=0):
        counts = np.bincount(idx, minlength=6)
        assert counts[0] == counts[1] and counts[2] == counts[3] == counts[4]


# ------------------------------------------------------------------------------------------ calibration

def test_ece_is_near_zero_when_calibrated_and_exact_on_known_cases():
    rng = np.random.default_rng(5)
    p = rng.random(200_000)
    y = (rng.random(200_000) < p).astype(float)                 # P(y = 1 | p) = p: calibrated by construction
    assert expected_calibration_error(y, p) < 0.005
    y = np.r_[np.ones(60), np.zeros(40)]
    assert expected_calibration_error(y, np.full(100, 0.9)) == pytest.approx(0.3)      # says 90%, is 60%
    # two bins, half each: p = 0.2 with 50% positive (|0.2 - 0.5|), p = 0.8 with 75% positive (|0.8 - 0.75|)
    y = np.r_[np.ones(50), np.zeros(50), np.ones(75), np.zeros(25)]
    p = np.r_[np.full(100, 0.2), np.full(100, 0.8)]
    assert expected_calibration_error(y, p, num_bins=10) == pytest.approx(0.5 * 0.3 + 0.5 * 0.05)
    count, confidence, frequency = calibration_bins(y, p, num_bins=10)
    assert count.sum() == 200 and count[2] == count[8] == 100
    assert confidence[8] == pytest.approx(0.8) and frequency[2] == 0.5 and np.isnan(frequency[0])
    assert calibration_bins([1.0], [1.0], num_bins=10)[0][-1] == 1    # p = 1 falls in the last bin, not past it


def test_temperature_scaling_recovers_a_known_overconfidence():
    rng = np.random.default_rng(6)
    logits = rng.normal(0, 2, size=(20_000, 2))
    y = (rng.random(logits.shape) < 1 / (1 + np.exp(-logits))).astype(float)
    overconfident = 1 / (1 + np.exp(-2.0 * logits))             # the true logits doubled: T = 2 undoes it
    temperature = evaluate.fit_temperature(y, overconfident)
    assert temperature == pytest.approx(2.0, rel=0.05)
    scaled = evaluate.apply_temperature(overconfident, temperature)
    assert expected_calibration_error(y, scaled) < expected_calibration_error(y, overconfident) / 3
    assert auroc(y[:, 0], scaled[:, 0]) == pytest.approx(auroc(y[:, 0], overconfident[:, 0]))   # ranking kept


# ------------------------------------------------------------------------------------ operating points

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


# ----------------------------------------------------------------------------------------- uncertainty

def test_rejection_curve_rises_when_uncertainty_marks_the_errors():
    rng = np.random.default_rng(8)
    y = (rng.random((1000, 3)) < 0.4).astype(float)
    hard = rng.random(1000) < 0.3                               # images whose predictions are noise
    p = np.where(hard[:, None], rng.random((1000, 3)), 0.3 + 0.4 * y + 0.2 * rng.random((1000, 3)))
    informative = evaluate.rejection_curve(y, p, hard + 0.01 * rng.random(1000), (0.1, 0.3))
    assert informative[0.0] == pytest.approx(auroc_summary(y, p)["macro"])
    assert informative[0.0] < informative[0.1] < informative[0.3] == 1.0
    noise = evaluate.rejection_curve(y, p, rng.random(1000), (0.3,))
    assert abs(noise[0.3] - noise[0.0]) < 0.03


# ----------------------------------------------------------------------------------- runs and methods

def config(**changes):
    return {"method": "vkd", "seed": 0, "beta": 0.1, "out": "runs/x", "device": "auto"} | changes


def test_runs_differing_only_in_the_seed_are_one_method():
    configs = [config(method="image"), config(), config(seed=1, out="runs/y"), config(method="image", seed=1),
               config(beta=1.0), config()]
    assert evaluate.group_runs(configs) == [[0, 3], [1, 2], [4], [5]]   # a repeated seed is a new method


def fake_run(y, p, seed, method="vkd", unit="reports"):
    checkpoint = {"config": config(method=method, seed=seed), "split_sha256": "s", "epoch": 2,
                  "label_names": ["A", "B", "C"]}
    return evaluate.Evaluated(y, p, np.arange(len(y)) // 2, unit, evaluate.prediction_name(method, 0), checkpoint)


def test_comparison_of_seeds_and_an_identical_run():
    rng = np.random.default_rng(9)
    y = (rng.random((200, 3)) < 0.4).astype(float)
    predictions = [rng.random((200, 3)) + s * 0.2 * y for s in range(4)]
    runs = [fake_run(y, predictions[0], 0, "image"), fake_run(y, predictions[1], 0), fake_run(y, predictions[2], 1),
            fake_run(y, predictions[0], 0, "image")]
    result = evaluate.compare_runs(["a", "b", "c", "d"], runs, num_resamples=100)
    image, vkd, same = result["methods"]
    assert [m["name"] for m in result["methods"]] == ["image #1", "vkd", "image #3"]
    assert vkd["runs"] == [1, 2] and vkd["seeds"] == [0, 1]
    macros = [auroc_summary(y, p)["macro"] for p in predictions[1:3]]
    assert vkd["macro_auroc"]["mean"] == pytest.approx(np.mean(macros))
    assert vkd["macro_auroc"]["std"] == pytest.approx(np.std(macros, ddof=1))
    assert image["macro_auroc"]["std"] is None                  # one seed: no spread to report
    assert vkd["difference"]["macro_auroc"]["value"] == pytest.approx(
        np.mean(macros) - auroc_summary(y, predictions[0])["macro"])
    for key in evaluate.SUMMARY_KEYS:                           # the same predictions again: exactly zero
        assert same["difference"][key] == {"value": 0.0, "ci95": [0.0, 0.0], "p": 1.0}
    assert "NaN" not in json.dumps(result)
    table = evaluate.format_comparison(result)
    assert "| vkd - image #1 |" in table and "±" in table
    assert evaluate.p_value(0.0, 1000) == "p < 0.002" and evaluate.p_value(0.25, 1000) == "p = 0.250"
    assert result["bootstrap_unit"] == "reports" and result["num_bootstrap_units"] == 100
    assert "bootstrap over 100 reports" in table
    with pytest.raises(evaluate.data.DataError, match="not evaluated on the same split"):
        evaluate.compare_runs(["a", "b"], [runs[0], runs[1]._replace(unit="patients")], num_resamples=10)
    runs[2].checkpoint["split_sha256"] = "other"
    with pytest.raises(evaluate.data.DataError, match="not evaluated on the same split"):
        evaluate.compare_runs(["a", "b", "c", "d"], runs, num_resamples=10)


def test_pca_matches_the_first_two_principal_components():
    from sklearn.decomposition import PCA
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=(50, 6)) * [5, 3, 1, 1, 1, 1], rng.normal(size=(30, 6))
    ours = np.concatenate(evaluate.pca_2d([a, b]))
    reference = PCA(2).fit_transform(np.concatenate([a, b]))
    np.testing.assert_allclose(np.abs(ours), np.abs(reference), atol=1e-9)   # each axis up to its sign


def test_pictures_without_matplotlib_give_a_clear_message(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)   # makes `import matplotlib` fail
    with pytest.raises(evaluate.PlotError, match="pip install matplotlib"):
        evaluate.plot_training("unused", "unused")


class _Payload:
    """Unpickling this would create a file: a stand-in for code hidden in a shared checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused(tmp_path):
    import pickle

    import torch

    from evaluate import load_checkpoint
    marker = tmp_path / "payload-ran"
    torch.save({"model": {}, "payload": _Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="evil.pt was refused: not a whole checkpoint") as refused:
        load_checkpoint(tmp_path / "evil.pt")
    assert isinstance(refused.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()


def test_a_truncated_checkpoint_gives_a_clear_error(tmp_path):
    import torch

    from evaluate import load_checkpoint
    torch.save({"model": {}, "config": {"seed": 0}}, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:200])
    with pytest.raises(DataError, match="cut.pt was refused"):
        load_checkpoint(tmp_path / "cut.pt")


# ------------------------------------------------------------------------------------ prior samples

def test_samples_on_an_image_checkpoint_use_the_prior_mean_and_say_so():
    """The image baseline's logvar_p is untrained: --samples must not draw from it (but does for vkd)."""
    import torch
    from model import VKD, VKDConfig
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16), dtype=np.uint8)
    config = {"pixel_mean": 0.5, "pixel_std": 0.25}
    for method in ("image", "vkd"):
        torch.manual_seed(0)
        model = VKD(VKDConfig(method=method, cnn_width=4, latent_dim=8, text_dim=16, max_len=8, vocab_size=50))
        mean, _ = evaluate.predict(model, images, None, np.arange(6), config, "cpu", num_samples=0)
        sampled, std = evaluate.predict(model, images, None, np.arange(6), config, "cpu", num_samples=20)
        if method == "image":
            assert np.array_equal(sampled, mean) and not std.any()
        else:
            assert not np.allclose(sampled, mean) and std.all()
    assert evaluate.prediction_name("image", 20) == ("prior mean f(mu_p(x)) (--samples 20 not used: the image "
                                                     "baseline never trains logvar_p)")
    assert evaluate.prediction_name("vkd", 20) == "mean over 20 prior samples"
    assert evaluate.prediction_name("image", 0) == evaluate.prediction_name("vkd", 0) == "prior mean f(mu_p(x))"
