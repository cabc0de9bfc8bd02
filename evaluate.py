"""Evaluate: AUROC (rank-based, in numpy), bootstrap confidence intervals over reports, paired comparison.

    python evaluate.py --ckpt runs/demo-vkd-seed0/best.pt                    # test split, images only
    python evaluate.py --ckpt runs/A/best.pt --compare runs/B/best.pt        # paired bootstrap of B - A

Test-time inference uses the image-only prior p(z|x) (VKD.predict); the `text` baseline is the one exception,
evaluated with its report (VKD.predict_with_text) because it is an upper bound, not a test-time model.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import data
from data import LABELS
from model import VKD, VKDConfig

# --------------------------------------------------------------------------------------------- metrics


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
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = y.sum(), (~y).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(np.asarray(score, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_summary(y, p):
    """Per-label AUROC, macro over labels with both classes present, micro over all (sample, label) pairs."""
    per_label = np.array([auroc(y[:, k], p[:, k]) for k in range(y.shape[1])])
    defined = ~np.isnan(per_label)
    return {"per_label": per_label, "macro": float(per_label[defined].mean()) if defined.any() else float("nan"),
            "micro": auroc(y.ravel(), p.ravel()), "defined": defined}


def bootstrap_indices(groups, num_resamples, seed):
    """Yield sample indices of resamples that draw whole groups (reports) with replacement: all images of a
    report stay together, since they share the report's labels and are not independent."""
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    rng = np.random.default_rng(seed)
    for _ in range(num_resamples):
        yield np.concatenate([members[g] for g in rng.integers(0, len(unique), len(unique))])


def bootstrap(y, predictions, groups, num_resamples=1000, seed=0):
    """Percentile 95% intervals of per-label, macro and micro AUROC for each array in `predictions`, and of the
    differences of each later one minus the first, all on the same resamples (a paired bootstrap).

    In a resample where a label has one class, that label is left out of that resample's macro and of its own
    interval (never counted as 0 or NaN). Returns one dict per prediction array.
    """
    draws = [{"per_label": [], "macro": [], "micro": []} for _ in predictions]
    for idx in bootstrap_indices(groups, num_resamples, seed):
        for draw, p in zip(draws, predictions):
            s = auroc_summary(y[idx], p[idx])
            draw["per_label"].append(s["per_label"])
            draw["macro"].append(s["macro"])
            draw["micro"].append(s["micro"])
    results = []
    for k, draw in enumerate(draws):
        per_label = np.array(draw["per_label"])                                   # (R, K), NaN where undefined
        result = {"per_label_ci": [interval(per_label[:, j]) for j in range(per_label.shape[1])],
                  "macro_ci": interval(draw["macro"]), "micro_ci": interval(draw["micro"])}
        if k > 0:
            diff = np.array(draw["macro"]) - np.array(draws[0]["macro"])
            result["macro_difference_ci"] = interval(diff)
            # two-sided: twice the share of resamples on the far side of zero from the observed difference
            result["macro_difference_p"] = float(min(1.0, 2 * min((diff <= 0).mean(), (diff >= 0).mean())))
        results.append(result)
    return results


def interval(values):
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) else None


# ------------------------------------------------------------------------------------------- inference

def load_checkpoint(path, device="cpu"):
    """A checkpoint written by train.py -> (model in eval mode, checkpoint dict). Never unpickles code."""
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    model = VKD(VKDConfig(**checkpoint["model_config"])).to(device)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


def to_input(images_uint8, pixel_mean, pixel_std):
    """(B, H, W) uint8 -> (B, 1, H, W) float, normalised with the training split's statistics."""
    return ((images_uint8.float() / 255.0 - pixel_mean) / pixel_std).unsqueeze(1)


@torch.no_grad()
def predict(model, images, tokens, indices, config, device, batch_size=256, num_samples=0):
    """Probabilities (and per-image std over prior samples) for the samples at `indices`: (N, K) each."""
    model.eval()
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


def load_split(checkpoint, checkpoint_path, split, data_dir=None):
    """Rebuild the checkpoint's collection and split -> (images, tokens or None, labels, groups, indices)."""
    config = checkpoint["config"]
    collection = data.prepare_from(config | {"data_dir": data_dir or config["data_dir"]})
    if data.split_hash(collection.split_ids) != checkpoint["split_sha256"]:
        raise data.DataError(f"the {config['data']} collection under {data_dir or config['data_dir']} gives "
                                    f"a different split than the one {checkpoint_path} was trained on")
    images = data.image_cache(collection, config["image_size"], config.get("strict", False))
    tokens = None
    if checkpoint["model_config"]["method"] == "text":
        tokenizer = data.load_tokenizer(Path(checkpoint_path).parent / "tokenizer.json")
        tokens = data.sample_tokens(collection, tokenizer, checkpoint["model_config"]["max_len"])
    indices = collection.splits[split]
    return images, tokens, collection.labels, collection.report_index, indices


def evaluate_checkpoint(path, split="test", device="cpu", num_samples=0, data_dir=None):
    """-> (labels (N, K), probabilities (N, K), report groups (N,), checkpoint dict) of a checkpoint on one split."""
    model, checkpoint = load_checkpoint(path, device)
    images, tokens, labels, groups, indices = load_split(checkpoint, path, split, data_dir)
    p, _ = predict(model, images, tokens, indices, checkpoint["config"], device, num_samples=num_samples)
    return labels[indices], p, groups[indices], checkpoint


def metrics_report(y, p, groups, num_resamples=1000, seed=0, label_names=LABELS):
    """AUROC point estimates with bootstrap intervals, as a JSON-ready dict (undefined values are None)."""
    s = auroc_summary(y, p)
    ci = bootstrap(y, [p], groups, num_resamples, seed)[0]
    return {
        "num_images": int(len(y)), "num_reports": int(len(np.unique(groups))),
        "per_label": {name: {"auroc": none_if_nan(a), "ci95": c, "positives": int(y[:, k].sum())}
                      for k, (name, a, c) in enumerate(zip(label_names, s["per_label"], ci["per_label_ci"]))},
        "macro_auroc": none_if_nan(s["macro"]), "macro_ci95": ci["macro_ci"],
        "micro_auroc": none_if_nan(s["micro"]), "micro_ci95": ci["micro_ci"],
        "labels_skipped_in_macro": [name for name, ok in zip(label_names, s["defined"]) if not ok],
    }


def none_if_nan(value):
    return None if np.isnan(value) else float(value)


def format_metrics(metrics, title):
    def cell(value, ci):
        return "  n/a (undefined: one class only)" if value is None else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    lines = [title, f"{'label':28s} {'positives':>9s}  AUROC [95% CI]"]
    for name, m in metrics["per_label"].items():
        lines.append(f"{name:28s} {m['positives']:9d}  {cell(m['auroc'], m['ci95'])}")
    lines.append(f"{'macro':28s} {'':9s}  {cell(metrics['macro_auroc'], metrics['macro_ci95'])}")
    lines.append(f"{'micro':28s} {'':9s}  {cell(metrics['micro_auroc'], metrics['micro_ci95'])}")
    if metrics["labels_skipped_in_macro"]:
        lines.append("left out of macro (one class in this split): " + ", ".join(metrics["labels_skipped_in_macro"]))
    lines.append(f"{metrics['num_images']} images from {metrics['num_reports']} reports; "
                 f"intervals: bootstrap over reports")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description="Evaluate a VKD checkpoint on its own split, images only.")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py (required)")
    parser.add_argument("--compare", default=None, help="a second checkpoint: paired bootstrap of its macro AUROC "
                                                        "minus --ckpt's on the same split (default: none)")
    parser.add_argument("--split", default="test", choices=data.SPLITS, help="split (default: test)")
    parser.add_argument("--samples", type=int, default=0,
                        help="prior samples averaged per image; 0 uses the prior mean (default: 0)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    parser.add_argument("--data-dir", default=None, help="override the checkpoint's data folder (default: its own)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON (default: off)")
    args = parser.parse_args()
    try:
        y, p, groups, checkpoint = evaluate_checkpoint(args.ckpt, args.split, args.device, args.samples, args.data_dir)
        names = checkpoint.get("label_names", LABELS)
        result = metrics_report(y, p, groups, args.bootstrap, label_names=names)
        if args.compare:
            y_b, p_b, groups_b, _ = evaluate_checkpoint(args.compare, args.split, args.device, args.samples,
                                                        args.data_dir)
            if not (np.array_equal(y, y_b) and np.array_equal(groups, groups_b)):
                raise data.DataError(f"{args.ckpt} and {args.compare} were not trained on the same split")
            result = {"a": result, "b": metrics_report(y_b, p_b, groups_b, args.bootstrap, label_names=names),
                      "paired": bootstrap(y, [p, p_b], groups, args.bootstrap)[1]}
            result["paired"]["macro_difference"] = result["b"]["macro_auroc"] - result["a"]["macro_auroc"]
    except (data.DataError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    if args.json:
        print(json.dumps(result, indent=1))
    elif args.compare:
        print(format_metrics(result["a"], f"A: {args.ckpt} ({args.split})"), "\n")
        print(format_metrics(result["b"], f"B: {args.compare} ({args.split})"), "\n")
        paired = result["paired"]
        lo, hi = paired["macro_difference_ci"]
        print(f"macro AUROC B - A: {paired['macro_difference']:+.3f} [{lo:+.3f}, {hi:+.3f}], "
              f"paired bootstrap p = {paired['macro_difference_p']:.3f}")
    else:
        print(format_metrics(result, f"{args.ckpt} ({args.split})"))


if __name__ == "__main__":
    main()
