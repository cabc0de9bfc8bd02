"""Calibration, operating points and uncertainty: what a probability of one run means beyond its
ranking.

evaluate.py's single-run report calls calibration_report (ECE before and after temperature scaling,
the temperature fitted on validation by fit_temperature), operating_points_report (thresholds chosen
on validation, measured on test), rejection_curve (macro AUROC after referring the most uncertain
images to a reader) and format_analysis (all three as text). pictures.py draws the reliability
diagram from calibration_bins.
"""
import numpy as np
import torch
import torch.nn.functional as F

from vkd.metrics import auroc_summary, none_if_nan, observed, threshold_counts

# -------------------------------------------------------------------------------------- calibration

def calibration_bins(y, p, num_bins=15):
    """Equal-width bins of predicted probability over the observed entries -> (count, mean predicted
    probability, fraction positive), each (num_bins,); the means are NaN in empty bins."""
    y, p = observed(y, p)
    bins = np.minimum((p * num_bins).astype(int), num_bins - 1)
    count = np.bincount(bins, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(bins, weights=p, minlength=num_bins) / count
        frequency = np.bincount(bins, weights=y.astype(np.float64), minlength=num_bins) / count
    return count, confidence, frequency


def expected_calibration_error(y, p, num_bins=15):
    """ECE = sum_b (n_b / n) |mean p in bin b - fraction positive in bin b| over equal-width bins of
    p. Each label is its own binary event, so every probability counts (not only the top class, as
    in multi-class ECE). NaN when nothing is observed."""
    count, confidence, frequency = calibration_bins(y, p, num_bins)
    filled = count > 0
    if not filled.any():
        return float("nan")
    return float(np.sum(count[filled] * np.abs(confidence[filled] - frequency[filled]))
                 / count.sum())


def logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def fit_temperature(y, p):
    """One temperature T for all labels minimising the BCE of sigmoid(logit(p) / T) on the given
    labels (Guo et al., 2017). Fit it on validation only. T > 1 softens over-confident
    probabilities; the ranking, and so AUROC and AUPRC, stay as they are."""
    y, logits = observed(y, logit(p))
    logits, target = torch.from_numpy(logits), torch.from_numpy(y.astype(np.float64))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = exp(log_t) > 0
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(logits / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def apply_temperature(p, temperature):
    return 1.0 / (1.0 + np.exp(-logit(p) / temperature))


def calibration_report(y, p, label_names, num_bins=15, temperature=None):
    """ECE per label, its mean over labels, and over all observed (sample, label) pairs pooled
    (dominated by the many confident negatives, so lower), before and (given T) after temperature
    scaling."""
    def eces(probabilities, suffix=""):
        per_label = [expected_calibration_error(y[:, k], probabilities[:, k], num_bins)
                     for k in range(len(label_names))]
        return {f"ece_per_label{suffix}": {name: none_if_nan(e)
                                           for name, e in zip(label_names, per_label)},
                f"ece_mean{suffix}": (none_if_nan(np.nanmean(per_label))
                                      if not np.isnan(per_label).all() else None),
                f"ece{suffix}": none_if_nan(expected_calibration_error(y, probabilities, num_bins))}
    report = {"num_bins": num_bins, "temperature": temperature} | eces(p)
    if temperature is not None:
        report |= eces(apply_temperature(p, temperature), "_scaled")
    return report


# --------------------------------------------------------------------------------- operating points

def choose_threshold(y, p, target_sensitivity=None):
    """Threshold t for calling a label positive (p >= t), chosen on validation: the one maximising
    Youden's J = sensitivity + specificity - 1, or, given a target sensitivity, the highest
    threshold that reaches it. NaN when the label has one class there."""
    y, p = observed(y, p)
    n_pos, n_neg = y.sum(), (~y).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    thresholds, tp, fp = threshold_counts(y, p)
    sensitivity, specificity = tp / n_pos, 1 - fp / n_neg
    if target_sensitivity is None:
        return float(thresholds[np.argmax(sensitivity + specificity - 1)])
    # the first index reaching it
    return float(thresholds[np.argmax(sensitivity >= target_sensitivity)])


def ratio(a, b):
    return float(a / b) if b else None


def operating_point(y, p, threshold):
    """Sensitivity, specificity and positive predictive value of calling p >= threshold positive."""
    y, p = observed(y, p)
    called = p >= threshold
    tp, fp, fn, tn = ((called & y).sum(), (called & ~y).sum(),
                      (~called & y).sum(), (~called & ~y).sum())
    return {"threshold": float(threshold), "sensitivity": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp), "ppv": ratio(tp, tp + fp)}


def operating_points_report(y_val, p_val, y_test, p_test, label_names, target_sensitivity=None):
    """Per-label thresholds chosen on validation, measured on test (None for a label with one class
    on val)."""
    report = {}
    for k, name in enumerate(label_names):
        threshold = choose_threshold(y_val[:, k], p_val[:, k], target_sensitivity)
        report[name] = (None if np.isnan(threshold)
                        else operating_point(y_test[:, k], p_test[:, k], threshold))
    return report


# -------------------------------------------------------------------------------------- uncertainty

def rejection_curve(y, p, uncertainty, fractions=(0.1, 0.2, 0.3)):
    """Macro AUROC on the images kept after rejecting the given fraction with the highest
    uncertainty (referring them to a reader). If the spread of p(z|x) carries information, the
    AUROC rises with the fraction rejected; if it is noise, it stays level.
    -> {fraction: macro AUROC}, 0.0 = nothing rejected."""
    most_uncertain_first = np.argsort(-uncertainty, kind="stable")
    curve = {}
    for fraction in (0.0, *fractions):
        keep = np.sort(most_uncertain_first[int(round(fraction * len(y))):])
        curve[fraction] = none_if_nan(auroc_summary(y[keep], p[keep])["macro"])
    return curve


# --------------------------------------------------------------------------------------------- text

def format_analysis(result):
    """Calibration, operating points and uncertainty of one run, as text."""
    calibration, lines = result["calibration"], []
    temperature = calibration["temperature"]

    def number(value, width=8):
        return f"{value:{width}.3f}" if value is not None else f"{'n/a':>{width}s}"
    lines.append(f"calibration: ECE over {calibration['num_bins']} equal-width bins"
                 + (f"; temperature T = {temperature:.3f} fitted on val"
                    if temperature is not None else ""))
    lines.append(f"{'label':28s} {'ECE':>8s}"
                 + (f" {'ECE at T':>8s}" if temperature is not None else ""))
    rows = [(name, ece, calibration.get("ece_per_label_scaled", {}).get(name))
            for name, ece in calibration["ece_per_label"].items()]
    rows.append(("mean over labels", calibration["ece_mean"], calibration.get("ece_mean_scaled")))
    rows.append(("all labels pooled", calibration["ece"], calibration.get("ece_scaled")))
    for name, ece, scaled in rows:
        lines.append(f"{name:28s} {number(ece)}"
                     + (f" {number(scaled)}" if temperature is not None else ""))
    points = result["operating_points"]
    lines += ["", f"operating points: thresholds chosen on val by {points['rule']}, measured on "
                  f"{result['split']}", f"{'label':28s} {'threshold':>9s} {'sensitivity':>11s} "
                                        f"{'specificity':>11s} {'PPV':>8s}"]
    for name, point in points["per_label"].items():
        if point is None:
            lines.append(f"{name:28s} {'n/a (one class on val)':>9s}")
        else:
            lines.append(f"{name:28s} {point['threshold']:9.3f} {number(point['sensitivity'], 11)} "
                         f"{number(point['specificity'], 11)} {number(point['ppv'])}")
    uncertainty = result.get("uncertainty")
    if uncertainty:
        curve = ", ".join(f"{float(f):.0%} {number(a, 0)}"
                          for f, a in uncertainty["macro_auroc_after_rejecting"].items())
        lines += ["", f"uncertainty: std of p over {uncertainty['samples']} prior samples, "
                      f"averaged over labels, per image (median {uncertainty['median']:.4f}, "
                      f"90th percentile {uncertainty['p90']:.4f})",
                  f"macro AUROC of the {uncertainty['samples']}-sample mean after rejecting the "
                  f"most uncertain: {curve}"]
    return "\n".join(lines)
