"""Evaluate: what a checkpoint does on images alone, with the uncertainty of every number stated.

    python evaluate.py --ckpt runs/demo-vkd-seed0/best.pt          # test AUROC/AUPRC, intervals,
                                                                   # calibration, uncertainty
    python evaluate.py --ckpt runs/demo-vkd-seed0/best.pt --plots  # + pictures (PNG)
    python evaluate.py --compare runs/demo-image-seed0/best.pt runs/demo-vkd-seed0/best.pt
    python evaluate.py --ckpt runs/demo-vkd-seed0/best.pt --image a.png b.jpg --cam Cardiomegaly

Test-time inference uses the image-only prior p(z|x) (VKD.predict); the `text` baseline is the one
exception, evaluated with its report (VKD.predict_with_text): it is an upper bound, not a test-time
model. A NaN label is "not observed" (an uncertain MIMIC label under --uncertain ignore): every
metric (vkd/metrics.py) leaves it out, label by label. Intervals are 95% percentile bootstrap over
reports, or over patients where the collection names them; the output says which.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

import data
from model import PRIOR_MEAN_ONLY, VKD, VKDConfig
from vkd import analysis
from vkd.compare import Evaluated, compare_runs, format_comparison, format_metrics
from vkd.metrics import bootstrap_draws, resampled, run_report
from vkd.options import build_evaluate_parser
from vkd.pictures import PlotError
from vkd.reports import LABELS
from vkd.runtime import read_checkpoint
from vkd.summary import labelling

# --------------------------------------------------------------------------------------- inference

def load_checkpoint(path, device="cpu"):
    """A checkpoint written by train.py -> (model in eval mode, checkpoint dict). Never unpickles
    code (runtime.read_checkpoint)."""
    checkpoint = read_checkpoint(path, device)
    try:
        model = VKD(VKDConfig(**checkpoint["model_config"])).to(device)
        model.load_state_dict(checkpoint["model"])
    except (TypeError, RuntimeError, AssertionError) as error:      # another version's model
        raise data.DataError(f"{path} was refused: its model does not fit this model.py "
                             f"({str(error).splitlines()[0][:200]})") from error
    return model.eval(), checkpoint


def prior_samples(method, num_samples):
    """Prior samples to average for a model of `method`. The loss of `image` (and of distill and
    contrastive) reads mu_p only, so its logvar_p never leaves its random start: sampling it would
    add noise of an arbitrary size and handicap the method in a sampled comparison. It is always
    evaluated at its mean."""
    return 0 if method in PRIOR_MEAN_ONLY else num_samples


def prediction_name(method, num_samples):
    """How the probabilities of a model of `method` are made, as the output states it."""
    if method == "text":
        return "posterior mean f(mu_q(x, t)) (reads the report)"
    if prior_samples(method, num_samples):
        return f"mean over {num_samples} prior samples"
    if num_samples:
        return (f"prior mean f(mu_p(x)) (--samples {num_samples} not used: {method} never "
                f"trains logvar_p)")
    return "prior mean f(mu_p(x))"


@torch.no_grad()
def predict(model, images, tokens, indices, config, device, batch_size=256, num_samples=0):
    """Probabilities (and per-image std over prior samples) for the samples at `indices`: (N, K)
    each."""
    model.eval()
    num_samples = prior_samples(model.cfg.method, num_samples)
    probabilities, stds = [], []
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        images_on_device = torch.as_tensor(images[idx]).to(device)
        x = data.normalise(images_on_device, config["pixel_mean"], config["pixel_std"])
        if model.cfg.method == "text":
            p = model.predict_with_text(x, torch.as_tensor(tokens[idx]).to(device))
            std = torch.zeros_like(p)
        else:
            p, std = model.predict(x, num_samples)
        probabilities.append(p.cpu().numpy())
        stds.append(std.cpu().numpy())
    return np.concatenate(probabilities), np.concatenate(stds)


def evaluated_options(checkpoint, data_options=None):
    """The data options of the collection evaluated: the checkpoint's, or those given instead."""
    given = {name: value for name, value in (data_options or {}).items() if value is not None}
    return checkpoint["config"] | given


def load_collection(checkpoint, checkpoint_path, data_options=None, with_text=False):
    """Rebuild a collection -> (images, tokens or None, labels (N, K), bootstrap groups (N,) and
    their unit, splits), K = the checkpoint's labels. Tokens are built for the `text` model (it
    reads reports) or when asked (posterior means for a picture, the bag of words).

    By default this is the checkpoint's own collection, and its split must be the one trained on.
    Data options (--data, --data-dir, ...) may name another collection: cross-dataset evaluation,
    e.g. a model trained on MIMIC-CXR tested on OpenI. Its labels are matched to the checkpoint's by
    name; a label the other collection lacks is NaN (not observed): every metric leaves it out."""
    config, options = checkpoint["config"], evaluated_options(checkpoint, data_options)
    collection = data.prepare_from(options)
    images = data.image_cache(collection, config["image_size"], options["strict"])
    same_collection = all(options.get(name) == config.get(name)
                          for name in data.DATA_OPTIONS if name != "data_dir")
    if same_collection and data.split_hash(collection.split_ids) != checkpoint["split_sha256"]:
        raise data.DataError(f"the {config['data']} collection under {options['data_dir']} gives "
                             f"a different split than the one {checkpoint_path} was trained on")
    tokens = None
    if checkpoint["model_config"]["method"] == "text" or with_text:
        tokenizer = data.load_tokenizer(Path(checkpoint_path).parent / "tokenizer.json")
        tokens = data.sample_tokens(collection, tokenizer, checkpoint["model_config"]["max_len"])
    labels = analysis.match_labels(collection, checkpoint["label_names"], options["data"],
                                   checkpoint_path)
    return (images, tokens, labels, collection.bootstrap_groups, collection.bootstrap_unit,
            collection.splits)


def evaluate_checkpoint(path, split="test", device="cpu", num_samples=0, data_options=None):
    """A checkpoint on one split -> Evaluated (vkd/compare.py)."""
    model, checkpoint = load_checkpoint(path, device)
    images, tokens, labels, groups, unit, splits = load_collection(checkpoint, path, data_options)
    indices = splits[split]
    p, _ = predict(model, images, tokens, indices, checkpoint["config"], device,
                   num_samples=num_samples)
    return Evaluated(labels[indices], p, groups[indices], unit,
                     prediction_name(model.cfg.method, num_samples), checkpoint,
                     labelling(evaluated_options(checkpoint, data_options)))


# ----------------------------------------------------------------------------------------- metrics

def metrics_report(y, p, groups, num_resamples=1000, seed=0, label_names=LABELS, unit="reports",
                   options=None):
    """Per-label AUROC and AUPRC, their macro mean, their mean over the five CheXpert competition
    labels and their micro value, with bootstrap intervals over the groups (undefined -> None). The
    result names the groups' `unit` ("reports" or "patients") and, given the collection's options,
    where its labels come from (vkd/summary.py's labelling)."""
    draws = bootstrap_draws(y, [p], groups, num_resamples, seed, label_names)[0]
    report = run_report(y, p, draws, label_names) | resampled(groups, unit)
    if options is not None:
        report["labels_from"] = labelling(options)
    return report


def compare_checkpoints(paths, device="cpu", num_samples=0, num_resamples=1000, seed=0,
                        data_options=None):
    """Several checkpoints evaluated on their common test split and compared (compare_runs)
    -> (the comparison, the Evaluated runs it compares)."""
    runs = [evaluate_checkpoint(path, "test", device, num_samples, data_options) for path in paths]
    return compare_runs(paths, runs, num_resamples, seed), runs


# ------------------------------------------------------------------------------------------- entry

def get_args(argv=None):
    parser = build_evaluate_parser()             # the options, grouped (vkd/options.py)
    args = parser.parse_args(argv)
    if args.ckpt is None and not args.compare:
        parser.error("give --ckpt, or --compare with two or more checkpoints")
    if args.compare and len(([args.ckpt] if args.ckpt else []) + args.compare) < 2:
        parser.error("--compare needs two or more checkpoints (with --ckpt: one or more)")
    if args.compare and args.image:
        parser.error("--image takes one --ckpt, not --compare")
    return args


def data_options(args):
    """The data options given on the command line (None: the checkpoint's own)."""
    return {name: getattr(args, name) for name in data.DATA_OPTIONS}


def single_run(args):
    """--ckpt: metrics with intervals; then calibration, operating points, uncertainty and the
    pictures asked for (vkd/analysis.py)."""
    model, checkpoint = load_checkpoint(args.ckpt, args.device)
    config, method = checkpoint["config"], checkpoint["model_config"]["method"]
    with_text = args.bow or (args.plots and method in ("vkd", "text"))
    loaded = load_collection(checkpoint, args.ckpt, data_options(args), with_text)
    images, tokens, labels, groups, unit, splits = loaded
    test_idx, val_idx = splits[args.split], splits["val"]
    p, _ = predict(model, images, tokens, test_idx, config, args.device, num_samples=args.samples)
    p_val, _ = predict(model, images, tokens, val_idx, config, args.device,
                       num_samples=args.samples)
    result = metrics_report(labels[test_idx], p, groups[test_idx], args.bootstrap, args.seed,
                            checkpoint["label_names"], unit,
                            evaluated_options(checkpoint, data_options(args)))
    result["prediction"] = prediction_name(method, args.samples)
    uncertainty = None
    if method == "vkd":                # only VKD trains the prior's variance; `text` reads reports
        uncertainty = predict(model, images, tokens, test_idx, config, args.device,
                              num_samples=args.uncertainty_samples)
    result |= analysis.analyse(args, model, checkpoint, loaded, p, p_val, uncertainty,
                               metrics_report)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(format_metrics(result, f"{args.ckpt} ({args.split})"), "\n")
    print(analysis.format_extras(result, args.split))


def comparison(args):
    """--compare: the comparison tables; with --plots, ROC and PR curves of each method."""
    paths = ([args.ckpt] if args.ckpt else []) + args.compare
    result, runs = compare_checkpoints(paths, args.device, args.samples, args.bootstrap,
                                       args.seed, data_options(args))
    if args.plots:
        result["pictures"] = analysis.comparison_pictures(args, result, runs)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(format_comparison(result))
    if args.plots:
        print("\npictures: " + ", ".join(result["pictures"]))


def main():
    args = get_args()
    torch.manual_seed(args.seed)          # prior samples: the same command gives the same numbers
    try:
        if args.image:
            model, checkpoint = load_checkpoint(args.ckpt, args.device)
            num_samples = prior_samples(checkpoint["model_config"]["method"], args.samples)
            analysis.single_images(args, model, checkpoint, num_samples)
        elif args.compare:
            comparison(args)
        else:
            single_run(args)
    except (data.DataError, PlotError, OSError) as error:   # OSError: e.g. no such --image
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
