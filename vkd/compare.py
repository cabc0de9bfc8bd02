"""Comparison of several runs: methods and seeds on one test split, with paired bootstrap
differences.

Pure functions on predictions: evaluate.py's compare_checkpoints evaluates each checkpoint (an
Evaluated) and calls compare_runs; format_comparison writes the result as Markdown tables
(evaluate.py --compare, train.py --method all). Runs that differ only in the seed are one method
(group_runs), reported as mean and std across seeds (seed_statistics) with the bootstrap interval
of the seed mean.
"""
from typing import NamedTuple

import numpy as np

from vkd.metrics import (METRICS, SUMMARY_KEYS, bootstrap_draws, interval,
                         paired_difference, resampled, run_report)
from vkd.reports import LABELS, DataError
from vkd.summary import labelling_line

# the rows of a table's summaries: the macro mean over the labels, the mean over the five CheXpert
# competition labels, the micro value
KINDS = {"macro": "macro", "chexpert5": "CheXpert 5 mean", "micro": "micro"}
UNDEFINED = {"macro": "n/a", "chexpert5": "n/a (not all five defined)", "micro": "n/a"}

class Evaluated(NamedTuple):
    """One checkpoint evaluated on one split: what compare_runs compares."""
    labels: np.ndarray          # (N, K), NaN = not observed
    probabilities: np.ndarray   # (N, K)
    groups: np.ndarray          # (N,) bootstrap group of each image: its report or its patient
    unit: str                   # "reports" or "patients"
    prediction: str             # how the probabilities were made (prediction_name)
    checkpoint: dict
    labels_from: dict = None    # where the labels come from (vkd/summary.py's labelling)


# options that do not change what is learnt
# each seed's distill run learns from its own seed's teacher: the teacher's path is bookkeeping too
NOT_THE_METHOD = ("seed", "seeds", "out", "resume", "stop_after", "device", "data_dir", "compile",
                  "channels_last", "preload", "log_every", "bootstrap", "preset", "teacher",
                  "teacher_sha256")


# Options added after runs were saved, with the value those runs were trained with: a config
# without the key groups as if it had this value (so a run saved before the option existed is still
# a seed of the same method).
ADDED_OPTIONS = {"beta_cycle_epochs": 0, "posterior_input": "image+report", "classifier_input": "z",
                 "kl_direction": "qp", "average_samples": False, "train_fraction": 1.0,
                 "group_by_length": False, "word_dropout": 0.0, "sentence_shuffle": False,
                 "sentence_attention": False, "oversample": False, "report_control": "none",
                 "distill_alpha": 0.5, "distill_temperature": 2.0, "contrastive_weight": 1.0,
                 "contrastive_temperature": 0.1}


def group_runs(configs):
    """Runs whose configs differ only in the seed (and bookkeeping such as the run folder or device)
    are seeds of one method -> [[run index, ...], ...] in order of first appearance. A seed already
    in a group starts a new group, so a run compared with itself counts as two methods."""
    groups, keys = [], []
    for i, config in enumerate(configs):
        key = {k: v for k, v in (ADDED_OPTIONS | config).items() if k not in NOT_THE_METHOD}
        for group, group_key in zip(groups, keys):
            if group_key == key and all(configs[j]["seed"] != config["seed"] for j in group):
                group.append(i)
                break
        else:
            groups.append([i])
            keys.append(key)
    return groups


def seed_statistics(values):
    """Mean and sample std across seeds (std None for one seed; None where undefined)."""
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any():
        return {"mean": None, "std": None}
    return {"mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else None}


def nan_if_none(value):
    return np.nan if value is None else value


def compare_runs(paths, runs, num_resamples=1000, seed=0):
    """Runs = evaluate_checkpoint results (Evaluated) on one split. Each run gets its own estimates
    and intervals; runs that differ only in the seed form one method, reported as mean +- std across
    seeds with the interval of the seed mean; every method after the first gets the paired bootstrap
    of its difference to the first (seed means on the same resamples of reports or patients) with a
    p-value."""
    y, groups, unit, first = runs[0].labels, runs[0].groups, runs[0].unit, runs[0].checkpoint
    for path, run in zip(paths[1:], runs[1:]):
        if not (run.checkpoint["split_sha256"] == first["split_sha256"]
                and np.array_equal(groups, run.groups)
                and run.unit == unit and np.array_equal(y, run.labels, equal_nan=True)):
            raise DataError(f"{paths[0]} and {path} were not evaluated on the same split")
    label_names = first.get("label_names", LABELS)
    draws = bootstrap_draws(y, [run.probabilities for run in runs], groups, num_resamples, seed,
                            label_names)
    result = {"num_images": int(len(y)), **resampled(groups, unit), "num_resamples": num_resamples,
              "label_names": label_names, "labels_from": runs[0].labels_from,
              "runs": [], "methods": []}
    for path, draw, run in zip(paths, draws, runs):
        config = run.checkpoint["config"]
        result["runs"].append({"checkpoint": str(path), "method": config["method"],
                               "seed": config["seed"], "best_epoch": run.checkpoint["epoch"] + 1,
                               "prediction": run.prediction}
                              | run_report(y, run.probabilities, draw, label_names))
    configs = [run.checkpoint["config"] for run in runs]
    method_groups = group_runs(configs)
    names = [configs[g[0]]["method"] for g in method_groups]
    names = [n if names.count(n) == 1 else f"{n} #{i + 1}" for i, n in enumerate(names)]
    mean_draws = [{key: np.mean([draws[i][key] for i in g], axis=0) for key in draws[0]}
                  for g in method_groups]
    for name, g, mean_draw in zip(names, method_groups, mean_draws):
        runs_of = [result["runs"][i] for i in g]
        method = {"name": name, "runs": g, "seeds": [r["seed"] for r in runs_of], "per_label": {}}
        for k, label in enumerate(label_names):
            method["per_label"][label] = {
                metric: seed_statistics([nan_if_none(r["per_label"][label][metric])
                                         for r in runs_of])
                | {"ci95": interval(mean_draw[metric][:, k])} for metric in METRICS}
        for key in SUMMARY_KEYS:
            method[key] = (seed_statistics([nan_if_none(r[key]) for r in runs_of])
                           | {"ci95": interval(mean_draw[key])})
        if result["methods"]:
            baseline = result["methods"][0]
            method["difference"] = {"vs": baseline["name"]}
            for key in SUMMARY_KEYS:
                a, b = baseline[key]["mean"], method[key]["mean"]
                method["difference"][key] = {
                    "value": None if a is None or b is None else b - a,
                    **paired_difference(mean_draw[key] - mean_draws[0][key])}
        result["methods"].append(method)
    return result


def summary_name(key):
    """'macro_auroc' -> 'macro AUROC', 'chexpert5_auroc' -> 'CheXpert 5 mean AUROC'."""
    kind, metric = key.split("_")
    return f"{KINDS[kind]} {metric.upper()}"


def cell(value, ci, std=None, missing="n/a (one class only)"):
    """'0.912 +- 0.010 [0.880, 0.940]' (std only for several seeds); `missing` when undefined."""
    if value is None:
        return missing
    text = f"{value:.3f}" + (f" ± {std:.3f}" if std is not None else "")
    return text + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def signed(value):
    """'+0.018', '-0.023'; a value that rounds to zero is '0.000', not '-0.000'."""
    text = f"{value:+.3f}"
    return "0.000" if text in ("+0.000", "-0.000") else text


def difference_cell(d, num_resamples):
    """A paired difference as '+0.018 [+0.004, +0.031], p = 0.012'; n/a when undefined."""
    if d["value"] is None or d["ci95"] is None:
        return "n/a"
    return (f"{signed(d['value'])} [{signed(d['ci95'][0])}, {signed(d['ci95'][1])}], "
            f"{p_value(d['p'], num_resamples)}")


def p_value(p, num_resamples):
    """No resample on the far side of zero bounds p by the resolution of the bootstrap, it does not
    make it 0."""
    return f"p < {2 / num_resamples:.3f}" if p == 0 else f"p = {p:.3f}"


def format_comparison(result):
    """The comparison as Markdown tables (readable in a terminal, pasteable into a README)."""
    methods, first, resamples = result["methods"], result["runs"][0], result["num_resamples"]
    several_seeds = any(len(m["runs"]) > 1 for m in methods)
    lines = [f"test split: {result['num_images']} images; 95% intervals: bootstrap over "
             f"{result['num_bootstrap_units']} {result['bootstrap_unit']} "
             f"({result['num_resamples']} resamples)"
             + ("; mean ± std across seeds, interval of the seed mean"
                if several_seeds else "")]
    if result.get("labels_from"):
        lines.append(labelling_line(result["labels_from"], result["bootstrap_unit"]))
    lines.append("")
    header = "| label | positives | " + " | ".join(m["name"] for m in methods) + " |"
    rule = "|---|---:|" + "---|" * len(methods)
    for metric in METRICS:
        lines += [f"{metric.upper()}", "", header, rule]
        for label in result["label_names"]:
            cells = [cell(m["per_label"][label][metric]["mean"],
                          m["per_label"][label][metric]["ci95"],
                          m["per_label"][label][metric]["std"]) for m in methods]
            lines.append(f"| {label} | {first['per_label'][label]['positives']} | "
                         + " | ".join(cells) + " |")
        for kind, kind_name in KINDS.items():
            key = f"{kind}_{metric}"
            lines.append(f"| **{kind_name}** | | "
                         + " | ".join(cell(m[key]["mean"], m[key]["ci95"], m[key]["std"],
                                           UNDEFINED[kind]) for m in methods) + " |")
        lines.append("")
    if len(methods) > 1:
        lines += [f"paired bootstrap of each difference to {methods[0]['name']} (same resamples"
                  + (", seed means" if several_seeds else "")
                  + "): difference [95% CI], two-sided p", "",
                  "| difference | " + " | ".join(summary_name(k) for k in SUMMARY_KEYS) + " |",
                  "|---|" + "---|" * len(SUMMARY_KEYS)]
        for m in methods[1:]:
            cells = [difference_cell(m["difference"][key], resamples) for key in SUMMARY_KEYS]
            lines.append(f"| {m['name']} - {methods[0]['name']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["each run", "", *runs_table(result)]
    return "\n".join(lines)


def runs_table(result):
    """The table of a comparison's runs: each run's macro AUROC, CheXpert 5 mean and macro AUPRC
    with their intervals, and how its probabilities were made."""
    lines = ["| run | method | seed | best epoch | macro AUROC | CheXpert 5 mean AUROC | "
             "macro AUPRC | probabilities |",
             "|---|---|---:|---:|---|---|---|---|"]
    for run in result["runs"]:
        cells = [cell(run[key], run[f"{key}_ci95"], None, UNDEFINED[key.split("_")[0]])
                 for key in ("macro_auroc", "chexpert5_auroc", "macro_auprc")]
        lines.append(f"| {run['checkpoint']} | {run['method']} | {run['seed']} | "
                     f"{run['best_epoch']} | " + " | ".join(cells) + f" | {run['prediction']} |")
    return lines


def format_metrics(metrics, title):
    lines = [title, f"{'label':28s} {'positives':>9s}  {'AUROC [95% CI]':24s}  AUPRC [95% CI]"]
    for name, m in metrics["per_label"].items():
        lines.append(f"{name:28s} {m['positives']:9d}  {cell(m['auroc'], m['auroc_ci95']):24s}  "
                     f"{cell(m['auprc'], m['auprc_ci95'])}")
    for kind, kind_name in KINDS.items():
        auroc = cell(metrics[f"{kind}_auroc"], metrics[f"{kind}_auroc_ci95"], None, UNDEFINED[kind])
        auprc = cell(metrics[f"{kind}_auprc"], metrics[f"{kind}_auprc_ci95"], None, UNDEFINED[kind])
        lines.append(f"{kind_name:28s} {'':9s}  {auroc:24s}  {auprc}")
    if metrics["labels_skipped_in_macro"]:
        skipped = ", ".join(metrics["labels_skipped_in_macro"])
        lines.append(f"left out of macro (one class in this split): {skipped}")
    lines.append(f"{metrics['num_images']} images; intervals: 95% bootstrap over "
                 f"{metrics['num_bootstrap_units']} {metrics['bootstrap_unit']}")
    if "labels_from" in metrics:
        lines.append(labelling_line(metrics["labels_from"]))
    if "prediction" in metrics:
        lines.append(f"probabilities: {metrics['prediction']}")
    return "\n".join(lines)
