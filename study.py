"""The study: which way of using the report helps, and when? One command trains a grid of runs and
writes its document.

    python study.py                   # the demo on a 2-core CPU, then docs/STUDY.md
    python study.py --quick           # a reduced grid for a class; the document goes into --out
    python study.py --data openi --data-dir DIR --plan gpu         # OpenI on one GPU
    python study.py --data mimic --data-dir DIR --plan gpu --fractions 0.1 1.0 --seeds 0
    python study.py --report-only     # write the document from the runs that have finished

Other train.py data options (--csv FILE, --csv-labels, --mimic-labels, --uncertain, --views) are
passed to every run. For a collection other than the demo the document goes into the --out folder.
Runs that have finished (metrics.json) are skipped and interrupted ones resumed, so a study that was
stopped continues where it was. The document and its pictures are written from the finished runs
alone.

The grid, fixed before any run (nothing is chosen by looking at test numbers):
- the learning curve: image, vkd, text, distill and contrastive on a seeded 0.1, 0.25, 0.5 and 1.0
  of the training reports (--train-fraction: the same reports for every method and seed), seeds 0,
  1, 2; each distill run learns from the text run of its fraction and seed, trained before it;
- the controls: vkd and text with each training report's text replaced by another training
  report's (--report-control shuffled: the statistics of reports, not their information) or by
  nothing (blank), at every fraction and seed; validation and test keep their reports;
- ablations of vkd at ABLATION_FRACTION (ABLATIONS), each against image and against vkd's defaults
  on the same seeds and bootstrap resamples, and the image baseline with the classifier of two of
  them (CONTROL);
- every run the same collection and the plan's image size, epochs and batch (PLANS).
Diagnostics of every vkd run, on validation: KL(q || p) per latent dimension and the active
dimensions, the distance of the prior and posterior means, and the macro AUROC of the teacher
f(mu_q(x, t)).
"""
import argparse
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import evaluate
import train
from model import gaussian_kl
from vkd.compare import NOT_THE_METHOD, compare_runs, difference_cell
from vkd.metrics import CHEXPERT5, auroc_summary
from vkd.pictures import PlotError, pyplot
from vkd.recipe import train_in_parallel
from vkd.runtime import cpu_name, write_text
from vkd.summary import labelling_line

METHODS = ("image", "vkd", "text", "distill", "contrastive")
# the ways to use a report that only training has, each against the image baseline
WAYS = ("vkd", "distill", "contrastive")
CONTROLS = ("shuffled", "blank")
CONTROLLED = ("vkd", "text")
PLANS = {
    # Sized for a 2-core CPU: the compact CNN at 64 px.
    "demo": {"fractions": (0.1, 0.25, 0.5, 1.0), "seeds": (0, 1, 2), "jobs": 2, "threads": 1,
             "demo_reports": 1500,
             "settings": ["--image-size", "64", "--epochs", "12", "--batch-size", "64"]},
    # One GPU: densenet121 with ImageNet weights at 224 px, as the authors' encoder; fine-tuned
    # at a lower peak learning rate than the compact CNN's. Not measured here (no GPU).
    "gpu": {"fractions": (0.1, 0.25, 0.5, 1.0), "seeds": (0, 1, 2), "jobs": 1, "threads": None,
            "demo_reports": 1500,
            "settings": ["--backbone", "densenet121", "--backbone-weights", "imagenet",
                         "--image-size", "224", "--epochs", "10", "--batch-size", "64",
                         "--lr", "3e-4"]},
}
# Every run: a label with no positive report in a small fraction is trained anyway (and counts in
# the test AUROC).
COMMON = ["--allow-missing-labels"]
# Why 0.25: distillation from privileged text is expected to matter most when labelled images are
# few, and at a quarter of the training reports every label still has positive training reports in
# the demo.
ABLATION_FRACTION = 0.25
ABLATIONS = {                        # name -> (method, train.py flags that change its defaults)
    "beta 0.01": ("vkd", ["--beta", "0.01"]),
    "beta 1": ("vkd", ["--beta", "1"]),
    "prior weight 0": ("vkd", ["--prior-weight", "0"]),
    "q(z|t)": ("vkd", ["--posterior-input", "report"]),
    "KL(p||q)": ("vkd", ["--kl-direction", "pq"]),
    "f([z; h_x])": ("vkd", ["--classifier-input", "z+image"]),
    # the 3-epoch ramp of the defaults, restarted every 6 epochs (twice in the demo plan's 12)
    "cyclical beta": ("vkd", ["--beta-cycle-epochs", "6"]),
    "100 samples averaged": ("vkd", ["--latent-samples", "100", "--average-samples"]),
    "the authors' variant": ("vkd", ["--preset", "authors"]),
    # the control of the two settings whose classifier also reads the image features: the same
    # classifier, no report
    "image with f([z; h_x])": ("image", ["--classifier-input", "z+image"]),
}
CONTROL = "image with f([z; h_x])"
# The reduced grid of --quick, on the demo: for a class.
QUICK = {"fractions": (0.25, 1.0), "seeds": (0,), "jobs": 2, "threads": 1, "demo_reports": 400,
         "ablations": ("beta 1", "q(z|t)", "the authors' variant", CONTROL),
         "settings": ["--image-size", "32", "--epochs", "4", "--batch-size", "32"]}
# the ablations' reference: vkd at ABLATION_FRACTION with no flag changed
DEFAULTS = "vkd (defaults)"
# nats: a latent dimension whose mean KL(q || p) is above this is active
ACTIVE_KL = 0.01
# the summaries every table reports: the macro mean over the labels evaluable in the split, and
# the mean over the five CheXpert competition labels
KEYS = {"macro_auroc": "macro AUROC", "chexpert5_auroc": "CheXpert 5 mean AUROC",
        "macro_auprc": "macro AUPRC"}


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data", default="demo", choices=["demo", "openi", "mimic", "csv"],
        help="the collection (default: demo); its own options come from config/collections.py")
    add("--data-dir", default="data", help="where the collection lives (default: data)")
    add("--plan", default="demo", choices=list(PLANS),
        help="demo: sized for a 2-core CPU; gpu: a pretrained densenet121 at 224 px on one GPU, "
             "not measured here (default: demo)")
    add("--quick", action="store_true", help="the reduced grid, on the demo (default: off)")
    add("--fractions", type=float, nargs="+", default=None,
        help="narrow the training fractions (default: the plan's)")
    add("--seeds", type=int, nargs="+", default=None, help="narrow the seeds (default: the plan's)")
    add("--out", default=None,
        help="run folders (default: runs/study, runs/study-quick or runs/study-DATA-PLAN)")
    add("--doc", default=None,
        help="the document (default: docs/STUDY.md for the demo plan, else <out>/STUDY.md)")
    add("--jobs", type=int, default=None, help="runs side by side (default: the plan's, 2 or 1)")
    add("--threads", type=int, default=None,
        help="threads per run (default: the plan's: 1 on the CPU, torch's own on a GPU)")
    add("--bootstrap", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    add("--report-only", action="store_true",
        help="train nothing; write the document (default: off)")
    args, args.data_flags = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)        # the command, as written
    if args.quick and (args.data != "demo" or args.plan != "demo"):
        parser.error("--quick is the reduced grid on the demo: give it without --data and --plan")
    data_flags = {"--" + name.replace("_", "-") for name in data.DATA_OPTIONS} - {"--data-dir"}
    others = [flag.split("=")[0] for flag in args.data_flags
              if flag.startswith("-") and flag.split("=")[0] not in data_flags]
    if others or (args.data == "demo" and args.data_flags):
        parser.error(f"unrecognized arguments: {' '.join(others or args.data_flags)} (study.py "
                     f"passes the data options of train.py to its runs; the plan sets the rest)")
    args.plan_of = dict(QUICK if args.quick else PLANS[args.plan])
    for name in ("fractions", "seeds"):
        args.plan_of[name] = tuple(getattr(args, name) or args.plan_of[name])
    args.jobs = args.jobs or args.plan_of["jobs"]
    args.threads = args.threads or args.plan_of["threads"]
    default_out = ("runs/study-quick" if args.quick else "runs/study"
                   if (args.data, args.plan) == ("demo", "demo") else
                   f"runs/study-{args.data}-{args.plan}")
    args.out = Path(args.out or default_out)
    in_docs = (args.data, args.plan, args.quick) == ("demo", "demo", False)
    args.doc = Path(args.doc or ("docs/STUDY.md" if in_docs else args.out / "STUDY.md"))
    return args


# --------------------------------------------------------------------------------------------- grid

def slug(name):
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def collection_flags(args):
    """The train.py flags of the collection: the demo's size, or --data with its own options."""
    if args.data == "demo":
        return ["--data", "demo", "--demo-reports", str(args.plan_of["demo_reports"])]
    return ["--data", args.data, *args.data_flags]


def grid(args):
    """-> ({run name: train.py flags}, learning curve {fraction: {method: [run names]}}, controls
    {(method, control): {fraction: [run names]}}, ablations {name: [runs]}). Ablations need
    ABLATION_FRACTION among the fractions (their baselines are its curve's runs)."""
    plan, out = args.plan_of, args.out
    seeds, common = plan["seeds"], collection_flags(args) + plan["settings"] + COMMON
    runs, curve, controls, ablations = {}, {}, {}, {}

    def add(name, method, fraction, seed, flags=()):
        runs[name] = common + ["--method", method, "--train-fraction", str(fraction),
                               "--seed", str(seed), *flags]
        if method == "distill":            # its teacher: the text run of its fraction and seed
            runs[name] += ["--teacher", str(out / f"f{fraction}-text-seed{seed}" / "best.pt")]
        return name

    for fraction in plan["fractions"]:
        curve[fraction] = {method: [add(f"f{fraction}-{method}-seed{seed}", method, fraction, seed)
                                    for seed in seeds] for method in METHODS}
        for method in CONTROLLED:
            for control in CONTROLS:
                controls.setdefault((method, control), {})[fraction] = [
                    add(f"f{fraction}-{method}-{control}-seed{seed}", method, fraction, seed,
                        ["--report-control", control]) for seed in seeds]
    if ABLATION_FRACTION in plan["fractions"]:
        for ablation in plan.get("ablations", ABLATIONS):
            method, flags = ABLATIONS[ablation]
            ablations[ablation] = [
                add(f"f{ABLATION_FRACTION}-{method}-{slug(ablation)}-seed{seed}", method,
                    ABLATION_FRACTION, seed, flags) for seed in seeds]
    return runs, curve, controls, ablations


def finished(out, name):
    return (out / name / "metrics.json").exists()


def check_plan(runs, args):
    """Stop when a run folder was trained with other options than the plan says (an older grid,
    another --out): its numbers would be reported under the wrong heading. A plan whose flags
    train.py refuses stops here, before any run."""
    for name, flags in runs.items():
        planned = vars(train.get_args(flags + ["--out", str(args.out / name)]))
        record = args.out / name / "run.json"
        if not record.exists():
            continue
        try:
            config = json.loads(record.read_text())["config"]
        except (ValueError, KeyError) as error:
            sys.exit(f"error: {record} cannot be read ({error!r}); delete {record.parent} to train "
                     f"that run again")
        wrong = {key: (config.get(key), value) for key, value in planned.items()
                 if key not in NOT_THE_METHOD and value is not None and config.get(key) != value}
        if wrong:
            sys.exit(f"error: {args.out / name} was trained with other options than the study "
                     f"plans (option: (trained, planned)) {wrong}; delete that folder or give "
                     f"another --out")


# ------------------------------------------------------------------------------------------ results

def compare(names, evaluated, args):
    """Paired comparison of the given runs, the reference first (the image baseline, a control or
    vkd's defaults) -> compare_runs' result, or None when a run has not finished."""
    if not names or not all(name in evaluated for name in names):
        return None
    paths = [args.out / name / "best.pt" for name in names]
    result = compare_runs(paths, [evaluated[name] for name in names], args.bootstrap, seed=0)
    groups = [[names[i] for i in method["runs"]] for method in result["methods"]]
    assert all(len(group) == len(names) // len(groups) for group in groups), \
        f"runs grouped as {groups}"
    return result


@torch.no_grad()
def diagnostics(path, device="cpu", batch_size=256):
    """A model with a report encoder on its validation split -> KL(q || p) per latent dimension
    (mean over the images), the number of active dimensions, the mean distance |mu_q - mu_p|, the
    teacher's macro AUROC."""
    model, checkpoint = evaluate.load_checkpoint(path, device)
    images, tokens, labels, _, _, splits = evaluate.load_collection(checkpoint, path,
                                                                    with_text=True)
    config, idx = checkpoint["config"], splits["val"]
    kl, distance, teacher = [], [], []
    for start in range(0, len(idx), batch_size):
        i = idx[start:start + batch_size]
        x = data.normalise(torch.as_tensor(images[i]).to(device), config["pixel_mean"],
                           config["pixel_std"])
        t = torch.as_tensor(tokens[i]).to(device)
        h_x, mu_p, logvar_p = model.encode_prior(x)
        mu_q, logvar_q = model.encode_posterior(h_x, t)
        # sums over a size-1 axis
        per_dim = [a.unsqueeze(-1) for a in (mu_q, logvar_q, mu_p, logvar_p)]
        kl.append(gaussian_kl(*per_dim).cpu())                                     # (B, D)
        distance.append((mu_q - mu_p).norm(dim=-1).cpu())                          # (B,)
        teacher.append(model.predict_with_text(x, t).cpu())                        # (B, K)
    kl_per_dim = torch.cat(kl).mean(0).numpy()
    return {"kl_per_dim": kl_per_dim.tolist(), "kl": float(kl_per_dim.sum()),
            "active_dims": int((kl_per_dim > ACTIVE_KL).sum()),
            "distance": float(torch.cat(distance).mean()),
            "teacher_auroc": auroc_summary(labels[idx], torch.cat(teacher).numpy())["macro"]}


def cell(text):
    """A Markdown table cell: a | inside (q(z|t)) would end the cell."""
    return str(text).replace("|", "\\|")


def seed_mean(values):
    """'1.23 ± 0.04' over seeds (the std only for several)."""
    values = np.asarray(values, dtype=np.float64)
    return f"{values.mean():.3g}" + (f" ± {values.std(ddof=1):.2g}" if len(values) > 1 else "")


def estimate(method, key):
    """'0.812 ± 0.010 [0.785, 0.841]': the seed mean, the std over seeds, the bootstrap interval of
    the mean."""
    stats = method[key]
    if stats["mean"] is None:
        return "n/a"
    spread = f" ± {stats['std']:.3f}" if stats["std"] is not None else ""
    return f"{stats['mean']:.3f}{spread} [{stats['ci95'][0]:.3f}, {stats['ci95'][1]:.3f}]"


def difference(method, key, resamples):
    return difference_cell(method["difference"][key], resamples)


def verdict(method, key):
    """'above' / 'below' when the 95% interval of the difference excludes 0, else 'within noise'."""
    ci = method["difference"][key]["ci95"]
    return ("n/a" if ci is None else "above" if ci[0] > 0 else "below" if ci[1] < 0
            else "within noise")


# ----------------------------------------------------------------------------------------- document

def curve_rows(curve, evaluated, args):
    """-> {fraction: compare_runs result of the five methods at that fraction, image first} for
    the finished fractions."""
    rows = {}
    for fraction, methods in curve.items():
        result = compare([name for method in METHODS for name in methods[method]], evaluated, args)
        if result is not None:
            rows[fraction] = result
    return rows


def control_rows(curve, controls, evaluated, args):
    """-> {(method, control): {fraction: the method with real reports, as a method of a paired
    comparison with the control first (its difference: real − control)}}."""
    rows = {}
    for (method, control), fractions in controls.items():
        for fraction, names in fractions.items():
            result = compare(names + curve[fraction][method], evaluated, args)
            if result is not None:
                rows.setdefault((method, control), {})[fraction] = result["methods"][1]
    return rows


def ablation_rows(curve, ablations, evaluated, args):
    """-> {setting: (its result against image, against vkd's defaults)} at ABLATION_FRACTION, vkd's
    defaults first; each result is a method of a paired comparison of all the finished settings at
    once (its difference is setting - image, or setting - vkd's defaults)."""
    baseline = curve.get(ABLATION_FRACTION, {})
    settings = {DEFAULTS: baseline.get("vkd", [])} | ablations
    done = {setting: names for setting, names in settings.items()
            if names and all(n in evaluated for n in names)}
    runs = [name for names in done.values() for name in names]
    against_image = compare(baseline.get("image", []) + runs, evaluated, args)
    against_defaults = compare(runs, evaluated, args) if DEFAULTS in done else None
    return {setting: (against_image["methods"][1 + i] if against_image else None,
                      against_defaults["methods"][i] if against_defaults and i else None)
            for i, setting in enumerate(done)}


def classifier_rows(ablations, evaluated, args):
    """-> {setting: its result against CONTROL} for the settings whose classifier reads [z; h_x]: is
    their gain the report's, or the classifier's?"""
    settings = [setting for setting in ("f([z; h_x])", "the authors' variant")
                if setting in ablations]
    groups = ([ablations[setting] for setting in (CONTROL, *settings)]
              if CONTROL in ablations and settings else [])
    result = (compare([name for group in groups for name in group], evaluated, args)
              if groups else None)
    return {} if result is None else dict(zip(settings, result["methods"][1:]))


def summary_keys(evaluated):
    """The summaries the tables show (KEYS): the CheXpert 5 mean only for labels that have the
    five."""
    labels = {label for run in evaluated.values() for label in run.checkpoint["label_names"]}
    return [key for key in KEYS if key != "chexpert5_auroc" or set(CHEXPERT5) <= labels]


def auroc_keys(results):
    return [key for key in results["keys"] if key.endswith("auroc")]


def by_fraction(methods, key, resamples):
    """'0.1: +0.010 [+0.002, +0.017], p = 0.008 (above); 0.25: ...' over {fraction: method}."""
    return "; ".join(f"{fraction}: {difference(method, key, resamples)} ({verdict(method, key)})"
                     for fraction, method in methods.items())


def findings(results, resamples):
    """The reading of the results, from the intervals alone: a difference whose 95% interval
    excludes 0 is above or below; any other is within noise."""
    curve, controls, aurocs = results["curve"], results["controls"], auroc_keys(results)
    lines = []
    for way in WAYS:
        at = {fraction: result["methods"][METHODS.index(way)] for fraction, result in curve.items()}
        for key in aurocs:
            lines.append(f"- **{way} − image, {KEYS[key]}**, by training fraction: "
                         f"{by_fraction(at, key, resamples)}.")
    for (method, control), at in controls.items():
        lines.append(f"- **{method} − {method} trained on {control} reports, macro AUROC**, by "
                     f"training fraction: {by_fraction(at, 'macro_auroc', resamples)}.")
    text = {fraction: result["methods"][METHODS.index("text")]
            for fraction, result in curve.items()}
    lines.append("- **What the teacher could pass on**: text − image (text reads the report also "
                 f"at test time), macro AUROC, by training fraction: "
                 f"{by_fraction(text, 'macro_auroc', resamples)}.")
    lines += ablation_findings(results, resamples)
    ablations = results["ablations"].values()
    intervals = ((len(aurocs) * len(WAYS) + 1) * len(curve)
                 + sum(len(at) for at in controls.values())
                 + sum(2 * sum(part is not None for part in pair) for pair in ablations)
                 + 2 * len(results["classifier"]))
    lines.append(f"- **How sure**: {intervals} intervals are read here, each at 95% and none "
                 "corrected for the others: a few of them excluding 0 by chance is expected. The "
                 "intervals resample the test set's bootstrap units (above); the ± after a mean is "
                 "its std over seeds (training noise).")
    return lines


def ablation_findings(results, resamples):
    """The ablations, the classifier's control and the active dimensions, as findings lines."""
    ablations, classifier, diagnosed = (results["ablations"], results["classifier"],
                                        results["diagnosed"])
    lines = []
    for key, metric in (("macro_auroc", "macro AUROC"), ("macro_auprc", "macro AUPRC")):
        for against, which in (("image", 0), (DEFAULTS, 1)):
            groups = {}
            for setting, pair in ablations.items():
                if pair[which] is not None:
                    groups.setdefault(verdict(pair[which], key), []).append(setting)
            if groups:
                verdicts = "; ".join(f"{kind}: {', '.join(settings)}"
                                     for kind, settings in sorted(groups.items()))
                lines.append(f"- **Ablations against {against} at fraction {ABLATION_FRACTION}, "
                             f"{metric}**: {verdicts}.")
        if classifier:
            verdicts = "; ".join(f"{setting}: {difference(method, key, resamples)} "
                                 f"({verdict(method, key)})"
                                 for setting, method in classifier.items())
            lines.append(f"- **Against the image baseline with the same classifier** ({CONTROL}), "
                         f"{metric}: {verdicts}.")
    if diagnosed:
        active = {setting: np.mean([d["active_dims"] for d in ds])
                  for setting, ds in diagnosed.items()}
        collapsed = [setting for setting, n in active.items() if n == 0]
        low, high = min(active, key=active.get), max(active, key=active.get)
        lines.append(f"- **Active latent dimensions** (mean KL(q || p) > {ACTIVE_KL} nats, "
                     f"validation, mean over seeds): from {active[low]:.1f} ({low}) to "
                     f"{active[high]:.1f} ({high}); the posterior collapsed onto the prior (no "
                     f"active dimension) in: {', '.join(collapsed) or 'none'}.")
    return lines


def curve_tables(curve, results, args):
    lines = []
    for key in results["keys"]:
        lines += [f"## The learning curve: test {KEYS[key]}", "",
                  "| training fraction | training reports | " + " | ".join(METHODS) + " | "
                  + " | ".join(f"{way} − image" for way in WAYS) + " |",
                  "|---|---|" + "---|" * (len(METHODS) + len(WAYS))]
        for fraction, result in results["curve"].items():
            record = json.loads((args.out / curve[fraction]["image"][0] / "run.json").read_text())
            methods = result["methods"]
            lines.append(f"| {fraction} | {record['data']['splits']['train']} | "
                         + " | ".join(estimate(m, key) for m in methods) + " | "
                         + " | ".join(difference(methods[METHODS.index(way)], key, args.bootstrap)
                                      for way in WAYS) + " |")
        lines.append("")
    return lines


def control_tables(results, args):
    fractions = sorted({fraction for at in results["controls"].values() for fraction in at})
    lines = ["## The controls: the same method trained on shuffled or blank reports", "",
             "Each method with the real training reports against itself trained on another "
             "training report's text (shuffled: the statistics of reports without their "
             "information) or on an empty text (blank); validation and test keep their reports. "
             "A difference above 0 is what the report's information adds.", ""]
    for key in auroc_keys(results):
        columns = [f"real − control, {KEYS[key]}, fraction {fraction}" for fraction in fractions]
        lines += ["| method | control | " + " | ".join(columns) + " |",
                  "|---|---|" + "---|" * len(fractions)]
        for (method, control), at in results["controls"].items():
            lines.append(f"| {method} | {control} | " + " | ".join(
                difference(at[fraction], key, args.bootstrap) if fraction in at else "–"
                for fraction in fractions) + " |")
        lines.append("")
    return lines


def ablation_tables(results, args):
    if not results["ablations"]:
        return []
    resamples = args.bootstrap
    lines = [f"## Ablations at training fraction {ABLATION_FRACTION}", "",
             "Each setting against image and against vkd with its defaults, on the same seeds and "
             "resamples. The authors' variant turns on all of their switches (`--preset authors`: "
             "q(z|t), f([z; h_x]), KL(p||q), a cyclical beta, 100 samples averaged) and keeps "
             "everything else here (the plan's encoder, beta 0.1).", "",
             "| setting | train.py flags | "
             + " | ".join(f"{KEYS[key]} | − image | − vkd (defaults)" for key in results["keys"])
             + " |", "|---|---|" + "---|---|---|" * len(results["keys"])]
    for setting, (against_image, against_defaults) in results["ablations"].items():
        method, flags = ABLATIONS.get(setting, ("vkd", []))
        flags = " ".join((["--method", method] if method != "vkd" else []) + flags) or "(defaults)"
        row = [cell(setting), f"`{flags}`"]
        for key in results["keys"]:
            row += [estimate(against_image, key) if against_image else "–",
                    difference(against_image, key, resamples) if against_image else "–",
                    difference(against_defaults, key, resamples) if against_defaults else "–"]
        lines.append("| " + " | ".join(row) + " |")
    if results["classifier"]:
        lines += ["", f"Against the image baseline with the same classifier ({cell(CONTROL)}):", "",
                  "| setting | " + " | ".join(f"− that baseline, {KEYS[key]}"
                                             for key in results["keys"]) + " |",
                  "|---|" + "---|" * len(results["keys"])]
        lines += [f"| {cell(setting)} | " + " | ".join(difference(method, key, resamples)
                                                       for key in results["keys"]) + " |"
                  for setting, method in results["classifier"].items()]
    return lines + [""]


def diagnostics_table(diagnosed):
    lines = ["## Diagnostics (validation split, mean ± std over seeds)", "",
             "KL(q || p) in nats, summed over the latent dimensions whatever direction the run "
             f"trained with; active: dimensions whose mean KL is above {ACTIVE_KL}; distance: "
             "mean |mu_q − mu_p|; teacher: macro AUROC of f(mu_q(x, t)), which reads the "
             "report.", "",
             "| setting | teacher macro AUROC | KL(q ‖ p) | active dimensions | distance |",
             "|---|---|---|---|---|"]
    for setting, ds in diagnosed.items():
        lines.append(f"| {cell(setting)} | {seed_mean([d['teacher_auroc'] for d in ds])} | "
                     f"{seed_mean([d['kl'] for d in ds])} | "
                     f"{seed_mean([d['active_dims'] for d in ds])} of {len(ds[0]['kl_per_dim'])} | "
                     f"{seed_mean([d['distance'] for d in ds])} |")
    return lines


def write_document(args, grids, evaluated, diagnosed, header):
    """The document; `header()` gives its first lines, called last, so that the time it states
    includes the comparisons and pictures of the document itself."""
    runs, curve, controls, ablations = grids
    results = {"curve": curve_rows(curve, evaluated, args),
               "controls": control_rows(curve, controls, evaluated, args),
               "ablations": ablation_rows(curve, ablations, evaluated, args),
               "classifier": classifier_rows(ablations, evaluated, args), "diagnosed": diagnosed,
               "keys": summary_keys(evaluated)}
    first = next(iter(results["curve"].values()), None)
    lines = []
    if evaluated:
        run = next(iter(evaluated.values()))
        lines += [labelling_line(run.labels_from, run.unit) + ".", ""]
    if first is not None:
        lines += [f"Test split: {first['num_images']} images; 95% intervals: bootstrap over "
                  f"{first['num_bootstrap_units']} {first['bootstrap_unit']} ({args.bootstrap} "
                  f"resamples), the seed mean of each method on the same resamples for every "
                  f"comparison; p: two-sided, for no difference. The macro mean averages the "
                  f"labels evaluable in the test split; the CheXpert 5 mean the five competition "
                  f"labels (Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion).",
                  ""]
    lines += ["## What it found", "", *findings(results, args.bootstrap), "",
              pictures(args, results), "", *curve_tables(curve, results, args),
              *control_tables(results, args), *ablation_tables(results, args),
              *diagnostics_table(diagnosed)]
    missing = [name for name in runs if name not in evaluated]
    if missing:
        lines += ["", f"Not finished, left out: {', '.join(missing)}."]
    lines = ["# Which way of using the report helps, and when?", "", *header(), "", *lines]
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.doc, "\n".join(lines) + "\n")


def errorbars(ax, x, stats, **style):
    """Points at x with their 95% intervals; stats: [{"mean" or "value", "ci95"}, ...]."""
    value = np.array([s.get("mean", s.get("value")) for s in stats], dtype=float)
    ci = np.array([s["ci95"] if s["ci95"] else [np.nan, np.nan] for s in stats], dtype=float)
    ax.errorbar(x, value, yerr=np.abs(ci.T - value), marker="o", capsize=3, **style)


def curve_picture(plt, results, path):
    """The learning curve of each method (macro AUROC, and the CheXpert 5 mean where the labels
    have the five), then each way of using the report minus the image baseline; a method has one
    colour in every panel."""
    keys = [key for key in results["keys"] if key.endswith("auroc")]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(5.3 * (len(keys) + 1), 4))
    fractions = list(results["curve"])
    for ax, key in zip(axes, keys):
        for i, method in enumerate(METHODS):
            errorbars(ax, fractions, [r["methods"][i][key] for r in results["curve"].values()],
                      label=method, color=f"C{i}")
        ax.set(xscale="log", xlabel="training fraction", ylabel=f"test {KEYS[key]}",
               title=KEYS[key])
        ax.legend(fontsize=8)
    differences = axes[-1]
    for way in WAYS:
        i = METHODS.index(way)
        errorbars(differences, fractions,
                  [r["methods"][i]["difference"]["macro_auroc"] for r in results["curve"].values()],
                  label=way, color=f"C{i}")
    differences.axhline(0, color="gray", lw=1)
    differences.set(xscale="log", xlabel="training fraction",
                    ylabel="way − image, test macro AUROC", title="each way − image (95% interval)")
    differences.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def controls_picture(plt, results, path):
    fig, ax = plt.subplots(figsize=(7, 4))
    for (method, control), at in results["controls"].items():
        errorbars(ax, list(at), [m["difference"]["macro_auroc"] for m in at.values()],
                  label=f"{method} − {method} on {control} reports")
    ax.axhline(0, color="gray", lw=1)
    ax.set(xscale="log", xlabel="training fraction", ylabel="real − control, test macro AUROC",
           title="what the report's information adds (95% interval)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ablations_picture(plt, results, path):
    ablations = results["ablations"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.5 * len(ablations) + 1.5))
    names = [name for name in ablations if ablations[name][0] is not None][::-1]
    for ax, key in zip(axes, ("macro_auroc", "macro_auprc")):
        diffs = [ablations[name][0]["difference"][key] for name in names]
        value = np.array([d["value"] for d in diffs], dtype=float)
        error = np.abs(np.array([d["ci95"] for d in diffs], dtype=float).T - value)
        ax.errorbar(value, range(len(names)), xerr=error, fmt="o", capsize=3)
        ax.axvline(0, color="gray", lw=1)
        ax.set(yticks=range(len(names)), yticklabels=names,
               xlabel=f"setting − image, test {KEYS[key]}")
    defaults = f"vkd, fraction {ABLATION_FRACTION}"
    for setting, ds in results["diagnosed"].items():
        if setting in ablations or setting == defaults:
            kl = np.sort(np.mean([d["kl_per_dim"] for d in ds], axis=0))[::-1]
            axes[2].plot(np.maximum(kl, 1e-4), label=setting.replace(defaults, DEFAULTS))
    axes[2].axhline(ACTIVE_KL, color="gray", lw=1, ls="--")
    axes[2].set(yscale="log", xlabel="latent dimension (sorted)", ylabel="KL(q || p), validation",
                title=f"fraction {ABLATION_FRACTION}")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pictures(args, results):
    """<doc folder>/study/*.png (matplotlib, an optional extra) -> the Markdown that shows them."""
    try:
        plt = pyplot()
    except PlotError as error:
        return f"(No pictures: {error}.)"
    folder = args.doc.parent / "study"
    folder.mkdir(parents=True, exist_ok=True)
    shown = []
    if results["curve"]:
        curve_picture(plt, results, folder / "learning-curve.png")
        shown.append("![the learning curve of the five methods](study/learning-curve.png)")
    if results["controls"]:
        controls_picture(plt, results, folder / "controls.png")
        shown.append("![each method against its controls](study/controls.png)")
    if any(pair[0] is not None for pair in results["ablations"].values()):
        ablations_picture(plt, results, folder / "ablations.png")
        shown.append("![ablations and KL per latent dimension](study/ablations.png)")
    return "\n\n".join(shown)


# --------------------------------------------------------------------------------------------- main

def main(argv=None):
    """The study; a damaged run folder, a full disk or an unwritable folder end in one line."""
    try:
        study(get_args(argv))
    except (data.DataError, OSError) as error:
        sys.exit(f"error: {error}")


def prepare_once(runs, args):
    """Read the collection and build its image cache once (downloading OpenI if needed), so that
    the runs then read it side by side."""
    print("preparing the collection once (the runs then read it side by side)")
    options = vars(train.get_args(next(iter(runs.values())) + ["--data-dir", str(args.data_dir)]))
    collection = data.prepare_from(options)
    data.image_cache(collection, options["image_size"], options["strict"])


def diagnose(grids, evaluated, args):
    """The diagnostics of every finished vkd run -> {setting: [one dict per seed]}."""
    _, curve, controls, ablations = grids
    settings = {f"vkd, fraction {f}": methods["vkd"] for f, methods in curve.items()}
    settings |= {f"vkd on {control} reports, fraction {f}": names
                 for (method, control), fractions in controls.items() if method == "vkd"
                 for f, names in fractions.items()}
    settings |= {setting: names for setting, names in ablations.items()
                 if ABLATIONS[setting][0] == "vkd"}
    diagnosed = {}
    for setting, names in settings.items():
        ds = [diagnostics(args.out / name / "best.pt", args.device) for name in names
              if name in evaluated]
        if ds:
            diagnosed[setting] = ds
    return diagnosed


def header_lines(args, done, start):
    plan = args.plan_of
    epochs_s = sum(json.loads(line)["epoch_s"] for name in done
                   for line in (args.out / name / "log.jsonl").open())
    span_s = ((max((args.out / name / "metrics.json").stat().st_mtime for name in done)
               - min((args.out / name / "splits.json").stat().st_mtime for name in done))
              if done else 0)
    # the command that trains and writes all of it (--report-only only writes)
    command = shlex.join(["python", "study.py", *(a for a in args.argv if a != "--report-only")])
    device = (torch.cuda.get_device_name() if torch.cuda.is_available() else
              f"{cpu_name()}, {os.cpu_count()} cores")
    threads = args.threads or "torch's default"
    minutes = (time.time() - start) / 60
    took = (f"writing this document from them took {minutes:.0f} min (evaluation, diagnostics, "
            f"the comparisons and pictures; --report-only)" if args.report_only else
            f"this command took {minutes:.0f} min (the runs it trained, evaluation, diagnostics, "
            f"the comparisons and pictures)")
    return [f"Written by `{command}` from the runs in `{args.out}`; rerun it to check every "
            "number (finished runs are reused).", "",
            f"- machine: {device}, torch {torch.__version__}, {platform.system()}; {args.jobs} "
            f"run(s) side by side, {threads} thread(s) each",
            f"- time: the {len(done)} runs trained in {span_s / 60:.0f} min, from the first "
            f"start to the last end (their epochs add up to {epochs_s / 60:.0f} min); {took}",
            f"- every run: `python train.py {' '.join(collection_flags(args) + plan['settings'])} "
            f"{' '.join(COMMON)} --method M --train-fraction F --seed S`; seeds "
            f"{', '.join(map(str, plan['seeds']))}; a distill run also gets `--teacher`, the "
            f"text run of its fraction and seed, and a control run (vkd, text) "
            f"`--report-control shuffled` or `blank`"]


def study(args):
    start = time.time()
    grids = grid(args)
    runs = grids[0]
    check_plan(runs, args)
    if not args.report_only:
        prepare_once(runs, args)
        data_dir = ["--data-dir", str(args.data_dir)]
        failed = train_in_parallel({name: flags + data_dir for name, flags in runs.items()},
                                   args.out, args.jobs, args.threads, "study")
        if failed:
            print(f"{len(failed)} run(s) failed: {', '.join(failed)}; the document leaves them out",
                  file=sys.stderr)
    done = [name for name in runs if finished(args.out, name)]
    print(f"evaluating {len(done)} finished runs on the test split, and the vkd runs' "
          f"diagnostics on validation")
    # on the GPU when there is one: densenet121 at 224 px over every run's test split
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    evaluated = {name: evaluate.evaluate_checkpoint(args.out / name / "best.pt", "test",
                                                    args.device)
                 for name in tqdm(done, desc="evaluate", unit="run")}
    diagnosed = diagnose(grids, evaluated, args)
    write_document(args, grids, evaluated, diagnosed, lambda: header_lines(args, done, start))
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
