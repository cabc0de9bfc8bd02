"""Evaluate: what a checkpoint does on images alone, with the uncertainty of every number stated.

    python evaluate.py --ckpt runs/demo-vkd-seed0/best.pt            # test split: AUROC/AUPRC with intervals,
                                                                     # calibration, operating points, uncertainty
    python evaluate.py --ckpt runs/demo-vkd-seed0/best.pt --plots    # + ROC/PR, reliability, training, latent PNGs
    python evaluate.py --compare runs/demo-image-seed0/best.pt runs/demo-vkd-seed0/best.pt   # paired, vs the first
    python evaluate.py --ckpt runs/demo-vkd-seed0/best.pt --image a.png b.jpg --cam Cardiomegaly

Test-time inference uses the image-only prior p(z|x) (VKD.predict); the `text` baseline is the one exception,
evaluated with its report (VKD.predict_with_text) because it is an upper bound, not a test-time model.
A label may be NaN, "not observed" (e.g. an uncertain MIMIC label under --uncertain ignore): every metric
(metrics.py) leaves those entries out, label by label. Intervals are 95% percentile bootstrap over reports
(OpenI, the demo), or over patients where the collection names them (MIMIC-CXR, a CSV with a patient column);
the output says which. The `image` baseline is always evaluated at the prior mean (see prior_samples).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import data
from bow import fit_bag_of_words
from runtime import read_checkpoint
from calibration import (calibration_report, fit_temperature, format_analysis, operating_points_report,
                         rejection_curve)
from compare import Evaluated, cell, compare_runs, format_comparison
from gradcam import cam_picture, grad_cam, overlay, save_rgb, slug
from image_cache import decode_job
from metrics import bootstrap_draws, resampled, run_report
from model import VKD, VKDConfig
from pictures import PlotError, plot_curves, plot_latents, plot_reliability, plot_training
from reports import LABELS, label_index

# ------------------------------------------------------------------------------------------- inference

def load_checkpoint(path, device="cpu"):
    """A checkpoint written by train.py -> (model in eval mode, checkpoint dict). Never unpickles code."""
    checkpoint = read_checkpoint(path, device)
    model = VKD(VKDConfig(**checkpoint["model_config"])).to(device)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


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
        x = data.normalise(torch.as_tensor(images[idx]).to(device), config["pixel_mean"], config["pixel_std"])
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
        x = data.normalise(torch.as_tensor(images[idx]).to(device), config["pixel_mean"], config["pixel_std"])
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


def evaluate_checkpoint(path, split="test", device="cpu", num_samples=0, data_options=None):
    """A checkpoint on one split -> Evaluated."""
    model, checkpoint = load_checkpoint(path, device)
    images, tokens, labels, groups, unit, splits = load_collection(checkpoint, path, data_options)
    indices = splits[split]
    p, _ = predict(model, images, tokens, indices, checkpoint["config"], device, num_samples=num_samples)
    return Evaluated(labels[indices], p, groups[indices], unit, prediction_name(model.cfg.method, num_samples),
                     checkpoint)


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
    x = data.normalise(torch.from_numpy(images).to(device), config["pixel_mean"], config["pixel_std"])
    p, _ = model.predict(x, prior_samples(model.cfg.method, num_samples))
    if checkpoint["model_config"]["method"] == "image":
        return images, p.cpu().numpy(), None, None
    mean, std = model.predict(x, uncertainty_samples)
    return images, p.cpu().numpy(), mean.cpu().numpy(), std.cpu().numpy()


# ---------------------------------------------------------------------------------------------- reports

def metrics_report(y, p, groups, num_resamples=1000, seed=0, label_names=LABELS, unit="reports"):
    """Per-label, macro and micro AUROC and AUPRC with bootstrap intervals over the groups, whose `unit`
    ("reports" or "patients") the result names (undefined -> None)."""
    draws = bootstrap_draws(y, [p], groups, num_resamples, seed)[0]
    return run_report(y, p, draws, label_names) | resampled(groups, unit)


def compare_checkpoints(paths, device="cpu", num_samples=0, num_resamples=1000, seed=0, data_options=None):
    """Several checkpoints evaluated on their common test split and compared (see compare_runs)
    -> (the comparison, the Evaluated runs it compares)."""
    runs = [evaluate_checkpoint(path, "test", device, num_samples, data_options) for path in paths]
    return compare_runs(paths, runs, num_resamples, seed), runs


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


# ------------------------------------------------------------------------------------------------ entry

def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate VKD checkpoints from images only.")
    add = parser.add_argument_group("checkpoints").add_argument
    add("--ckpt", default=None, help="checkpoint written by train.py (default: none; needed unless --compare)")
    add("--compare", nargs="+", default=None, metavar="CKPT",
        help="checkpoints compared on their common test split, paired differences to the first (--ckpt, if given, "
             "is the first); runs differing only in --seed are averaged as one method (default: none)")
    add("--split", default="test", choices=data.SPLITS, help="split evaluated (default: test)")
    add("--device", default="cpu", help="torch device (default: cpu)")
    add = parser.add_argument_group("prediction").add_argument
    add("--samples", type=int, default=0, help="prior samples averaged for the probabilities; 0 uses the prior "
                                               "mean (default: 0)")
    add("--uncertainty-samples", type=int, default=100,
        help="prior samples whose spread is the uncertainty, for --image and the rejection curve (default: 100)")
    add("--bow", action="store_true", help="also fit the bag-of-words reference (bow.py) on the training reports, "
                                           "with the checkpoint's tokens, and evaluate it on --split (default: off)")
    add = parser.add_argument_group("statistics").add_argument
    add("--bootstrap", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    add("--seed", type=int, default=0, help="seed of the bootstrap and of prior sampling (default: 0)")
    add("--reject", default="0.1,0.2,0.3", help="fractions of most uncertain images rejected (default: 0.1,0.2,0.3)")
    add("--temperature", action="store_true", help="fit temperature scaling on val and report ECE after it "
                                                   "(default: off)")
    add("--target-sensitivity", type=float, default=None,
        help="choose thresholds on val for this sensitivity instead of Youden's J (default: Youden's J)")
    add("--bins", type=int, default=15, help="equal-width bins of the ECE and reliability diagram (default: 15)")
    add = parser.add_argument_group("single images").add_argument
    add("--image", nargs="+", default=None, metavar="FILE",
        help="PNG/JPEG files: print the label probabilities with uncertainty instead of evaluating (default: none)")
    add("--cam", default=None, metavar="LABEL", help="write Grad-CAM overlays for this label: for each --image, or "
                                                     "for the most confident positive test images (default: none)")
    add("--cam-images", type=int, default=4, help="test images in the --cam picture (default: 4)")
    add = parser.add_argument_group("output").add_argument
    add("--plots", action="store_true", help="write ROC/PR, reliability, training and latent pictures as PNGs "
                                             "(needs matplotlib) (default: off)")
    add("--latent-label", default=None, help="label colouring the latent picture (default: the most frequent)")
    add("--out", default=None, help="folder for pictures and overlays (default: the checkpoint's run folder; "
                                    "with --compare: runs/compare)")
    add("--json", action="store_true", help="print the results as JSON (default: off)")
    # another collection than the checkpoint's: cross-dataset evaluation
    data.add_data_args(parser.add_argument_group("data (default: the checkpoint's own)"), inherit=True)
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
        x = data.normalise(torch.from_numpy(images).to(args.device), checkpoint["config"]["pixel_mean"],
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
    with_text = args.bow or args.plots and method != "image"
    images, tokens, labels, groups, unit, splits = load_collection(checkpoint, args.ckpt, data_options(args), with_text)
    test_idx, val_idx = splits[args.split], splits["val"]
    y, y_val = labels[test_idx], labels[val_idx]
    p, _ = predict(model, images, tokens, test_idx, config, args.device, num_samples=args.samples)
    p_val, _ = predict(model, images, tokens, val_idx, config, args.device, num_samples=args.samples)
    result = metrics_report(y, p, groups[test_idx], args.bootstrap, args.seed, label_names, unit)
    result["prediction"] = prediction_name(method, args.samples)
    if args.bow:                           # the simplest teacher, on the same tokens, for a side-by-side number
        train_idx = splits["train"]
        p_bow = fit_bag_of_words(tokens[train_idx], labels[train_idx], checkpoint["model_config"]["vocab_size"])
        result["bag_of_words"] = metrics_report(y, p_bow(tokens[test_idx]), groups[test_idx], args.bootstrap,
                                                args.seed, label_names, unit)
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
    if args.bow:
        print(format_metrics(result["bag_of_words"], f"bag-of-words reference, reads the report ({args.split})"), "\n")
    print(format_analysis(result))
    if written:
        print("\npictures: " + ", ".join(result["pictures"]))


def comparison(args):
    """--compare: the comparison tables; with --plots, ROC and PR curves of the first seed of each method."""
    paths = ([args.ckpt] if args.ckpt else []) + args.compare
    result, runs = compare_checkpoints(paths, args.device, args.samples, args.bootstrap, args.seed, data_options(args))
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
