"""The study: does the report help, and when? One command trains a grid of runs and writes
docs/STUDY.md.

    python study.py                 # the whole grid (66 runs, about 21 minutes on a 2-core CPU),
                                    # then docs/STUDY.md
    python study.py --quick         # a reduced grid in about 2 minutes; the document goes into its
                                    # --out folder
    python study.py --report-only   # write the document from the runs that have finished

Runs that have finished (metrics.json) are skipped and interrupted ones resumed, so a study that was
stopped continues where it was. The document and its pictures are written from the finished runs
alone.

The grid, fixed before any run (nothing is chosen by looking at test numbers):
- the learning curve: image, vkd and text on a seeded 0.1, 0.25, 0.5 and 1.0 of the training reports
  (--train-fraction: the same reports for every method and seed), seeds 0, 1, 2;
- ablations of vkd at ABLATION_FRACTION (ABLATIONS), each against image and against vkd's defaults
  on the same seeds and bootstrap resamples, and the image baseline with the classifier of two of
  them (CONTROL);
- every run the same collection, image size, epochs and batch (FULL["settings"]), with one thread.
Diagnostics of every vkd run, on validation: KL(q || p) per latent dimension and the active
dimensions, the distance of the prior and posterior means, and the macro AUROC of the teacher
f(mu_q(x, t)).
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import evaluate
import train
from vkd.metrics import auroc_summary
from model import gaussian_kl
from vkd.compare import NOT_THE_METHOD, compare_runs, p_value
from vkd.pictures import PlotError, pyplot
from vkd.runtime import cpu_name, write_text

HERE = Path(__file__).resolve().parent
METHODS = ("image", "vkd", "text")
FULL = {"fractions": (0.1, 0.25, 0.5, 1.0), "seeds": (0, 1, 2),
        "settings": ["--data", "demo", "--demo-reports", "1500", "--image-size", "64",
                     "--epochs", "12", "--batch-size", "64"]}
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
    # the 3-epoch ramp of the defaults, twice in 12 epochs
    "cyclical beta": ("vkd", ["--beta-cycle-epochs", "6"]),
    "100 samples averaged": ("vkd", ["--latent-samples", "100", "--average-samples"]),
    "the authors' variant": ("vkd", ["--preset", "authors"]),
    # the control of the two settings whose classifier also reads the image features: the same
    # classifier, no report
    "image with f([z; h_x])": ("image", ["--classifier-input", "z+image"]),
}
CONTROL = "image with f([z; h_x])"
QUICK = {"fractions": (0.25, 1.0), "seeds": (0,),
         "ablations": ("beta 1", "q(z|t)", "the authors' variant", CONTROL),
         "settings": ["--data", "demo", "--demo-reports", "400", "--image-size", "32",
                      "--epochs", "4", "--batch-size", "32"]}
# the ablations' reference: vkd at ABLATION_FRACTION with no flag changed
DEFAULTS = "vkd (defaults)"
# nats: a latent dimension whose mean KL(q || p) is above this is active
ACTIVE_KL = 0.01


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the reduced grid (default: the whole grid)")
    parser.add_argument("--out", default=None,
                        help="run folders (default: runs/study, or runs/study-quick)")
    parser.add_argument("--doc", default=None,
                        help="the document (default: docs/STUDY.md, or <out>/STUDY.md)")
    parser.add_argument("--data-dir", default="data",
                        help="where the demo collection lives (default: data)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="threads per run (default: 1)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples (default: 1000)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing; write the document (default: off)")
    args = parser.parse_args(argv)
    args.out = Path(args.out or ("runs/study-quick" if args.quick else "runs/study"))
    args.doc = Path(args.doc or (args.out / "STUDY.md" if args.quick else "docs/STUDY.md"))
    return args


# --------------------------------------------------------------------------------------------- grid

def slug(name):
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def grid(quick):
    """-> ({run name: train.py flags}, learning curve {fraction: {method: [run names]}}, ablations
    {name: [runs]})."""
    plan = QUICK if quick else FULL
    seeds, common = plan["seeds"], plan["settings"] + COMMON
    runs, curve, ablations = {}, {}, {}
    for fraction in plan["fractions"]:
        curve[fraction] = {}
        for method in METHODS:
            curve[fraction][method] = [f"f{fraction}-{method}-seed{seed}" for seed in seeds]
            for name, seed in zip(curve[fraction][method], seeds):
                runs[name] = common + ["--method", method, "--train-fraction", str(fraction),
                                       "--seed", str(seed)]
    for ablation in plan.get("ablations", ABLATIONS):
        method, flags = ABLATIONS[ablation]
        ablations[ablation] = [f"f{ABLATION_FRACTION}-{method}-{slug(ablation)}-seed{seed}"
                               for seed in seeds]
        for name, seed in zip(ablations[ablation], seeds):
            runs[name] = common + ["--method", method, "--train-fraction", str(ABLATION_FRACTION),
                                   "--seed", str(seed), *flags]
    return runs, curve, ablations


def finished(out, name):
    return (out / name / "metrics.json").exists()


def check_plan(runs, args):
    """Stop when a run folder was trained with other options than the plan says (an older grid,
    another --out): its numbers would be reported under the wrong heading."""
    for name, flags in runs.items():
        record = args.out / name / "run.json"
        if not record.exists():
            continue
        try:
            config = json.loads(record.read_text())["config"]
        except (ValueError, KeyError) as error:
            sys.exit(f"error: {record} cannot be read ({error!r}); delete {record.parent} to train "
                     f"that run again")
        planned = vars(train.get_args(flags + ["--out", str(args.out / name)]))
        wrong = {key: (config.get(key), value) for key, value in planned.items()
                 if key not in NOT_THE_METHOD and value is not None and config.get(key) != value}
        if wrong:
            sys.exit(f"error: {args.out / name} was trained with other options than the study "
                     f"plans (option: (trained, planned)) {wrong}; delete that folder or give "
                     f"another --out")


def train_all(runs, args):
    """Train every unfinished run (resuming an interrupted one), --jobs at a time -> names of the
    failed runs."""
    todo = [name for name in runs if not finished(args.out, name)]
    # longest first
    todo.sort(key=lambda name: -float(runs[name][runs[name].index("--train-fraction") + 1]))
    print(f"{len(runs) - len(todo)} of {len(runs)} runs finished before; training {len(todo)}, "
          f"{args.jobs} side by side with {args.threads} thread(s) each; logs in "
          f"{args.out}/<run>/train.log")
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads),
                        "MKL_NUM_THREADS": str(args.threads)}

    def train_one(name):
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        resume = ["--resume"] if (folder / "last.pt").exists() else []
        command = [sys.executable, str(HERE / "train.py"), *runs[name],
                   "--data-dir", str(args.data_dir), "--out", str(folder), *resume]
        with open(folder / "train.log", "a") as log:
            return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode

    failed = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(train_one, name): name for name in todo}
        try:
            for future in tqdm(as_completed(futures), total=len(todo), desc="study", unit="run"):
                if future.result() != 0:
                    failed.append(futures[future])
                    tqdm.write(f"run {futures[future]} failed: see "
                               f"{args.out / futures[future] / 'train.log'}")
        # Ctrl-C reached the runs too: each saved its last.pt at the exact step
        except KeyboardInterrupt:
            pool.shutdown(cancel_futures=True)
            sys.exit("\nstudy interrupted; the same command continues it (finished runs are kept, "
                     "others resumed)")
    return failed


# ------------------------------------------------------------------------------------------ results

def compare(names, evaluated, args):
    """Paired comparison of the given runs (the image baseline first) -> compare_runs' result, or
    None when a run has not finished."""
    if not all(name in evaluated for name in names):
        return None
    paths = [args.out / name / "best.pt" for name in names]
    result = compare_runs(paths, [evaluated[name] for name in names], args.bootstrap, seed=0)
    groups = [[names[i] for i in method["runs"]] for method in result["methods"]]
    assert all(len(group) == len(names) // len(groups) for group in groups), \
        f"runs grouped as {groups}"
    return result


@torch.no_grad()
def diagnostics(path, batch_size=256):
    """A model with a report encoder on its validation split -> KL(q || p) per latent dimension
    (mean over the images), the number of active dimensions, the mean distance |mu_q - mu_p|, the
    teacher's macro AUROC."""
    model, checkpoint = evaluate.load_checkpoint(path)
    images, tokens, labels, _, _, splits = evaluate.load_collection(checkpoint, path,
                                                                    with_text=True)
    config, idx = checkpoint["config"], splits["val"]
    kl, distance, teacher = [], [], []
    for start in range(0, len(idx), batch_size):
        i = idx[start:start + batch_size]
        x = data.normalise(torch.as_tensor(images[i]), config["pixel_mean"], config["pixel_std"])
        t = torch.as_tensor(tokens[i])
        h_x, mu_p, logvar_p = model.encode_prior(x)
        mu_q, logvar_q = model.encode_posterior(h_x, t)
        # sums over a size-1 axis
        per_dim = [a.unsqueeze(-1) for a in (mu_q, logvar_q, mu_p, logvar_p)]
        kl.append(gaussian_kl(*per_dim))                                           # (B, D)
        distance.append((mu_q - mu_p).norm(dim=-1))                                # (B,)
        teacher.append(model.predict_with_text(x, t))                              # (B, K)
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
    d = method["difference"][key]
    if d["value"] is None or d["ci95"] is None:
        return "n/a"
    return (f"{d['value']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], "
            f"{p_value(d['p'], resamples)}")


def verdict(method, key):
    """'above' / 'below' when the 95% interval of the difference excludes 0, else 'within noise'."""
    ci = method["difference"][key]["ci95"]
    return ("n/a" if ci is None else "above" if ci[0] > 0 else "below" if ci[1] < 0
            else "within noise")


# ----------------------------------------------------------------------------------------- document

def curve_rows(curve, evaluated, args):
    """-> {fraction: compare_runs result of image, vkd and text at that fraction} for the finished
    fractions."""
    rows = {}
    for fraction, methods in curve.items():
        result = compare([name for method in METHODS for name in methods[method]], evaluated, args)
        if result is not None:
            rows[fraction] = result
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


def control_rows(ablations, evaluated, args):
    """-> {setting: its result against CONTROL} for the settings whose classifier reads [z; h_x]: is
    their gain the report's, or the classifier's?"""
    settings = [setting for setting in ("f([z; h_x])", "the authors' variant")
                if setting in ablations]
    groups = ([ablations[setting] for setting in (CONTROL, *settings)]
              if CONTROL in ablations and settings else [])
    result = (compare([name for group in groups for name in group], evaluated, args)
              if groups else None)
    return {} if result is None else dict(zip(settings, result["methods"][1:]))


def findings(curve_results, ablations, controls, diagnosed, resamples):
    """The reading of the results, from the intervals alone: a difference whose 95% interval
    excludes 0 is above or below; any other is within noise."""
    lines = []
    for key, metric in (("macro_auroc", "macro AUROC"), ("macro_auprc", "macro AUPRC")):
        parts = [f"{fraction}: {difference(result['methods'][1], key, resamples)} "
                 f"({verdict(result['methods'][1], key)})"
                 for fraction, result in curve_results.items()]
        lines.append(f"- **vkd − image, {metric}**, by training fraction: " + "; ".join(parts)
                     + ".")
    parts = [f"{fraction}: {difference(result['methods'][2], 'macro_auroc', resamples)}"
             for fraction, result in curve_results.items()]
    lines.append("- **What the teacher could pass on**: text − image (text reads the report also "
                 "at test time), macro AUROC, by training fraction: " + "; ".join(parts) + ".")
    for key, metric in (("macro_auroc", "macro AUROC"), ("macro_auprc", "macro AUPRC")):
        for against, which in (("image", 0), (DEFAULTS, 1)):
            groups = {}
            for setting, pair in ablations.items():
                if pair[which] is not None:
                    groups.setdefault(verdict(pair[which], key), []).append(setting)
            lines.append(f"- **Ablations against {against} at fraction {ABLATION_FRACTION}, "
                         f"{metric}**: "
                         + "; ".join(f"{kind}: {', '.join(settings)}"
                                     for kind, settings in sorted(groups.items()))
                         + ".")
    for key, metric in (("macro_auroc", "macro AUROC"), ("macro_auprc", "macro AUPRC")):
        if controls:
            lines.append(f"- **Against the image baseline with the same classifier** ({CONTROL}), "
                         f"{metric}: "
                         + "; ".join(f"{setting}: {difference(method, key, resamples)} "
                                     f"({verdict(method, key)})"
                                     for setting, method in controls.items())
                         + ".")
    if diagnosed:
        active = {setting: np.mean([d["active_dims"] for d in ds])
                  for setting, ds in diagnosed.items()}
        collapsed = [setting for setting, n in active.items() if n == 0]
        low, high = min(active, key=active.get), max(active, key=active.get)
        lines.append(f"- **Active latent dimensions** (mean KL(q || p) > {ACTIVE_KL} nats, "
                     f"validation, mean over seeds): from {active[low]:.1f} ({low}) to "
                     f"{active[high]:.1f} ({high}); the posterior collapsed onto the prior (no "
                     f"active dimension) in: {', '.join(collapsed) or 'none'}.")
    intervals = 3 * len(curve_results) \
        + sum(2 * sum(part is not None for part in pair) for pair in ablations.values()) \
        + 2 * len(controls)
    lines.append(f"- **How sure**: {intervals} intervals "
                 "are read here, each at 95% and none corrected for the others: one or two of them "
                 "excluding 0 by chance is expected. The intervals resample the test reports; the "
                 "± after a mean is its std over seeds (training noise).")
    return lines


def write_document(args, runs, curve, ablations, evaluated, diagnosed, header):
    resamples = args.bootstrap
    curve_results = curve_rows(curve, evaluated, args)
    ablation_results = ablation_rows(curve, ablations, evaluated, args)
    controls = control_rows(ablations, evaluated, args)
    first = next(iter(curve_results.values()), None)
    lines = ["# Does the report help, and when?", "", *header, ""]
    if first is not None:
        lines += [f"Test split: {first['num_images']} images; 95% intervals: bootstrap over "
                  f"{first['num_bootstrap_units']} {first['bootstrap_unit']} ({resamples} "
                  f"resamples), the seed mean of each method on the same resamples for every "
                  f"comparison; p: two-sided, for no difference.", ""]
    lines += ["## What it found", "",
              *findings(curve_results, ablation_results, controls, diagnosed, resamples), "",
              pictures(args, curve_results, ablation_results, diagnosed), ""]
    for key, metric in (("macro_auroc", "macro AUROC"), ("macro_auprc", "macro AUPRC")):
        lines += [f"## The learning curve: test {metric}", "",
                  "| training fraction | training reports | image | vkd | text | vkd − image |",
                  "|---|---|---|---|---|---|"]
        for fraction, result in curve_results.items():
            reports = json.loads((args.out / curve[fraction]["image"][0] / "run.json").read_text())
            image, vkd, text = result["methods"]
            lines.append(f"| {fraction} | {reports['data']['splits']['train']} | "
                         f"{estimate(image, key)} | {estimate(vkd, key)} | {estimate(text, key)} | "
                         f"{difference(vkd, key, resamples)} |")
        lines.append("")
    lines += [f"## Ablations at training fraction {ABLATION_FRACTION}", "",
              "Each setting against image and against vkd with its defaults, on the same seeds and "
              "resamples. The authors' variant turns on all of their switches (`--preset authors`: "
              "q(z|t), f([z; h_x]), KL(p||q), a cyclical beta, 100 samples averaged) and keeps "
              "everything else here (the compact CNN, beta 0.1).", "",
              "| setting | train.py flags | macro AUROC | − image | − vkd (defaults) | macro AUPRC "
              "| − image | − vkd (defaults) |",
              "|---|---|---|---|---|---|---|---|"]
    for setting, (against_image, against_defaults) in ablation_results.items():
        method, flags = ABLATIONS.get(setting, ("vkd", []))
        flags = " ".join((["--method", method] if method != "vkd" else []) + flags) or "(defaults)"
        row = [cell(setting), f"`{flags}`"]
        for key in ("macro_auroc", "macro_auprc"):
            row += [estimate(against_image, key) if against_image else "–",
                    difference(against_image, key, resamples) if against_image else "–",
                    difference(against_defaults, key, resamples) if against_defaults else "–"]
        lines.append("| " + " | ".join(row) + " |")
    if controls:
        lines += ["", f"Against the image baseline with the same classifier ({cell(CONTROL)}):", "",
                  "| setting | − that baseline, macro AUROC | − that baseline, macro AUPRC |",
                  "|---|---|---|"]
        lines += [f"| {cell(setting)} | {difference(method, 'macro_auroc', resamples)} | "
                  f"{difference(method, 'macro_auprc', resamples)} |"
                  for setting, method in controls.items()]
    lines += ["", "## Diagnostics (validation split, mean ± std over seeds)", "",
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
    missing = [name for name in runs if name not in evaluated]
    if missing:
        lines += ["", f"Not finished, left out: {', '.join(missing)}."]
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.doc, "\n".join(lines) + "\n")


def pictures(args, curve_results, ablation_results, diagnosed):
    """docs/study/*.png (matplotlib, an optional extra) -> the Markdown that shows them."""
    try:
        plt = pyplot()
    except PlotError as error:
        return f"(No pictures: {error}.)"
    folder = args.doc.parent / "study"
    folder.mkdir(parents=True, exist_ok=True)
    keys = (("macro_auroc", "macro AUROC"), ("macro_auprc", "macro AUPRC"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    fractions = list(curve_results)
    for ax, (key, metric) in zip(axes, keys):
        for i, method in enumerate(METHODS):
            stats = [result["methods"][i][key] for result in curve_results.values()]
            mean = np.array([s["mean"] for s in stats], dtype=float)
            error = np.abs(np.array([s["ci95"] for s in stats], dtype=float).T - mean)
            ax.errorbar(fractions, mean, yerr=error, marker="o", capsize=3, label=method)
        ax.set(xscale="log", xlabel="training fraction", ylabel=f"test {metric}", title=metric)
        ax.legend()
    for key, metric in keys:
        diffs = [result["methods"][1]["difference"][key] for result in curve_results.values()]
        value = np.array([d["value"] for d in diffs], dtype=float)
        error = np.abs(np.array([d["ci95"] for d in diffs], dtype=float).T - value)
        axes[2].errorbar(fractions, value, yerr=error, marker="o", capsize=3, label=metric)
    axes[2].axhline(0, color="gray", lw=1)
    axes[2].set(xscale="log", xlabel="training fraction", ylabel="vkd − image",
                title="vkd − image (95% interval)")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(folder / "learning-curve.png", dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.5 * len(ablation_results) + 1.5))
    names = [name for name in ablation_results if ablation_results[name][0] is not None][::-1]
    for ax, (key, metric) in zip(axes, keys):
        diffs = [ablation_results[name][0]["difference"][key] for name in names]
        value = np.array([d["value"] for d in diffs], dtype=float)
        error = np.abs(np.array([d["ci95"] for d in diffs], dtype=float).T - value)
        ax.errorbar(value, range(len(names)), xerr=error, fmt="o", capsize=3)
        ax.axvline(0, color="gray", lw=1)
        ax.set(yticks=range(len(names)), yticklabels=names,
               xlabel=f"setting − image, test {metric}")
    for setting, ds in diagnosed.items():
        if setting in ablation_results or setting == f"vkd, fraction {ABLATION_FRACTION}":
            kl = np.sort(np.mean([d["kl_per_dim"] for d in ds], axis=0))[::-1]
            axes[2].plot(np.maximum(kl, 1e-4),
                         label=setting.replace(f"vkd, fraction {ABLATION_FRACTION}", DEFAULTS))
    axes[2].axhline(ACTIVE_KL, color="gray", lw=1, ls="--")
    axes[2].set(yscale="log", xlabel="latent dimension (sorted)", ylabel="KL(q || p), validation",
                title=f"fraction {ABLATION_FRACTION}")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "ablations.png", dpi=100)
    plt.close(fig)
    return ("![learning curve](study/learning-curve.png)\n\n"
            "![ablations and KL per latent dimension](study/ablations.png)")


# --------------------------------------------------------------------------------------------- main

def main(argv=None):
    """The study; a damaged run folder, a full disk or an unwritable folder end in one line."""
    try:
        study(get_args(argv))
    except (data.DataError, OSError) as error:
        sys.exit(f"error: {error}")


def study(args):
    start = time.time()
    runs, curve, ablations = grid(args.quick)
    plan = QUICK if args.quick else FULL
    check_plan(runs, args)
    if not args.report_only:
        settings = dict(zip(plan["settings"][::2], plan["settings"][1::2]))
        print("preparing the collection once (the runs then read it side by side)")
        collection = data.prepare("demo", args.data_dir,
                                  demo_reports=int(settings["--demo-reports"]))
        data.image_cache(collection, int(settings["--image-size"]))
        failed = train_all(runs, args)
        if failed:
            print(f"{len(failed)} run(s) failed: {', '.join(failed)}; the document leaves them out",
                  file=sys.stderr)
    done = [name for name in runs if finished(args.out, name)]
    print(f"evaluating {len(done)} finished runs on the test split, and the vkd runs' "
          f"diagnostics on validation")
    evaluated, diagnosed = {}, {}
    for name in tqdm(done, desc="evaluate", unit="run"):
        evaluated[name] = evaluate.evaluate_checkpoint(args.out / name / "best.pt")
    with_report = {setting: names for setting, names in ablations.items()
                   if ABLATIONS[setting][0] == "vkd"}
    for setting, names in {**{f"vkd, fraction {f}": m["vkd"] for f, m in curve.items()},
                           **with_report}.items():
        ds = [diagnostics(args.out / name / "best.pt") for name in names if name in evaluated]
        if ds:
            diagnosed[setting] = ds
    epochs_s = sum(json.loads(line)["epoch_s"] for name in done
                   for line in (args.out / name / "log.jsonl").open())
    span_s = ((max((args.out / name / "metrics.json").stat().st_mtime for name in done)
               - min((args.out / name / "splits.json").stat().st_mtime for name in done))
              if done else 0)
    header = [f"Written by `python study.py{' --quick' if args.quick else ''}` from the runs in "
              f"`{args.out}`; rerun it to check every number (finished runs are reused).", "",
              f"- machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{platform.system()}; {args.jobs} runs side by side, {args.threads} thread(s) each",
              f"- time: the {len(done)} runs trained in {span_s / 60:.0f} min, from the first "
              f"start to the last end (their epochs add up to {epochs_s / 60:.0f} min); this "
              f"command took {(time.time() - start) / 60:.0f} min (evaluation, diagnostics, this "
              f"document, and the runs it trained)",
              f"- every run: `python train.py {' '.join(plan['settings'] + COMMON)} --method M "
              f"--train-fraction F --seed S`; seeds {', '.join(map(str, plan['seeds']))}"]
    write_document(args, runs, curve, ablations, evaluated, diagnosed, header)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
