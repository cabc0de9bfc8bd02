"""compare.py: runs grouped into methods by their configs, seeds averaged, paired differences to the
first."""
import json

import numpy as np
import pytest

import evaluate
from vkd.metrics import SUMMARY_KEYS, auroc_summary
from vkd.compare import Evaluated, compare_runs, format_comparison, group_runs, p_value
from vkd.reports import LABELS, DataError
from vkd.summary import labelling


def config(**changes):
    return {"method": "vkd", "seed": 0, "beta": 0.1, "out": "runs/x", "device": "auto"} | changes


def test_runs_differing_only_in_the_seed_are_one_method():
    configs = [config(method="image"), config(), config(seed=1, out="runs/y"),
               config(method="image", seed=1), config(beta=1.0), config()]
    assert group_runs(configs) == [[0, 3], [1, 2], [4], [5]]   # a repeated seed is a new method


def test_a_run_saved_before_an_option_existed_groups_with_runs_at_its_default():
    old = {"method": "vkd", "beta": 0.1, "seed": 0}
    new = old | {"seed": 1, "kl_direction": "qp", "train_fraction": 1.0,
                 "posterior_input": "image+report", "group_by_length": False, "word_dropout": 0.0,
                 "sentence_shuffle": False}
    authors = old | {"seed": 2, "kl_direction": "pq"}
    grouped = old | {"seed": 3, "group_by_length": True}
    assert group_runs([old, new, authors, grouped]) == [[0, 1], [2], [3]]


def fake_run(y, p, seed, method="vkd", unit="reports", label_names=("A", "B", "C")):
    checkpoint = {"config": config(method=method, seed=seed), "split_sha256": "s", "epoch": 2,
                  "label_names": list(label_names)}
    return Evaluated(y, p, np.arange(len(y)) // 2, unit, evaluate.prediction_name(method, 0),
                     checkpoint, labelling({"data": "openi"}))


def test_comparison_of_seeds_and_an_identical_run():
    rng = np.random.default_rng(9)
    y = (rng.random((200, 3)) < 0.4).astype(float)
    predictions = [rng.random((200, 3)) + s * 0.2 * y for s in range(4)]
    runs = [fake_run(y, predictions[0], 0, "image"), fake_run(y, predictions[1], 0),
            fake_run(y, predictions[2], 1), fake_run(y, predictions[0], 0, "image")]
    result = compare_runs(["a", "b", "c", "d"], runs, num_resamples=100)
    image, vkd, same = result["methods"]
    assert [m["name"] for m in result["methods"]] == ["image #1", "vkd", "image #3"]
    assert vkd["runs"] == [1, 2] and vkd["seeds"] == [0, 1]
    macros = [auroc_summary(y, p)["macro"] for p in predictions[1:3]]
    assert vkd["macro_auroc"]["mean"] == pytest.approx(np.mean(macros))
    assert vkd["macro_auroc"]["std"] == pytest.approx(np.std(macros, ddof=1))
    assert image["macro_auroc"]["std"] is None                  # one seed: no spread to report
    assert vkd["difference"]["macro_auroc"]["value"] == pytest.approx(
        np.mean(macros) - auroc_summary(y, predictions[0])["macro"])
    for key in SUMMARY_KEYS:                           # the same predictions again: exactly zero
        if not key.startswith("chexpert5"):            # labels A, B, C: no five-label mean
            assert same["difference"][key] == {"value": 0.0, "ci95": [0.0, 0.0], "p": 1.0}
    assert same["difference"]["chexpert5_auroc"]["value"] is None
    assert "NaN" not in json.dumps(result)
    table = format_comparison(result)
    assert "| vkd - image #1 |" in table and "±" in table
    assert p_value(0.0, 1000) == "p < 0.002" and p_value(0.25, 1000) == "p = 0.250"
    assert result["bootstrap_unit"] == "reports" and result["num_bootstrap_units"] == 100
    assert "bootstrap over 100 reports" in table
    with pytest.raises(DataError, match="not evaluated on the same split"):
        compare_runs(["a", "b"], [runs[0], runs[1]._replace(unit="patients")], num_resamples=10)
    runs[2].checkpoint["split_sha256"] = "other"
    with pytest.raises(DataError, match="not evaluated on the same split"):
        compare_runs(["a", "b", "c", "d"], runs, num_resamples=10)


def test_a_comparison_states_the_five_label_mean_and_where_its_labels_come_from():
    rng = np.random.default_rng(10)
    y = (rng.random((200, 14)) < 0.4).astype(float)
    p = rng.random((200, 14)) + 0.3 * y
    runs = [fake_run(y, p, 0, "image", label_names=LABELS), fake_run(y, p, 0, label_names=LABELS)]
    result = compare_runs(["a", "b"], runs, num_resamples=50)
    vkd = result["methods"][1]
    assert vkd["chexpert5_auroc"]["mean"] == pytest.approx(result["runs"][1]["chexpert5_auroc"])
    assert vkd["difference"]["chexpert5_auroc"] == {"value": 0.0, "ci95": [0.0, 0.0], "p": 1.0}
    table = format_comparison(result)
    assert "| **CheXpert 5 mean** |" in table
    assert "labels: MeSH majors of the OpenI reports (vkd/openi.py); uncertain: none" in table
    assert "bootstrap unit: reports" in table
