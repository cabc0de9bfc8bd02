"""What evaluate.py reports beyond the metrics, behind one call each: calibration, operating points,
uncertainty, the bag-of-words reference and pictures of one checkpoint (analyse, format_extras);
probabilities and Grad-CAM for single image files (single_images). A student can skip this file.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

import data
from model import PRIOR_MEAN_ONLY
from vkd.bow import fit_bag_of_words
from vkd.compare import format_metrics
from vkd.calibration import (calibration_report, fit_temperature, format_analysis,
                             operating_points_report, rejection_curve)
from vkd.gradcam import cam_picture, grad_cam, overlay, save_rgb, slug
from vkd.image_cache import decode_job
from vkd.pictures import plot_curves, plot_latents, plot_reliability, plot_training
from vkd.reports import DataError, label_index


def analyse(args, model, checkpoint, loaded, p, p_val, uncertainty, metrics_report):
    """The parts of `evaluate.py --ckpt` after the metrics, as a dict: the bag-of-words reference
    (--bow), calibration (--temperature), operating points chosen on validation, the rejection
    curve of a vkd model (`uncertainty`: prior-sample mean and std on the split, else None), and
    the pictures (--plots, --cam). `loaded` is evaluate.load_collection's tuple, `metrics_report`
    evaluate's."""
    images, tokens, labels, groups, unit, splits = loaded
    label_names = checkpoint["label_names"]
    test_idx, val_idx = splits[args.split], splits["val"]
    y, y_val = labels[test_idx], labels[val_idx]
    result = {}
    # the simplest teacher, on the same tokens, for a side-by-side number
    if args.bow:
        train_idx = splits["train"]
        vocab_size = checkpoint["model_config"]["vocab_size"]
        p_bow = fit_bag_of_words(tokens[train_idx], labels[train_idx], vocab_size)
        result["bag_of_words"] = metrics_report(y, p_bow(tokens[test_idx]), groups[test_idx],
                                                args.bootstrap, args.seed, label_names, unit)
    temperature = fit_temperature(y_val, p_val) if args.temperature else None
    result["split"] = args.split
    result["calibration"] = calibration_report(y, p, label_names, args.bins, temperature)
    rule = ("Youden's J" if args.target_sensitivity is None
            else f"sensitivity >= {args.target_sensitivity}")
    result["operating_points"] = {"rule": rule, "per_label": operating_points_report(
        y_val, p_val, y, p, label_names, args.target_sensitivity)}
    if uncertainty is not None:
        mean, std = uncertainty
        per_image = std.mean(1)                                                  # (N,)
        fractions = tuple(float(f) for f in args.reject.split(","))
        result["uncertainty"] = {
            "samples": args.uncertainty_samples, "median": float(np.median(per_image)),
            "p90": float(np.percentile(per_image, 90)),
            "macro_auroc_after_rejecting": rejection_curve(y, mean, per_image, fractions)}
    written = pictures(args, model, checkpoint, loaded, p, temperature)
    result["pictures"] = [str(path) for path in written]
    return result


def pictures(args, model, checkpoint, loaded, p, temperature):
    """--plots: ROC/PR curves, reliability, training curves, latent means; --cam: Grad-CAM."""
    images, tokens, labels, _, _, splits = loaded
    config, method = checkpoint["config"], checkpoint["model_config"]["method"]
    label_names = checkpoint["label_names"]
    test_idx = splits[args.split]
    y = labels[test_idx]
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
        named = [("prior means mu_p(x)", mu_p)] if method != "text" else []
        if mu_q is not None:
            named.append(("posterior means mu_q(x, t)", mu_q))
        written.append(plot_latents(named, y[:, k], label_names[k], out))
    if args.cam:
        written.append(cam_picture(model, images, test_idx, y, p, config, label_names, args, out))
    return written


def format_extras(result, split):
    """The text of analyse's result, after evaluate.py's metrics table."""
    parts = []
    if "bag_of_words" in result:
        title = f"bag-of-words reference, reads the report ({split})"
        parts.append(format_metrics(result["bag_of_words"], title) + "\n")
    parts.append(format_analysis(result))
    if result["pictures"]:
        parts.append("\npictures: " + ", ".join(result["pictures"]))
    return "\n".join(parts)


@torch.no_grad()
def latent_means(model, images, tokens, indices, config, device, batch_size=256):
    """Prior means mu_p(x) and, for a model with a report encoder, posterior means mu_q(x, t):
    (N, D) each, or None."""
    mu_p, mu_q = [], []
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        images_on_device = torch.as_tensor(images[idx]).to(device)
        x = data.normalise(images_on_device, config["pixel_mean"], config["pixel_std"])
        h_x, mu, _ = model.encode_prior(x)
        mu_p.append(mu.float().cpu().numpy())
        if model.posterior is not None:                  # vkd, text: q(z | x, t)
            t = torch.as_tensor(tokens[idx]).to(device)
            mu_q.append(model.encode_posterior(h_x, t)[0].float().cpu().numpy())
    return np.concatenate(mu_p), np.concatenate(mu_q) if mu_q else None


def predict_files(model, checkpoint, paths, device, num_samples=0, uncertainty_samples=100):
    """Any PNG/JPEG (any size, 8/16-bit, gray/RGB) -> (images (B, S, S) uint8, p (B, K), mean and
    std (B, K) over prior samples), decoded and resized exactly like the training cache
    (image_cache.decode_job) at the checkpoint's image size and normalised with its training
    statistics. `num_samples`: prior samples averaged for p (evaluate.prior_samples). The `image`
    baseline never trains the prior's variance (its loss reads mu_p only), so it has no
    uncertainty: mean and std are None."""
    if checkpoint["model_config"]["method"] == "text":
        raise DataError("the `text` model reads the report; predict from images with a vkd or "
                        "image checkpoint")
    config = checkpoint["config"]
    decoded = [decode_job((path, config["image_size"])) for path in paths]   # as the cache does
    problems = [why for _, why in decoded if why is not None]
    if problems:
        raise DataError("cannot decode " + "; ".join(problems))
    images = np.stack([pixels for pixels, _ in decoded])
    x = data.normalise(torch.from_numpy(images).to(device), config["pixel_mean"],
                       config["pixel_std"])
    p, _ = model.predict(x, num_samples)
    if checkpoint["model_config"]["method"] in PRIOR_MEAN_ONLY:
        return images, p.cpu().numpy(), None, None
    mean, std = model.predict(x, uncertainty_samples)
    return images, p.cpu().numpy(), mean.cpu().numpy(), std.cpu().numpy()


def single_images(args, model, checkpoint, num_samples):
    """--image: probabilities with uncertainty for each file, and a Grad-CAM overlay per file with
    --cam. `num_samples`: prior samples averaged for the probabilities."""
    label_names = checkpoint["label_names"]
    images, p, mean, std = predict_files(model, checkpoint, args.image, args.device, num_samples,
                                         args.uncertainty_samples)
    result = {str(path): {name: {"p": float(p[i, k]),
                                 "mean": None if mean is None else float(mean[i, k]),
                                 "std": None if std is None else float(std[i, k])}
                          for k, name in enumerate(label_names)}
              for i, path in enumerate(args.image)}
    if args.cam:
        k = label_index(label_names, args.cam)
        out = Path(args.out or Path(args.ckpt).parent)
        out.mkdir(parents=True, exist_ok=True)
        x = data.normalise(torch.from_numpy(images).to(args.device),
                           checkpoint["config"]["pixel_mean"], checkpoint["config"]["pixel_std"])
        cams = grad_cam(model, x, k).numpy()
        for i, path in enumerate(args.image):
            name = f"{Path(path).stem}-cam-{slug(label_names[k])}.png"
            result[str(path)]["cam"] = str(save_rgb(overlay(images[i], cams[i]), out / name))
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for path, probabilities in result.items():
        print(f"{path}\n{'label':28s} {'p':>6s}   mean ± std over {args.uncertainty_samples} "
              f"prior samples")
        for name in label_names:
            entry = probabilities[name]
            spread = (f"{entry['mean']:.3f} ± {entry['std']:.3f}" if entry["std"] is not None
                      else "n/a (this method's prior variance is never trained)")
            print(f"{name:28s} {entry['p']:6.3f}   {spread}")
        if "cam" in probabilities:
            print(f"Grad-CAM for {label_names[k]}: {probabilities['cam']}")


def comparison_pictures(args, result, runs):
    """--compare --plots: ROC and PR curves of the first seed of each method."""
    out = Path(args.out or "runs/compare")
    out.mkdir(parents=True, exist_ok=True)
    named = [(m["name"], runs[m["runs"][0]].probabilities) for m in result["methods"]]
    written = plot_curves(runs[0].labels, named, result["label_names"], out)
    return [str(path) for path in written]


def match_labels(collection, trained, name, checkpoint_path):
    """The collection's labels (N, K) in the order of the checkpoint's K `trained` labels; NaN for
    a label the collection does not have."""
    if collection.label_names == trained:
        return collection.labels
    shared = [label for label in trained if label in collection.label_names]
    if not shared:
        raise DataError(f"{checkpoint_path} predicts {trained}; the {name} collection has "
                        f"none of these labels ({collection.label_names})")
    labels = np.full((len(collection.labels), len(trained)), np.nan, dtype=np.float32)  # (N, K)
    for k, label in enumerate(trained):
        if label in shared:
            labels[:, k] = collection.labels[:, collection.label_names.index(label)]
    left_out = [label for label in trained if label not in shared]
    note = f"; not in this collection, left out: {', '.join(left_out)}" if left_out else ""
    print(f"evaluating on {name}: {len(shared)} shared labels{note}", file=sys.stderr)
    return labels
