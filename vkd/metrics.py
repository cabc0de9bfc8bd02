"""Metrics: AUROC, AUPRC and the bootstrap, in numpy alone, so that every number can be read line
by line.

evaluate.py reports a checkpoint with metrics_report's parts (bootstrap_draws, run_report), train.py
selects the best epoch by auroc_summary's macro AUROC on validation, vkd/compare.py pairs several
runs with paired_difference. A label may be NaN, "not observed" (e.g. an uncertain MIMIC label under
--uncertain ignore): every metric leaves those entries out, label by label (observed). Intervals are
95% percentile bootstrap intervals over whole groups, reports or patients (bootstrap_indices).
"""
import numpy as np

# ------------------------------------------------------------------------------------------ metrics

SUMMARY_KEYS = ("macro_auroc", "chexpert5_auroc", "micro_auroc",
                "macro_auprc", "chexpert5_auprc", "micro_auprc")

# The five CheXpert competition labels (Irvin et al., AAAI 2019): the field's usual summary beside
# the macro mean over all labels.
CHEXPERT5 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def observed(y, score):
    """Leave out the entries whose label is NaN (not observed)
    -> (y as bool, score as float64), 1-D."""
    y, score = np.asarray(y, dtype=np.float64).ravel(), np.asarray(score, dtype=np.float64).ravel()
    keep = ~np.isnan(y)
    return y[keep].astype(bool), score[keep]


def average_ranks(x):
    """1-based ranks of x with ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]  # tie group g spans sorted positions [start, end)
    group = np.repeat(np.arange(len(starts)), ends - starts)
    ranks = np.empty(len(x))
    ranks[order] = ((starts + 1 + ends) / 2.0)[group]
    return ranks


def auroc(y, score):
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counting 1/2
    (the Mann-Whitney U statistic). NaN when y has only one class: the AUROC is undefined then,
    not 0."""
    y, score = observed(y, score)
    n_pos, n_neg = y.sum(), (~y).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def threshold_counts(y, score):
    """Calling `score >= threshold` positive, with each distinct score as the threshold from the
    highest down: -> (thresholds, true positives, false positives), each (T,).
    y bool without NaN."""
    order = np.argsort(-score, kind="mergesort")
    y, score = y[order], score[order]
    # last position of each tie group
    last = np.r_[np.flatnonzero(score[1:] != score[:-1]), len(score) - 1]
    tp = np.cumsum(y)[last]
    return score[last], tp, last + 1 - tp


def average_precision(y, score):
    """Area under the precision-recall curve as average precision, AP = sum_n (R_n - R_{n-1}) P_n
    over the thresholds (no interpolation, as scikit-learn defines it). NaN when y has one class,
    like the AUROC: with no positive it is undefined, and with no negative it is 1 whatever the
    scores."""
    y, score = observed(y, score)
    n_pos = y.sum()
    if n_pos == 0 or n_pos == len(y):
        return float("nan")
    _, tp, fp = threshold_counts(y, score)
    precision, recall = tp / (tp + fp), tp / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


METRICS = {"auroc": auroc, "auprc": average_precision}


def chexpert5_mean(per_label, label_names):
    """Mean of per-label values (..., K) over the five competition labels; NaN unless all five are
    defined (a label with one class in the split, or labels without the five, a CSV's own): a mean
    of four would be another number under the same name."""
    if label_names is None or not set(CHEXPERT5) <= set(label_names):
        return np.full(np.shape(per_label)[:-1], np.nan)
    columns = [list(label_names).index(name) for name in CHEXPERT5]
    return np.asarray(per_label, dtype=np.float64)[..., columns].mean(axis=-1)


def metric_summary(metric, y, p, label_names=None):
    """Per-label values of `metric` on (N, K) arrays; their macro average over the labels where it
    is defined (both classes observed; the others are left out, never counted as 0); their mean
    over the five competition labels (chexpert5_mean, NaN without label names); and the micro value
    over all observed (sample, label) pairs."""
    per_label = np.array([metric(y[:, k], p[:, k]) for k in range(y.shape[1])])
    defined = ~np.isnan(per_label)
    return {"per_label": per_label,
            "macro": float(per_label[defined].mean()) if defined.any() else float("nan"),
            "chexpert5": float(chexpert5_mean(per_label, label_names)),
            "micro": metric(y, p),
            "defined": defined}


def auroc_summary(y, p):
    return metric_summary(auroc, y, p)


# ---------------------------------------------------------------------------------------- bootstrap

def bootstrap_indices(groups, num_resamples, seed):
    """Yield sample indices of resamples that draw whole groups (reports, or patients) with
    replacement: all images of a report, or all studies of a patient, stay together, since they are
    not independent."""
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    rng = np.random.default_rng(seed)
    for _ in range(num_resamples):
        yield np.concatenate([members[g] for g in rng.integers(0, len(unique), len(unique))])


def bootstrap_draws(y, predictions, groups, num_resamples=1000, seed=0, label_names=None):
    """AUROC and AUPRC of each (N, K) array in `predictions` on the same resamples of groups, so
    that differences between them are paired. Returns one dict per array: "auroc" and "auprc"
    (R, K), NaN where a resample leaves a label with one class, and each of SUMMARY_KEYS (R,).
    A resample's macro mean averages the labels defined in that resample; its five-label mean is
    NaN when one of the five is not, and the interval leaves that resample out."""
    draws = [{key: [] for key in (*METRICS, *SUMMARY_KEYS)} for _ in predictions]
    for idx in bootstrap_indices(groups, num_resamples, seed):
        for draw, p in zip(draws, predictions):
            for name, metric in METRICS.items():
                s = metric_summary(metric, y[idx], p[idx], label_names)
                draw[name].append(s["per_label"])
                for kind in ("macro", "chexpert5", "micro"):
                    draw[f"{kind}_{name}"].append(s[kind])
    return [{key: np.array(values) for key, values in draw.items()} for draw in draws]


def interval(values):
    """Percentile 95% interval of bootstrap values, NaN resamples left out;
    None when none is defined."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return ([float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
            if len(values) else None)


def paired_difference(difference):
    """Bootstrap distribution of a paired difference (B - A on the same resamples) -> its 95%
    interval and a two-sided p-value for 'no difference': twice the share of resamples on the far
    side of zero, at most 1."""
    difference = np.asarray(difference, dtype=np.float64)
    difference = difference[~np.isnan(difference)]
    if not len(difference):
        return {"ci95": None, "p": None}
    p = 2 * min((difference <= 0).mean(), (difference >= 0).mean())
    return {"ci95": interval(difference), "p": float(min(1.0, p))}


# ---------------------------------------------------------------- one run's numbers, ready for JSON

def none_if_nan(value):
    return None if value is None or np.isnan(value) else float(value)


def run_report(y, p, draws, label_names):
    """Point estimates of one run with the intervals of its bootstrap draws,
    as a JSON-ready dict."""
    summaries = {name: metric_summary(metric, y, p, label_names)
                 for name, metric in METRICS.items()}
    per_label = {}
    for k, label in enumerate(label_names):
        per_label[label] = {"positives": int(np.nansum(y[:, k])),
                            "observed": int((~np.isnan(y[:, k])).sum())}
        for name in METRICS:
            per_label[label] |= {name: none_if_nan(summaries[name]["per_label"][k]),
                                 f"{name}_ci95": interval(draws[name][:, k])}
    report = {"num_images": int(len(y)), "per_label": per_label}
    for key in SUMMARY_KEYS:
        kind, name = key.split("_")
        report |= {key: none_if_nan(summaries[name][kind]), f"{key}_ci95": interval(draws[key])}
    report["labels_skipped_in_macro"] = [
        n for n, ok in zip(label_names, summaries["auroc"]["defined"]) if not ok]
    return report


def resampled(groups, unit):
    """What the bootstrap drew, for the output:
    {"bootstrap_unit": "reports", "num_bootstrap_units": 120}."""
    return {"bootstrap_unit": unit, "num_bootstrap_units": int(len(np.unique(groups)))}
