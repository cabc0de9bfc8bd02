"""Evaluate: what a checkpoint does on images alone, with the uncertainty of every number stated.

    python evaluate.py --ckpt runs/demo-vkd-seed0/best.pt            # test split: AUROC/AUPRC with intervals,
                                                                     # calibration, operating points, uncertainty
    python evaluate.py --ckpt runs/demo-vkd-seed0/best.pt --plots    # + ROC/PR, reliability, training, latent PNGs
    python evaluate.py --compare runs/demo-image-seed0/best.pt runs/demo-vkd-seed0/best.pt   # paired, vs the first
    python evaluate.py --ckpt runs/demo-vkd-seed0/best.pt --image a.png b.jpg --cam Cardiomegaly

Test-time inference uses the image-only prior p(z|x) (VKD.predict); the `text` baseline is the one exception,
evaluated with its report (VKD.predict_with_text) because it is an upper bound, not a test-time model.
A label may be NaN, "not observed" (e.g. an uncertain MIMIC label under --uncertain ignore): every metric
below leaves those entries out, label by label. Intervals are 95% percentile bootstrap over reports (OpenI, the
demo), or over patients where the collection names them (MIMIC-CXR, a CSV with a patient column); the output
says which. The `image` baseline is always evaluated at the prior mean (see prior_samples).
"""
import argparse
import json
import pickle
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
from data import LABELS
from image_cache import decode_job
from model import VKD, ImageEncoder, VKDConfig

SUMMARY_KEYS = ("macro_auroc", "micro_auroc", "macro_auprc", "micro_auprc")

# --------------------------------------------------------------------------------------------- metrics


def observed(y, score):
    """Leave out the entries whose label is NaN (not observed) -> (y as bool, score as float64), 1-D."""
    y, score = np.asarray(y, dtype=np.float64).ravel(), np.asarray(score, dtype=np.float64).ravel()
    keep = ~np.isnan(y)
    return y[keep].astype(bool), score[keep]


def average_ranks(x):
    """1-based ranks of x with ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]                      # tie group g spans sorted positions [start, end)
    group = np.repeat(np.arange(len(starts)), ends - starts)
    ranks = np.empty(len(x))
    ranks[order] = ((starts + 1 + ends) / 2.0)[group]
    return ranks


def auroc(y, score):
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counting 1/2
    (the Mann-Whitney U statistic). NaN when y has only one class: the AUROC is undefined then, not 0."""
    y, score = observed(y, score)
    n_pos, n_neg = y.sum(), (~y).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def threshold_counts(y, score):
    """Calling `score >= threshold` positive, with each distinct score as the threshold from the highest down:
    -> (thresholds, true positives, false positives), each (T,). y bool without NaN."""
    order = np.argsort(-score, kind="mergesort")
    y, score = y[order], score[order]
    last = np.r_[np.flatnonzero(score[1:] != score[:-1]), len(score) - 1]     # last position of each tie group
    tp = np.cumsum(y)[last]
    return score[last], tp, last + 1 - tp


def average_precision(y, score):
    """Area under the precision-recall curve as average precision, AP = sum_n (R_n - R_{n-1}) P_n over the
    thresholds (no interpolation, as scikit-learn defines it). NaN when y has one class, like the AUROC: with
    no positive it is undefined, and with no negative it is 1 whatever the scores."""
    y, score = observed(y, score)
    n_pos = y.sum()
    if n_pos == 0 or n_pos == len(y):
        return float("nan")
    _, tp, fp = threshold_counts(y, score)
    precision, recall = tp / (tp + fp), tp / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


METRICS = {"auroc": auroc, "auprc": average_precision}


def metric_summary(metric, y, p):
    """Per-label values of `metric` on (N, K) arrays, their macro average over the labels where it is defined
    (both classes observed; the others are left out, never counted as 0) and the micro value over all
    observed (sample, label) pairs."""
    per_label = np.array([metric(y[:, k], p[:, k]) for k in range(y.shape[1])])
    defined = ~np.isnan(per_label)
    return {"per_label": per_label, "macro": float(per_label[defined].mean()) if defined.any() else float("nan"),
            "micro": metric(y, p), "defined": defined}


def auroc_summary(y, p):
    return metric_summary(auroc, y, p)


def bootstrap_indices(groups, num_resamples, seed):
    """Yield sample indices of resamples that draw whole groups (reports, or patients) with replacement: all
    images of a report, or all studies of a patient, stay together, since they are not independent."""
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    rng = np.random.default_rng(seed)
    for _ in range(num_resamples):
        yield np.concatenate([members[g] for g in rng.integers(0, len(unique), len(unique))])


def bootstrap_draws(y, predictions, groups, num_resamples=1000, seed=0):
    """AUROC and AUPRC of each (N, K) array in `predictions` on the same resamples of groups, so that
    differences between them are paired. Returns one dict per array: "auroc" and "auprc" (R, K), NaN where a
    resample leaves a label with one class, and "macro_auroc", "micro_auroc", "macro_auprc", "micro_auprc" (R,).
    A resample's macro averages the labels defined in that resample."""
    draws = [{key: [] for key in (*METRICS, *SUMMARY_KEYS)} for _ in predictions]
    for idx in bootstrap_indices(groups, num_resamples, seed):
        for draw, p in zip(draws, predictions):
            for name, metric in METRICS.items():
                s = metric_summary(metric, y[idx], p[idx])
                draw[name].append(s["per_label"])
                draw[f"macro_{name}"].append(s["macro"])
                draw[f"micro_{name}"].append(s["micro"])
    return [{key: np.array(values) for key, values in draw.items()} for draw in draws]


def interval(values):
    """Percentile 95% interval of bootstrap values, NaN resamples left out; None when none is defined."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) else None


def paired_difference(difference):
    """Bootstrap distribution of a paired difference (B - A on the same resamples) -> its 95% interval and a
    two-sided p-value for 'no difference': twice the share of resamples on the far side of zero, at most 1."""
    difference = np.asarray(difference, dtype=np.float64)
    difference = difference[~np.isnan(difference)]
    if not len(difference):
        return {"ci95": None, "p": None}
    p = 2 * min((difference <= 0).mean(), (difference >= 0).mean())
    return {"ci95": interval(difference), "p": float(min(1.0, p))}


# --------------------------------------------------------------------------------------------- calibration

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
    """ECE = sum_b (n_b / n) |mean p in bin b - fraction positive in bin b| over equal-width bins of p.
    Each label is its own binary event, so every probability counts (not only the top class, as in
    multi-class ECE). NaN when nothing is observed."""
    count, confidence, frequency = calibration_bins(y, p, num_bins)
    filled = count > 0
    if not filled.any():
        return float("nan")
    return float(np.sum(count[filled] * np.abs(confidence[filled] - frequency[filled])) / count.sum())


def logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def fit_temperature(y, p):
    """One temperature T for all labels minimising the BCE of sigmoid(logit(p) / T) on the given labels
    (Guo et al., 2017). Fit it on validation only. T > 1 softens over-confident probabilities; the ranking,
    and so AUROC and AUPRC, stay as they are."""
    y, logits = observed(y, logit(p))
    logits, target = torch.from_numpy(logits), torch.from_numpy(y.astype(np.float64))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)               # T = exp(log_t) > 0
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
    """ECE per label, its mean over labels, and over all observed (sample, label) pairs pooled (dominated by the
    many confident negatives, so lower), before and (given T) after temperature scaling."""
    def eces(q, suffix=""):
        per_label = [expected_calibration_error(y[:, k], q[:, k], num_bins) for k in range(len(label_names))]
        return {f"ece_per_label{suffix}": {name: none_if_nan(e) for name, e in zip(label_names, per_label)},
                f"ece_mean{suffix}": none_if_nan(np.nanmean(per_label)) if not np.isnan(per_label).all() else None,
                f"ece{suffix}": none_if_nan(expected_calibration_error(y, q, num_bins))}
    report = {"num_bins": num_bins, "temperature": temperature} | eces(p)
    if temperature is not None:
        report |= eces(apply_temperature(p, temperature), "_scaled")
    return report


# ----------------------------------------------------------------------------------------- operating points

def choose_threshold(y, p, target_sensitivity=None):
    """Threshold t for calling a label positive (p >= t), chosen on validation: the one maximising Youden's
    J = sensitivity + specificity - 1, or, given a target sensitivity, the highest threshold that reaches it.
    NaN when the label has one class there."""
    y, p = observed(y, p)
    n_pos, n_neg = y.sum(), (~y).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    thresholds, tp, fp = threshold_counts(y, p)
    sensitivity, specificity = tp / n_pos, 1 - fp / n_neg
    if target_sensitivity is None:
        return float(thresholds[np.argmax(sensitivity + specificity - 1)])
    return float(thresholds[np.argmax(sensitivity >= target_sensitivity)])      # the first index reaching it


def ratio(a, b):
    return float(a / b) if b else None


def operating_point(y, p, threshold):
    """Sensitivity, specificity and positive predictive value of calling p >= threshold positive."""
    y, p = observed(y, p)
    called = p >= threshold
    tp, fp, fn, tn = (called & y).sum(), (called & ~y).sum(), (~called & y).sum(), (~called & ~y).sum()
    return {"threshold": float(threshold), "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "ppv": ratio(tp, tp + fp)}


def operating_points_report(y_val, p_val, y_test, p_test, label_names, target_sensitivity=None):
    """Per-label thresholds chosen on validation, measured on test (None for a label with one class on val)."""
    report = {}
    for k, name in enumerate(label_names):
        threshold = choose_threshold(y_val[:, k], p_val[:, k], target_sensitivity)
        report[name] = None if np.isnan(threshold) else operating_point(y_test[:, k], p_test[:, k], threshold)
    return report


# ---------------------------------------------------------------------------------------------- uncertainty

def rejection_curve(y, p, uncertainty, fractions=(0.1, 0.2, 0.3)):
    """Macro AUROC on the images kept after rejecting the given fraction with the highest uncertainty
    (referring them to a reader). If the spread of p(z|x) carries information, the AUROC rises with the
    fraction rejected; if it is noise, it stays level. -> {fraction: macro AUROC}, 0.0 = nothing rejected."""
    most_uncertain_first = np.argsort(-uncertainty, kind="stable")
    curve = {}
    for fraction in (0.0, *fractions):
        keep = np.sort(most_uncertain_first[int(round(fraction * len(y))):])
        curve[fraction] = none_if_nan(auroc_summary(y[keep], p[keep])["macro"])
    return curve


# ------------------------------------------------------------------------------------------- inference

def read_checkpoint(path, device="cpu"):
    """The plain dict of a checkpoint written by train.py. torch.load(weights_only=True) unpickles tensors,
    numbers, strings and containers only: a file that would run code (or is not a checkpoint) is refused."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise data.DataError(f"{path} was refused: not a whole checkpoint of plain tensors and numbers as train.py "
                             f"writes them ({str(error).splitlines()[0]})") from error


def load_checkpoint(path, device="cpu"):
    """A checkpoint written by train.py -> (model in eval mode, checkpoint dict). Never unpickles code."""
    checkpoint = read_checkpoint(path, device)
    model = VKD(VKDConfig(**checkpoint["model_config"])).to(device)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


def to_input(images_uint8, pixel_mean, pixel_std):
    """(B, H, W) uint8 -> (B, 1, H, W) float, normalised with the training split's statistics."""
    return ((images_uint8.float() / 255.0 - pixel_mean) / pixel_std).unsqueeze(1)


def prior_samples(method, num_samples):
    """Prior samples to average for a model of `method`. The `image` baseline's loss reads mu_p only, so its
    logvar_p never leaves its random start: sampling it would add noise of an arbitrary size and handicap the
    baseline in a sampled comparison. It is always evaluated at its prior mean."""
    return 0 if method == "image" else num_samples


def prediction_name(method, num_samples):
    """How the probabilities of a model of `method` are made, as the output states it."""
    if method == "text":
        return "posterior mean f(mu_q(x, t)) (reads the report)"
    if prior_samples(method, num_samples):
        return f"mean over {num_samples} prior samples"
    if num_samples:
        return f"prior mean f(mu_p(x)) (--samples {num_samples} not used: the image baseline never trains logvar_p)"
    return "prior mean f(mu_p(x))"


@torch.no_grad()
def predict(model, images, tokens, indices, config, device, batch_size=256, num_samples=0):
    """Probabilities (and per-image std over prior samples) for the samples at `indices`: (N, K) each."""
    model.eval()
    num_samples = prior_samples(model.cfg.method, num_samples)
    probabilities, stds = [], []
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        x = to_input(torch.as_tensor(images[idx]).to(device), config["pixel_mean"], config["pixel_std"])
        if model.cfg.method == "text":
            p = model.predict_with_text(x, torch.as_tensor(tokens[idx]).to(device))
            std = torch.zeros_like(p)
        else:
            p, std = model.predict(x, num_samples)
        probabilities.append(p.cpu().numpy())
        stds.append(std.cpu().numpy())
    return np.concatenate(probabilities), np.concatenate(stds)


@torch.no_grad()
def latent_means(model, images, tokens, indices, config, device, batch_size=256):
    """Prior means mu_p(x) and, for a model with a report encoder, posterior means mu_q(x, t): (N, D) or None."""
    mu_p, mu_q = [], []
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        x = to_input(torch.as_tensor(images[idx]).to(device), config["pixel_mean"], config["pixel_std"])
        h_x, mu, _ = model.encode_prior(x)
        mu_p.append(mu.float().cpu().numpy())
        if model.text_encoder is not None:
            mu_q.append(model.encode_posterior(h_x, torch.as_tensor(tokens[idx]).to(device))[0].float().cpu().numpy())
    return np.concatenate(mu_p), np.concatenate(mu_q) if mu_q else None


def load_collection(checkpoint, checkpoint_path, data_options=None, with_text=False):
    """Rebuild a collection -> (images, tokens or None, labels (N, K), bootstrap groups (N,) and their unit
    ("reports" or "patients"), splits), with K = the checkpoint's labels. Tokens are built for the `text` model
    (it reads reports) or when asked (posterior means for a picture).

    By default this is the checkpoint's own collection, and its split must be the one trained on. Data options
    (evaluate.py's --data, --data-dir, ...) may name another collection: cross-dataset evaluation, e.g. a model
    trained on MIMIC-CXR tested on OpenI. Its labels are matched to the checkpoint's by name; a label the other
    collection does not have is NaN (not observed), so every metric leaves it out."""
    config = checkpoint["config"]
    options = config | {name: value for name, value in (data_options or {}).items() if value is not None}
    collection = data.prepare_from(options)
    images = data.image_cache(collection, config["image_size"], options.get("strict", False))   # final split ids
    same_collection = all(options.get(name) == config.get(name) for name in data.DATA_OPTIONS if name != "data_dir")
    if same_collection and data.split_hash(collection.split_ids) != checkpoint["split_sha256"]:
        raise data.DataError(f"the {config['data']} collection under {options['data_dir']} gives "
                             f"a different split than the one {checkpoint_path} was trained on")
    tokens = None
    if checkpoint["model_config"]["method"] == "text" or with_text:
        tokenizer = data.load_tokenizer(Path(checkpoint_path).parent / "tokenizer.json")
        tokens = data.sample_tokens(collection, tokenizer, checkpoint["model_config"]["max_len"])
    trained = checkpoint.get("label_names", LABELS)
    labels = collection.labels
    if collection.label_names != trained:
        shared = [name for name in trained if name in collection.label_names]
        if not shared:
            raise data.DataError(f"{checkpoint_path} predicts {trained}; the {options['data']} collection has none "
                                 f"of these labels ({collection.label_names})")
        labels = np.full((len(collection.labels), len(trained)), np.nan, dtype=np.float32)   # (N, K)
        for k, name in enumerate(trained):
            if name in shared:
                labels[:, k] = collection.labels[:, collection.label_names.index(name)]
        left_out = [name for name in trained if name not in shared]
        print(f"evaluating on {options['data']}: {len(shared)} shared labels"
              + (f"; not in this collection, left out: {', '.join(left_out)}" if left_out else ""), file=sys.stderr)
    return images, tokens, labels, collection.bootstrap_groups, collection.bootstrap_unit, collection.splits


class Evaluated(NamedTuple):
    """One checkpoint evaluated on one split: what compare_runs compares."""
    labels: np.ndarray          # (N, K), NaN = not observed
    probabilities: np.ndarray   # (N, K)
    groups: np.ndarray          # (N,) bootstrap group of each image: its report or its patient
    unit: str                   # "reports" or "patients"
    prediction: str             # how the probabilities were made (prediction_name)
    checkpoint: dict


def evaluate_checkpoint(path, split="test", device="cpu", num_samples=0, data_options=None):
    """A checkpoint on one split -> Evaluated."""
    model, checkpoint = load_checkpoint(path, device)
    images, tokens, labels, groups, unit, splits = load_collection(checkpoint, path, data_options)
    indices = splits[split]
    p, _ = predict(model, images, tokens, indices, checkpoint["config"], device, num_samples=num_samples)
    return Evaluated(labels[indices], p, groups[indices], unit, prediction_name(model.cfg.method, num_samples),
                     checkpoint)


def feature_maps_module(model):
    """The module whose output is the image encoder's last feature maps (B, C, h, w): where Grad-CAM looks."""
    encoder = model.image_encoder
    if isinstance(encoder, ImageEncoder):
        return encoder.stages
    return encoder.net.layer4 if hasattr(encoder.net, "layer4") else encoder.net.features


def grad_cam(model, x, label_index):
    """Grad-CAM (Selvaraju et al., 2017) of one label's logit on the image-only path f(mu_p(x)):
    alpha_c = spatial mean of d logit / d A_c over the last feature maps A (B, C, h, w),
    map = ReLU(sum_c alpha_c A_c), upsampled to the image and scaled to [0, 1] per image.
    x (B, 1, H, W) -> (B, H, W). The text encoder never runs."""
    model.eval()
    captured = {}
    hook = feature_maps_module(model).register_forward_hook(lambda module, inputs, output: captured.update(A=output))
    try:
        with torch.enable_grad():
            _, mu_p, _ = model.encode_prior(x)
            logit_k = model.classifier(mu_p)[:, label_index]                            # (B,)
            (gradient,) = torch.autograd.grad(logit_k.sum(), captured["A"])             # (B, C, h, w)
    finally:
        hook.remove()
    alpha = gradient.mean(dim=(2, 3), keepdim=True)                                      # (B, C, 1, 1)
    cam = F.relu((alpha * captured["A"].detach()).sum(1, keepdim=True))                 # (B, 1, h, w)
    cam = F.interpolate(cam.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return (cam / cam.flatten(1).max(1).values.clamp(min=1e-12)[:, None, None]).cpu()


def overlay(image_uint8, cam, scale=2):
    """Gray image (H, W) uint8 and a map (H, W) in [0, 1] -> RGB uint8 (scale H, scale W, 3): a 'hot' colour
    blended in where the map is high, so that the anatomy stays visible where it is low."""
    gray = np.repeat(image_uint8.astype(np.float32)[..., None] / 255.0, 3, axis=-1)     # (H, W, 3)
    cam = np.asarray(cam, dtype=np.float32)[..., None]
    hot = np.clip(np.concatenate([3 * cam, 3 * cam - 1, 3 * cam - 2], axis=-1), 0, 1)   # black-red-yellow-white
    rgb = (1 - 0.6 * cam) * gray + 0.6 * cam * hot
    height, width = image_uint8.shape
    picture = Image.fromarray((rgb * 255).round().astype(np.uint8))
    return np.asarray(picture.resize((scale * width, scale * height), Image.BILINEAR))


def save_rgb(array, path):
    Image.fromarray(array).save(path)
    return path


def label_index(label_names, name):
    """Index of a label given by name, case-insensitively; a clear error listing the names otherwise."""
    lowered = [n.lower() for n in label_names]
    if name.lower() not in lowered:
        raise data.DataError(f"unknown label {name!r}; this checkpoint's labels: {', '.join(label_names)}")
    return lowered.index(name.lower())


def slug(name):
    return name.lower().replace(" ", "-")


def predict_files(model, checkpoint, paths, device, num_samples=0, uncertainty_samples=100):
    """Any PNG/JPEG (any size, 8/16-bit, gray/RGB) -> (images (B, S, S) uint8, p (B, K), mean and std (B, K) over
    prior samples), decoded and resized exactly like the training cache (data.load_image) at the checkpoint's
    image size and normalised with its training statistics. The `image` baseline never trains the prior's
    variance (its loss reads mu_p only), so it has no uncertainty: mean and std are None."""
    if checkpoint["model_config"]["method"] == "text":
        raise data.DataError("the `text` model reads the report; predict from images with a vkd or image checkpoint")
    config = checkpoint["config"]
    decoded = [decode_job((path, config["image_size"])) for path in paths]       # like the cache build
    problems = [why for _, why in decoded if why is not None]
    if problems:
        raise data.DataError("cannot decode " + "; ".join(problems))
    images = np.stack([pixels for pixels, _ in decoded])
    x = to_input(torch.from_numpy(images).to(device), config["pixel_mean"], config["pixel_std"])
    p, _ = model.predict(x, prior_samples(model.cfg.method, num_samples))
    if checkpoint["model_config"]["method"] == "image":
        return images, p.cpu().numpy(), None, None
    mean, std = model.predict(x, uncertainty_samples)
    return images, p.cpu().numpy(), mean.cpu().numpy(), std.cpu().numpy()


# ------------------------------------------------------------------------------------- reports and tables

def none_if_nan(value):
    return None if value is None or np.isnan(value) else float(value)


def run_report(y, p, draws, label_names):
    """Point estimates of one run with the intervals of its bootstrap draws, as a JSON-ready dict."""
    summaries = {name: metric_summary(metric, y, p) for name, metric in METRICS.items()}
    per_label = {}
    for k, label in enumerate(label_names):
        per_label[label] = {"positives": int(np.nansum(y[:, k])), "observed": int((~np.isnan(y[:, k])).sum())}
        for name in METRICS:
            per_label[label] |= {name: none_if_nan(summaries[name]["per_label"][k]),
                                 f"{name}_ci95": interval(draws[name][:, k])}
    report = {"num_images": int(len(y)), "per_label": per_label}
    for key in SUMMARY_KEYS:
        kind, name = key.split("_")
        report |= {key: none_if_nan(summaries[name][kind]), f"{key}_ci95": interval(draws[key])}
    report["labels_skipped_in_macro"] = [n for n, ok in zip(label_names, summaries["auroc"]["defined"]) if not ok]
    return report


def metrics_report(y, p, groups, num_resamples=1000, seed=0, label_names=LABELS, unit="reports"):
    """Per-label, macro and micro AUROC and AUPRC with bootstrap intervals over the groups, whose `unit`
    ("reports" or "patients") the result names (undefined -> None)."""
    draws = bootstrap_draws(y, [p], groups, num_resamples, seed)[0]
    return run_report(y, p, draws, label_names) | resampled(groups, unit)


def resampled(groups, unit):
    """What the bootstrap drew, for the output: {"bootstrap_unit": "reports", "num_bootstrap_units": 120}."""
    return {"bootstrap_unit": unit, "num_bootstrap_units": int(len(np.unique(groups)))}


NOT_THE_METHOD = ("seed", "seeds", "out", "resume", "stop_after", "device", "data_dir", "compile", "channels_last",
                  "preload", "log_every", "bootstrap")                 # options that do not change what is learnt


def group_runs(configs):
    """Runs whose configs differ only in the seed (and bookkeeping such as the run folder or device) are seeds
    of one method -> [[run index, ...], ...] in order of first appearance. A seed already in a group starts a
    new group, so a run compared with itself counts as two methods."""
    groups, keys = [], []
    for i, config in enumerate(configs):
        key = {k: v for k, v in config.items() if k not in NOT_THE_METHOD}
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
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else None}


def compare_checkpoints(paths, device="cpu", num_samples=0, num_resamples=1000, seed=0, data_options=None):
    """Several checkpoints evaluated on their common test split and compared (see compare_runs)."""
    return compare_runs(paths, [evaluate_checkpoint(path, "test", device, num_samples, data_options)
                                for path in paths],
                        num_resamples, seed)


def nan_if_none(value):
    return np.nan if value is None else value


def compare_runs(paths, runs, num_resamples=1000, seed=0):
    """Runs = evaluate_checkpoint results (Evaluated) on one split. Each run gets its own estimates and
    intervals; runs that differ only in the seed form one method, reported as mean +- std across seeds with the
    interval of the seed mean; every method after the first gets the paired bootstrap of its difference to the
    first (seed means on the same resamples of reports or patients) with a p-value."""
    y, groups, unit, first = runs[0].labels, runs[0].groups, runs[0].unit, runs[0].checkpoint
    for path, run in zip(paths[1:], runs[1:]):
        if not (run.checkpoint["split_sha256"] == first["split_sha256"] and np.array_equal(groups, run.groups)
                and run.unit == unit and np.array_equal(y, run.labels, equal_nan=True)):
            raise data.DataError(f"{paths[0]} and {path} were not evaluated on the same split")
    label_names = first.get("label_names", LABELS)
    draws = bootstrap_draws(y, [run.probabilities for run in runs], groups, num_resamples, seed)
    result = {"num_images": int(len(y)), **resampled(groups, unit), "num_resamples": num_resamples,
              "label_names": label_names, "runs": [], "methods": []}
    for path, draw, run in zip(paths, draws, runs):
        config = run.checkpoint["config"]
        result["runs"].append({"checkpoint": str(path), "method": config["method"], "seed": config["seed"],
                               "best_epoch": run.checkpoint["epoch"] + 1, "prediction": run.prediction}
                              | run_report(y, run.probabilities, draw, label_names))
    configs = [run.checkpoint["config"] for run in runs]
    method_groups = group_runs(configs)
    names = [configs[g[0]]["method"] for g in method_groups]
    names = [n if names.count(n) == 1 else f"{n} #{i + 1}" for i, n in enumerate(names)]
    mean_draws = [{key: np.mean([draws[i][key] for i in g], axis=0) for key in draws[0]} for g in method_groups]
    for name, g, mean_draw in zip(names, method_groups, mean_draws):
        runs_of = [result["runs"][i] for i in g]
        method = {"name": name, "runs": g, "seeds": [r["seed"] for r in runs_of], "per_label": {}}
        for k, label in enumerate(label_names):
            method["per_label"][label] = {
                metric: seed_statistics([nan_if_none(r["per_label"][label][metric]) for r in runs_of])
                | {"ci95": interval(mean_draw[metric][:, k])} for metric in METRICS}
        for key in SUMMARY_KEYS:
            method[key] = seed_statistics([nan_if_none(r[key]) for r in runs_of]) | {"ci95": interval(mean_draw[key])}
        if result["methods"]:
            baseline = result["methods"][0]
            method["difference"] = {"vs": baseline["name"]}
            for key in SUMMARY_KEYS:
                a, b = baseline[key]["mean"], method[key]["mean"]
                method["difference"][key] = {"value": None if a is None or b is None else b - a,
                                             **paired_difference(mean_draw[key] - mean_draws[0][key])}
        result["methods"].append(method)
    return result


def cell(value, ci, std=None):
    """'0.912 +- 0.010 [0.880, 0.940]' (std only for several seeds); n/a when undefined."""
    if value is None:
        return "n/a (one class only)"
    text = f"{value:.3f}" + (f" ± {std:.3f}" if std is not None else "")
    return text + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def format_metrics(metrics, title):
    lines = [title, f"{'label':28s} {'positives':>9s}  {'AUROC [95% CI]':24s}  AUPRC [95% CI]"]
    for name, m in metrics["per_label"].items():
        lines.append(f"{name:28s} {m['positives']:9d}  {cell(m['auroc'], m['auroc_ci95']):24s}  "
                     f"{cell(m['auprc'], m['auprc_ci95'])}")
    for kind in ("macro", "micro"):
        lines.append(f"{kind:28s} {'':9s}  {cell(metrics[f'{kind}_auroc'], metrics[f'{kind}_auroc_ci95']):24s}  "
                     f"{cell(metrics[f'{kind}_auprc'], metrics[f'{kind}_auprc_ci95'])}")
    if metrics["labels_skipped_in_macro"]:
        lines.append("left out of macro (one class in this split): " + ", ".join(metrics["labels_skipped_in_macro"]))
    lines.append(f"{metrics['num_images']} images; intervals: 95% bootstrap over "
                 f"{metrics['num_bootstrap_units']} {metrics['bootstrap_unit']}")
    if "prediction" in metrics:
        lines.append(f"probabilities: {metrics['prediction']}")
    return "\n".join(lines)


def p_value(p, num_resamples):
    """No resample on the far side of zero bounds p by the resolution of the bootstrap, it does not make it 0."""
    return f"p < {2 / num_resamples:.3f}" if p == 0 else f"p = {p:.3f}"


def format_comparison(result):
    """The comparison as Markdown tables (readable in a terminal, pasteable into a README)."""
    methods, first, resamples = result["methods"], result["runs"][0], result["num_resamples"]
    several_seeds = any(len(m["runs"]) > 1 for m in methods)
    lines = [f"test split: {result['num_images']} images; 95% intervals: bootstrap over "
             f"{result['num_bootstrap_units']} {result['bootstrap_unit']} ({result['num_resamples']} resamples)"
             + ("; mean ± std across seeds, interval of the seed mean" if several_seeds else ""), ""]
    header = "| label | positives | " + " | ".join(m["name"] for m in methods) + " |"
    rule = "|---|---:|" + "---|" * len(methods)
    for metric in METRICS:
        lines += [f"{metric.upper()}", "", header, rule]
        for label in result["label_names"]:
            cells = [cell(m["per_label"][label][metric]["mean"], m["per_label"][label][metric]["ci95"],
                          m["per_label"][label][metric]["std"]) for m in methods]
            lines.append(f"| {label} | {first['per_label'][label]['positives']} | " + " | ".join(cells) + " |")
        for kind in ("macro", "micro"):
            key = f"{kind}_{metric}"
            lines.append(f"| **{kind}** | | " + " | ".join(cell(m[key]["mean"], m[key]["ci95"], m[key]["std"])
                                                          for m in methods) + " |")
        lines.append("")
    if len(methods) > 1:
        lines += [f"paired bootstrap of each difference to {methods[0]['name']} (same resamples"
                  + (", seed means" if several_seeds else "") + "): difference [95% CI], two-sided p", "",
                  "| difference | " + " | ".join(k.replace("_", " ") for k in SUMMARY_KEYS) + " |",
                  "|---|" + "---|" * len(SUMMARY_KEYS)]
        for m in methods[1:]:
            cells = []
            for key in SUMMARY_KEYS:
                d = m["difference"][key]
                cells.append("n/a" if d["value"] is None or d["ci95"] is None else
                             f"{d['value']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], {p_value(d['p'], resamples)}")
            lines.append(f"| {m['name']} - {methods[0]['name']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["each run", "", "| run | method | seed | best epoch | macro AUROC | macro AUPRC | probabilities |",
              "|---|---|---:|---:|---|---|---|"]
    for run in result["runs"]:
        lines.append(f"| {run['checkpoint']} | {run['method']} | {run['seed']} | {run['best_epoch']} | "
                     f"{cell(run['macro_auroc'], run['macro_auroc_ci95'])} | "
                     f"{cell(run['macro_auprc'], run['macro_auprc_ci95'])} | {run['prediction']} |")
    return "\n".join(lines)


def format_analysis(result):
    """Calibration, operating points and uncertainty of one run, as text."""
    calibration, lines = result["calibration"], []
    temperature = calibration["temperature"]

    def number(value, width=8):
        return f"{value:{width}.3f}" if value is not None else f"{'n/a':>{width}s}"
    lines.append(f"calibration: ECE over {calibration['num_bins']} equal-width bins"
                 + (f"; temperature T = {temperature:.3f} fitted on val" if temperature is not None else ""))
    lines.append(f"{'label':28s} {'ECE':>8s}" + (f" {'ECE at T':>8s}" if temperature is not None else ""))
    rows = [(name, ece, calibration.get("ece_per_label_scaled", {}).get(name))
            for name, ece in calibration["ece_per_label"].items()]
    rows.append(("mean over labels", calibration["ece_mean"], calibration.get("ece_mean_scaled")))
    rows.append(("all labels pooled", calibration["ece"], calibration.get("ece_scaled")))
    for name, ece, scaled in rows:
        lines.append(f"{name:28s} {number(ece)}" + (f" {number(scaled)}" if temperature is not None else ""))
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
        curve = ", ".join(f"{float(f):.0%} {number(a, 0)}" for f, a in uncertainty["macro_auroc_after_rejecting"].items())
        lines += ["", f"uncertainty: std of p over {uncertainty['samples']} prior samples, averaged over labels, "
                      f"per image (median {uncertainty['median']:.4f}, 90th percentile {uncertainty['p90']:.4f})",
                  f"macro AUROC of the {uncertainty['samples']}-sample mean after rejecting the most uncertain: {curve}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ pictures

class PlotError(Exception):
    """A picture was asked for but cannot be drawn (matplotlib missing)."""


def pyplot():
    """matplotlib is an optional extra (pip install matplotlib): imported only when a picture is drawn."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("pictures need matplotlib, an optional extra: pip install matplotlib") from None
    matplotlib.use("Agg")                                            # files only, no display
    import matplotlib.pyplot as plt
    return plt


def label_grid(plt, num_labels, title):
    columns = 4
    rows = -(-num_labels // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.5 * rows), squeeze=False)
    figure.suptitle(title, fontsize=10)
    for ax in axes.ravel()[num_labels:]:
        ax.axis("off")
    return figure, axes.ravel()


def plot_curves(y, named_predictions, label_names, out):
    """ROC and precision-recall curves per label, one panel per label, one line per run -> roc.png, pr.png."""
    plt = pyplot()
    paths = []
    for kind, metric in (("roc", auroc), ("pr", average_precision)):
        figure, axes = label_grid(plt, len(label_names), "ROC curves (test)" if kind == "roc" else
                                  "precision-recall curves (test); dotted: prevalence")
        for k, (ax, label) in enumerate(zip(axes, label_names)):
            for name, p in named_predictions:
                y_k, p_k = observed(y[:, k], p[:, k])
                if y_k.all() or not y_k.any():
                    continue
                _, tp, fp = threshold_counts(y_k, p_k)
                if kind == "roc":
                    ax.plot(np.r_[0, fp / (~y_k).sum()], np.r_[0, tp / y_k.sum()], lw=1,
                            label=f"{name} {metric(y_k, p_k):.2f}")
                else:                     # AP's rectangles: precision P_n held over recall (R_{n-1}, R_n]
                    ax.step(np.r_[0, tp / y_k.sum()], np.r_[1, tp / (tp + fp)], where="pre", lw=1,
                            label=f"{name} {metric(y_k, p_k):.2f}")
            y_k, _ = observed(y[:, k], y[:, k])
            if kind == "roc":
                ax.plot([0, 1], [0, 1], color="gray", lw=0.5, ls=":")
            elif len(y_k):
                ax.axhline(y_k.mean(), color="gray", lw=0.5, ls=":")
            ax.set(xlim=(0, 1), ylim=(0, 1.02))
            ax.set_title(f"{label} ({int(y_k.sum())})", fontsize=8)
            ax.tick_params(labelsize=6)
            ax.legend(fontsize=6, loc="lower right" if kind == "roc" else "lower left", frameon=False)
        figure.tight_layout()
        path = Path(out) / f"{kind}.png"
        figure.savefig(path, dpi=72)
        plt.close(figure)
        paths.append(path)
    return paths


def plot_reliability(y, p, out, num_bins=15, temperature=None):
    """Reliability diagram over all observed (sample, label) pairs: fraction positive against mean predicted
    probability per bin (the diagonal is perfect calibration), and how many predictions fall in each bin."""
    plt = pyplot()
    figure, (ax, ax_count) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":")
    curves = [("as predicted", p)] + ([(f"temperature {temperature:.2f}", apply_temperature(p, temperature))]
                                      if temperature is not None else [])
    for name, q in curves:
        count, confidence, frequency = calibration_bins(y, q, num_bins)
        filled = count > 0
        ax.plot(confidence[filled], frequency[filled], marker="o", ms=3,
                label=f"{name}: ECE {expected_calibration_error(y, q, num_bins):.3f}")
        ax_count.bar((np.arange(num_bins) + 0.5) / num_bins, count, width=1 / num_bins, alpha=0.5)
    ax.set(ylabel="fraction positive", xlim=(0, 1), ylim=(0, 1), title="reliability diagram (test, all labels)")
    ax.legend(fontsize=8, loc="upper left")
    ax_count.set(xlabel="predicted probability", ylabel="predictions", yscale="log")
    figure.tight_layout()
    path = Path(out) / "reliability.png"
    figure.savefig(path, dpi=72)
    plt.close(figure)
    return path


def plot_training(log_path, out):
    """Training curves from a run's log.jsonl: loss parts, KL, beta and validation macro AUROC per epoch."""
    plt = pyplot()
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    epochs = [r["epoch"] for r in records]
    figure, axes = plt.subplots(1, 4, figsize=(13, 3))
    for key in ("loss", "bce_posterior", "bce_prior"):
        axes[0].plot(epochs, [r[key] for r in records], marker=".", label=key)
    axes[0].legend(fontsize=7)
    for ax, key, title in ((axes[1], "kl", "KL(q || p), nats"), (axes[2], "beta", "beta (end of epoch)"),
                           (axes[3], "val_macro_auroc", "validation macro AUROC")):
        ax.plot(epochs, [r[key] for r in records], marker=".")
        ax.set_title(title, fontsize=9)
    axes[0].set_title("training loss parts", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
    figure.tight_layout()
    path = Path(out) / "training.png"
    figure.savefig(path, dpi=72)
    plt.close(figure)
    return path


def pca_2d(arrays):
    """Project arrays (N_i, D) onto the first two principal components of all of them together, so that they
    share one pair of axes. SVD of the centred data, in numpy."""
    stacked = np.concatenate(arrays)
    mean = stacked.mean(0)
    _, _, vt = np.linalg.svd(stacked - mean, full_matrices=False)
    return [(a - mean) @ vt[:2].T for a in arrays]


def plot_latents(named_means, y_label, label_name, out):
    """2-D view (shared PCA) of the latent means, prior mu_p(x) next to posterior mu_q(x, t), coloured by one
    label: how far the image-only prior has come towards the report-informed posterior."""
    plt = pyplot()
    projected = pca_2d([means for _, means in named_means])
    figure, axes = plt.subplots(1, len(named_means), figsize=(4.2 * len(named_means), 4), squeeze=False,
                                sharex=True, sharey=True)
    colours = np.where(np.isnan(y_label), "lightgray", np.where(y_label == 1, "tab:red", "tab:blue"))
    for ax, (name, _), xy in zip(axes[0], named_means, projected):
        for value, colour in ((0, "tab:blue"), (1, "tab:red")):          # positives drawn last, on top
            keep = colours == colour
            ax.scatter(xy[keep, 0], xy[keep, 1], s=6, c=colour, alpha=0.7,
                       label=f"{label_name} {'present' if value else 'absent'}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("PC 1")
    axes[0, 0].set_ylabel("PC 2")
    axes[0, 0].legend(fontsize=7)
    figure.tight_layout()
    path = Path(out) / "latents.png"
    figure.savefig(path, dpi=72)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------------- entry

def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate VKD checkpoints from images only.")
    data.add_data_args(parser, inherit=True)           # another collection: cross-dataset evaluation
    add = parser.add_argument
    add("--ckpt", default=None, help="checkpoint written by train.py (default: none; needed unless --compare)")
    add("--compare", nargs="+", default=None, metavar="CKPT",
        help="checkpoints compared on their common test split, paired differences to the first (--ckpt, if given, "
             "is the first); runs differing only in --seed are averaged as one method (default: none)")
    add("--split", default="test", choices=data.SPLITS, help="split evaluated (default: test)")
    add("--samples", type=int, default=0, help="prior samples averaged for the probabilities; 0 uses the prior "
                                               "mean (default: 0)")
    add("--uncertainty-samples", type=int, default=100,
        help="prior samples whose spread is the uncertainty, for --image and the rejection curve (default: 100)")
    add("--reject", default="0.1,0.2,0.3", help="fractions of most uncertain images rejected (default: 0.1,0.2,0.3)")
    add("--temperature", action="store_true", help="fit temperature scaling on val and report ECE after it "
                                                   "(default: off)")
    add("--target-sensitivity", type=float, default=None,
        help="choose thresholds on val for this sensitivity instead of Youden's J (default: Youden's J)")
    add("--bins", type=int, default=15, help="equal-width bins of the ECE and reliability diagram (default: 15)")
    add("--bootstrap", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    add("--seed", type=int, default=0, help="seed of the bootstrap and of prior sampling (default: 0)")
    add("--image", nargs="+", default=None, metavar="FILE",
        help="PNG/JPEG files: print the label probabilities with uncertainty instead of evaluating (default: none)")
    add("--cam", default=None, metavar="LABEL", help="write Grad-CAM overlays for this label: for each --image, or "
                                                     "for the most confident positive test images (default: none)")
    add("--cam-images", type=int, default=4, help="test images in the --cam picture (default: 4)")
    add("--plots", action="store_true", help="write ROC/PR, reliability, training and latent pictures as PNGs "
                                             "(needs matplotlib) (default: off)")
    add("--latent-label", default=None, help="label colouring the latent picture (default: the most frequent)")
    add("--out", default=None, help="folder for pictures and overlays (default: the checkpoint's run folder; "
                                    "with --compare: runs/compare)")
    add("--device", default="cpu", help="torch device (default: cpu)")
    add("--json", action="store_true", help="print the results as JSON (default: off)")
    args = parser.parse_args(argv)
    if args.ckpt is None and not args.compare:
        parser.error("give --ckpt, or --compare with two or more checkpoints")
    if args.compare and len(([args.ckpt] if args.ckpt else []) + args.compare) < 2:
        parser.error("--compare needs two or more checkpoints (with --ckpt: one or more)")
    if args.compare and args.image:
        parser.error("--image takes one --ckpt, not --compare")
    return args


def data_options(args):
    """The data options given on the command line (None: the checkpoint's own), see load_collection."""
    return {name: getattr(args, name) for name in data.DATA_OPTIONS}


def single_images(args):
    """--image: probabilities with uncertainty for each file, and a Grad-CAM overlay per file with --cam."""
    model, checkpoint = load_checkpoint(args.ckpt, args.device)
    label_names = checkpoint.get("label_names", LABELS)
    images, p, mean, std = predict_files(model, checkpoint, args.image, args.device, args.samples,
                                         args.uncertainty_samples)
    result = {str(path): {name: {"p": float(p[i, k]), "mean": None if mean is None else float(mean[i, k]),
                                 "std": None if std is None else float(std[i, k])}
                          for k, name in enumerate(label_names)} for i, path in enumerate(args.image)}
    if args.cam:
        k = label_index(label_names, args.cam)
        out = Path(args.out or Path(args.ckpt).parent)
        out.mkdir(parents=True, exist_ok=True)
        x = to_input(torch.from_numpy(images).to(args.device), checkpoint["config"]["pixel_mean"],
                     checkpoint["config"]["pixel_std"])
        cams = grad_cam(model, x, k).numpy()
        for i, path in enumerate(args.image):
            written = save_rgb(overlay(images[i], cams[i]), out / f"{Path(path).stem}-cam-{slug(label_names[k])}.png")
            result[str(path)]["cam"] = str(written)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for path, probabilities in result.items():
        print(f"{path}\n{'label':28s} {'p':>6s}   mean ± std over {args.uncertainty_samples} prior samples")
        for name in label_names:
            q = probabilities[name]
            print(f"{name:28s} {q['p']:6.3f}   " + (f"{q['mean']:.3f} ± {q['std']:.3f}" if q["std"] is not None else
                                                    "n/a (the image baseline's prior variance is never trained)"))
        if "cam" in probabilities:
            print(f"Grad-CAM for {label_names[k]}: {probabilities['cam']}")


def single_run(args):
    """--ckpt: metrics with intervals, calibration, operating points and uncertainty; pictures on request."""
    model, checkpoint = load_checkpoint(args.ckpt, args.device)
    config, method = checkpoint["config"], checkpoint["model_config"]["method"]
    label_names = checkpoint.get("label_names", LABELS)
    images, tokens, labels, groups, unit, splits = load_collection(checkpoint, args.ckpt, data_options(args),
                                                                   with_text=args.plots and method != "image")
    test_idx, val_idx = splits[args.split], splits["val"]
    y, y_val = labels[test_idx], labels[val_idx]
    p, _ = predict(model, images, tokens, test_idx, config, args.device, num_samples=args.samples)
    p_val, _ = predict(model, images, tokens, val_idx, config, args.device, num_samples=args.samples)
    result = metrics_report(y, p, groups[test_idx], args.bootstrap, args.seed, label_names, unit)
    result["prediction"] = prediction_name(method, args.samples)
    temperature = fit_temperature(y_val, p_val) if args.temperature else None
    result["split"] = args.split
    result["calibration"] = calibration_report(y, p, label_names, args.bins, temperature)
    result["operating_points"] = {
        "rule": "Youden's J" if args.target_sensitivity is None else f"sensitivity >= {args.target_sensitivity}",
        "per_label": operating_points_report(y_val, p_val, y, p, label_names, args.target_sensitivity)}
    if method == "vkd":               # only VKD trains the prior's variance; `text` reads the report
        mean, std = predict(model, images, tokens, test_idx, config, args.device,
                            num_samples=args.uncertainty_samples)
        uncertainty = std.mean(1)                                                    # (N,) per image
        fractions = tuple(float(f) for f in args.reject.split(","))
        result["uncertainty"] = {"samples": args.uncertainty_samples, "median": float(np.median(uncertainty)),
                                 "p90": float(np.percentile(uncertainty, 90)),
                                 "macro_auroc_after_rejecting": rejection_curve(y, mean, uncertainty, fractions)}
    out = Path(args.out or Path(args.ckpt).parent)
    written = []
    if args.plots or args.cam:
        out.mkdir(parents=True, exist_ok=True)
    if args.plots:
        written += plot_curves(y, [(method, p)], label_names, out)
        written.append(plot_reliability(y, p, out, args.bins, temperature))
        log_path = Path(args.ckpt).parent / "log.jsonl"
        if log_path.exists():
            written.append(plot_training(log_path, out))
        k = (label_index(label_names, args.latent_label) if args.latent_label
             else int(np.argmax(np.nansum(y, axis=0))))
        mu_p, mu_q = latent_means(model, images, tokens, test_idx, config, args.device)
        named = ([("prior means mu_p(x)", mu_p)] if method != "text" else []) + \
                ([("posterior means mu_q(x, t)", mu_q)] if mu_q is not None else [])
        written.append(plot_latents(named, y[:, k], label_names[k], out))
    if args.cam:
        written.append(cam_picture(model, images, test_idx, y, p, config, label_names, args, out))
    result["pictures"] = [str(path) for path in written]
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(format_metrics(result, f"{args.ckpt} ({args.split})"), "\n")
    print(format_analysis(result))
    if written:
        print("\npictures: " + ", ".join(result["pictures"]))


def cam_picture(model, images, indices, y, p, config, label_names, args, out):
    """One PNG: the most confidently predicted positive images of a label, each next to its Grad-CAM overlay."""
    k = label_index(label_names, args.cam)
    positives = np.flatnonzero(y[:, k] == 1)
    if not len(positives):
        raise data.DataError(f"no positive {label_names[k]} image in the {args.split} split to explain")
    chosen = positives[np.argsort(-p[positives, k], kind="stable")[:args.cam_images]]
    batch = np.array(images[indices[chosen]])                                             # (B, S, S) uint8
    x = to_input(torch.from_numpy(batch).to(args.device), config["pixel_mean"], config["pixel_std"])
    cams = grad_cam(model, x, k).numpy()
    columns = [np.concatenate([overlay(image, np.zeros_like(cam), scale=1), overlay(image, cam, scale=1)], axis=0)
               for image, cam in zip(batch, cams)]                   # each image above its overlay, at 1:1
    gap = np.full((columns[0].shape[0], 4, 3), 255, dtype=np.uint8)
    picture = np.concatenate([part for column in columns for part in (column, gap)][:-1], axis=1)
    return save_rgb(picture, out / f"cam-{slug(label_names[k])}.png")


def comparison(args):
    """--compare: the comparison tables; with --plots, ROC and PR curves of the first seed of each method."""
    paths = ([args.ckpt] if args.ckpt else []) + args.compare
    runs = [evaluate_checkpoint(path, "test", args.device, args.samples, data_options(args)) for path in paths]
    result = compare_runs(paths, runs, args.bootstrap, args.seed)
    if args.plots:
        out = Path(args.out or "runs/compare")
        out.mkdir(parents=True, exist_ok=True)
        named = [(m["name"], runs[m["runs"][0]].probabilities) for m in result["methods"]]
        result["pictures"] = [str(path) for path in plot_curves(runs[0].labels, named, result["label_names"], out)]
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_comparison(result))
        if args.plots:
            print("\npictures: " + ", ".join(result["pictures"]))


def main():
    args = get_args()
    torch.manual_seed(args.seed)                  # prior samples: the same command gives the same numbers
    try:
        if args.image:
            single_images(args)
        elif args.compare:
            comparison(args)
        else:
            single_run(args)
    except (data.DataError, PlotError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
