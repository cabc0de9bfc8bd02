"""Metrics: AUROC against scikit-learn, macro that never counts undefined labels, bootstrap intervals."""
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from evaluate import auroc, auroc_summary, average_ranks, bootstrap, metrics_report


def test_average_ranks_with_ties():
    np.testing.assert_array_equal(average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [4, 1, 4, 2, 4])


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.3
    score = np.round(rng.random(300) + 0.3 * y, 1)             # rounding makes many ties
    assert auroc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)


def test_auroc_degenerate_cases():
    assert np.isnan(auroc([0, 0, 0], [0.1, 0.2, 0.3]))        # one class: undefined, not 0
    assert np.isnan(auroc([1, 1], [0.1, 0.2]))
    assert auroc([0, 1], [0.2, 0.9]) == 1.0
    assert auroc([0, 1], [0.9, 0.2]) == 0.0
    assert auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5   # all tied


def test_macro_and_micro_match_sklearn_and_skip_undefined_labels():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 14)) < 0.3).astype(float)
    p = rng.random((200, 14)) * 0.5 + 0.5 * y * rng.random((200, 14))
    y[:, 4] = 0                                                # label 4 has no positive
    s = auroc_summary(y, p)
    keep = [k for k in range(14) if k != 4]
    assert s["macro"] == pytest.approx(roc_auc_score(y[:, keep], p[:, keep], average="macro"))
    assert s["micro"] == pytest.approx(roc_auc_score(y, p, average="micro"))
    assert np.isnan(s["per_label"][4]) and not s["defined"][4] and s["defined"].sum() == 13


def test_bootstrap_on_a_rare_label_never_gives_nan():
    rng = np.random.default_rng(1)
    y = (rng.random((120, 14)) < 0.3).astype(float)
    y[:, 3] = 0
    y[7, 3] = 1                                                 # one positive: many resamples have one class
    y[:, 5] = 0                                                 # never positive: no interval at all
    p = rng.random((120, 14))
    groups = np.repeat(np.arange(60), 2)                        # two images per report
    metrics = metrics_report(y, p, groups, num_resamples=200)
    text = json.dumps(metrics)
    assert "NaN" not in text
    assert metrics["per_label"]["Edema"]["auroc"] is None and metrics["per_label"]["Edema"]["ci95"] is None
    assert metrics["labels_skipped_in_macro"] == ["Edema"]
    lo, hi = metrics["per_label"]["Lung Lesion"]["ci95"]
    assert 0 <= lo <= hi <= 1
    lo, hi = metrics["macro_ci95"]
    assert lo < metrics["macro_auroc"] < hi


def test_paired_bootstrap_of_identical_predictions_is_exactly_zero():
    rng = np.random.default_rng(2)
    y = (rng.random((100, 14)) < 0.3).astype(float)
    p = rng.random((100, 14))
    groups = np.arange(100) // 2
    paired = bootstrap(y, [p, p.copy()], groups, num_resamples=100)[1]
    assert paired["macro_difference_ci"] == [0.0, 0.0]
    assert paired["macro_difference_p"] == 1.0


def test_paired_bootstrap_detects_a_real_difference():
    rng = np.random.default_rng(3)
    y = (rng.random((300, 14)) < 0.3).astype(float)
    weak = rng.random((300, 14)) + 0.2 * y
    strong = rng.random((300, 14)) + 1.0 * y
    paired = bootstrap(y, [weak, strong], np.arange(300), num_resamples=200)[1]
    assert paired["macro_difference_ci"][0] > 0 and paired["macro_difference_p"] < 0.01


def test_bootstrap_keeps_the_images_of_a_report_together():
    from evaluate import bootstrap_indices
    groups = np.array([0, 0, 1, 1, 1, 2])
    for idx in bootstrap_indices(groups, 20, seed=0):
        counts = np.bincount(idx, minlength=6)
        assert counts[0] == counts[1] and counts[2] == counts[3] == counts[4]


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
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
