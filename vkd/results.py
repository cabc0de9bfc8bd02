"""The results: one command trains the runs behind docs/RESULTS.md, evaluates them and writes the
document, every number from those runs.

    python -m vkd.results --openi-dir DIR   # every part (DIR holds NLMCXR_reports.tgz), then
                                            # docs/RESULTS.md (62 runs: hours on a 2-core CPU)
    python -m vkd.results --part demo       # train one part; the document is always written from
                                            # every finished run
    python -m vkd.results --report-only     # train nothing: the document from the finished runs
    python -m vkd.results --quick           # a tiny version (a minute); the document goes into its
                                            # --out folder

Run it from the repository root. Runs that have finished (metrics.json) are skipped and
interrupted ones resumed with train.py --resume, as study.py does; evaluations are saved under
<out>/evaluations/ and reused while their checkpoints are unchanged. Each run is a `python
train.py` process and each evaluation a `python evaluate.py ... --json` process: the document shows
those commands, and the numbers are what they print.

The parts, fixed before any run (nothing is chosen by looking at test numbers):
- demo: image, vkd and text on the full demo with its defaults, seeds 0, 1, 2 (one train.py
  process a run), their comparison, calibration and pictures;
- openi: the teacher (--method text) on the real OpenI reports with grey placeholder images
  (write_placeholders), split seeds 0 and 1, training seeds 0, 1, 2, the bag-of-words reference,
  and the epoch time with and without dropout;
- tiny: the tiny demo preset with the demo's report encoder and with OpenI's encoder settings
  (TINY_ROWS), seeds 0, 1, 2.
"""
import argparse
import hashlib
import itertools
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import data
from config.collections import COLLECTIONS
from config.presets import PRESETS
from vkd import options
from vkd.compare import (ADDED_OPTIONS, KINDS, NOT_THE_METHOD, cell, difference_cell, p_value,
                         runs_table, signed)
from vkd.download import OPENI_REPORTS_SHA256, file_sha256
from vkd.openi import iter_report_files, parse_report
from vkd.pictures import PlotError, pyplot
from vkd.recipe import METHODS_OF_ALL, train_in_parallel
from vkd.runtime import cpu_name, write_text
from vkd.summary import labelling_line

REPO = Path(__file__).resolve().parent.parent
METHODS = ("image", "vkd", "text")
PARTS = ("demo", "openi", "tiny")
# OpenI's report encoder (config/collections.py), added to the tiny preset a few settings at a time
OPENI_ENCODER = ["--text-dim", "128", "--text-layers", "1", "--word-dropout", "0.2"]
OPENI_SETTINGS = OPENI_ENCODER + ["--sentence-shuffle", "--dropout", "0", "--oversample"]
TINY_ROWS = {                  # folder -> (the encoder, train.py flags added to the tiny preset)
    "demo-encoder": ("the demo's encoder", []),
    "openi-encoder": ("OpenI's encoder", OPENI_ENCODER),
    "openi-encoder-shuffled": ("OpenI's encoder, sentences shuffled",
                               OPENI_ENCODER + ["--sentence-shuffle"]),
    "openi-settings": ("OpenI's encoder, sentences shuffled, no dropout, oversampling",
                       OPENI_SETTINGS),
    "openi-sentences": ("all of OpenI's encoder settings",
                        OPENI_SETTINGS + ["--sentence-attention"]),
}
# the quick version: a small demo, small images, one epoch
SMALL = ["--demo-reports", "160", "--image-size", "32", "--epochs", "1", "--batch-size", "16",
         "--allow-missing-labels", "--bootstrap", "100"]
FULL = {"bootstrap": 1000, "demo": {"settings": [], "seeds": (0, 1, 2)},
        "openi": {"settings": [], "split_seeds": (0, 1), "seeds": (0, 1, 2), "timing_epochs": 3},
        "tiny": {"settings": ["--preset", "tiny"], "seeds": (0, 1, 2), "rows": tuple(TINY_ROWS)}}
QUICK = {"bootstrap": 100, "demo": {"settings": SMALL, "seeds": (0,)},
         "openi": {"settings": ["--epochs", "1", "--bootstrap", "100"], "split_seeds": (0, 1),
                   "seeds": (0, 1), "timing_epochs": 1},
         "tiny": {"settings": SMALL, "seeds": (0,), "rows": ("demo-encoder", "openi-sentences")}}
OPENI_RUN = ["--data", "openi", "--method", "text", "--image-size", "32"]
EVALUATE_BOOTSTRAP = 1000     # evaluate.py's --bootstrap default
WEAK = 0.85                    # a label below this test AUROC is named
CAM_LABEL, CAM_IMAGES = "Cardiomegaly", 3
# the pictures the document shows; evaluate.py --plots of one run also writes its ROC and PR
# curves, which the comparison's pictures already show, so they are removed
COMPARE_PICTURES = ("roc.png", "pr.png")
RUN_PICTURES = ("reliability.png", "training.png", "latents.png", "cam-cardiomegaly.png")
SUMMARIES = (("macro_auroc", "macro AUROC"), ("chexpert5_auroc", "CheXpert 5 mean AUROC"),
             ("micro_auroc", "micro AUROC"), ("macro_auprc", "macro AUPRC"),
             ("micro_auprc", "micro AUPRC"))
# the code an evaluation's saved result depends on: a change to any of these evaluates again
EVALUATION_CODE = ("*.py", "vkd/*.py", "config/*.py")
NOT_EVALUATION_CODE = ("study.py", "vkd/results.py")           # they only read the results


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a tiny version of every part (default: the full runs)")
    parser.add_argument("--out", default=None,
                        help="run folders (default: runs/results, or runs/results-quick)")
    parser.add_argument("--doc", default=None,
                        help="the document (default: docs/RESULTS.md, or <out>/RESULTS.md)")
    parser.add_argument("--data-dir", default="data",
                        help="where the demo collection lives (default: data)")
    parser.add_argument("--openi-dir", default=None,
                        help="a folder holding NLMCXR_reports.tgz; without it the OpenI part is "
                             "left out unless its runs exist (default: none)")
    parser.add_argument("--part", default="all", choices=[*PARTS, "all"],
                        help="the part to train; the document holds every finished part "
                             "(default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="threads per run (default: 1)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing; write the document (default: off)")
    args = parser.parse_args(argv)
    args.out = Path(args.out or ("runs/results-quick" if args.quick else "runs/results"))
    args.doc = Path(args.doc or (args.out / "RESULTS.md" if args.quick else "docs/RESULTS.md"))
    return args


# --------------------------------------------------------------------------------------------- grid

class RunSet(NamedTuple):
    """Runs that differ in a few fields: a folder template ('demo/demo-{method}-seed{seed}'),
    train.py flags with the same fields, and the values of each field."""
    folder: str
    flags: list
    fields: dict

    def combinations(self):
        """[{field: value}] in the order the shell's loops (and brace expansion) give them."""
        names = sorted(self.fields, key=lambda name: self.folder.index("{" + name + "}"))
        return [dict(zip(names, values))
                for values in itertools.product(*(self.fields[n] for n in names))]

    def runs(self):
        """{run folder under --out: train.py flags}."""
        return {self.folder.format(**c): [flag.format(**c) for flag in self.flags]
                for c in self.combinations()}

    def names(self, **fixed):
        """Run folders with some fields fixed, in order."""
        return [self.folder.format(**c) for c in self.combinations()
                if all(str(c[k]) == str(v) for k, v in fixed.items())]


def demo_data_flags(args):
    return [] if args.data_dir == "data" else ["--data-dir", str(args.data_dir)]


def grid(args, plan):
    """-> {part: {name: RunSet}}."""
    demo, openi, tiny = plan["demo"], plan["openi"], plan["tiny"]
    seeds = {"method": METHODS, "seed": demo["seeds"]}
    sets = {"demo": {"demo": RunSet("demo/demo-{method}-seed{seed}",
                                    [*demo["settings"], *demo_data_flags(args), "--method",
                                     "{method}", "--seed", "{seed}"], seeds)}}
    base = [*OPENI_RUN[:2], "--data-dir", str(openi_data_dir(args)), *OPENI_RUN[2:]]
    sets["openi"] = {
        "teacher": RunSet("openi/split{split}-seed{seed}",
                          [*base, *openi["settings"], "--split-seed", "{split}",
                           "--seed", "{seed}"],
                          {"split": openi["split_seeds"], "seed": openi["seeds"]}),
        "timing": RunSet("openi/timing-dropout{dropout}",
                         [*base, "--epochs", str(openi["timing_epochs"]), "--dropout", "{dropout}"],
                         {"dropout": ("0", "0.1")})}
    sets["tiny"] = {row: RunSet(f"tiny/{row}/{{method}}-seed{{seed}}",
                                [*tiny["settings"], *demo_data_flags(args), *TINY_ROWS[row][1],
                                 "--method", "{method}", "--seed", "{seed}"],
                                {"method": METHODS, "seed": tiny["seeds"]})
                    for row in tiny["rows"]}
    for row, run_set in sets["tiny"].items():       # the same runs as the demo part's (--quick)
        if run_set._replace(folder="") == sets["demo"]["demo"]._replace(folder=""):
            sets["tiny"][row] = sets["demo"]["demo"]
    return sets


def all_runs(sets, parts=PARTS):
    return {name: flags for part in parts for run_set in sets[part].values()
            for name, flags in run_set.runs().items()}


def finished(out, name):
    return (out / name / "metrics.json").exists()


def planned_config(flags):
    """The options train.py resolves from `flags`, as train.get_args does (this module does not
    import train): the collection's defaults, then the preset's, then the flags."""
    parser = options.build_parser(PRESETS)
    args = parser.parse_args(flags)
    parser.set_defaults(**COLLECTIONS[args.data] | PRESETS.get(args.preset, {}))
    return vars(options.for_method(parser.parse_args(flags)))


def check_plan(runs, out):
    """Stop when a run folder was trained with other options than the plan says (older defaults,
    another --out): its numbers would be reported under the wrong heading."""
    for name, flags in runs.items():
        record = out / name / "run.json"
        if not record.exists():
            continue
        try:
            # an option added after the run was saved: the value it was trained with
            config = ADDED_OPTIONS | json.loads(record.read_text())["config"]
        except (ValueError, KeyError) as error:
            sys.exit(f"error: {record} cannot be read ({error!r}); delete {record.parent} to train "
                     f"that run again")
        wrong = {key: (config.get(key), value) for key, value in planned_config(flags).items()
                 if key not in NOT_THE_METHOD and value is not None and key in config
                 and config[key] != value}
        if wrong:
            sys.exit(f"error: {out / name} was trained with other options than planned "
                     f"(option: (trained, planned)) {wrong}; delete that folder or give another "
                     f"--out")


# ----------------------------------------------------------------------------------- OpenI's data

def write_placeholders(root):
    """A folder holding NLMCXR_reports.tgz -> root/NLMCXR_png/, one grey 8 x 8 PNG for every image
    id the reports name, so that a model reads the report alone. Refuses a folder that exists:
    real images are never overwritten. Written into NLMCXR_png.part/ first, then renamed."""
    root = Path(root)
    folder, partial = root / "NLMCXR_png", root / "NLMCXR_png.part"
    if folder.exists():
        raise FileExistsError(f"{folder} exists; placeholders are written only where no image is")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    grey = Image.fromarray(np.full((8, 8), 128, np.uint8))
    for name, xml in iter_report_files(root / "NLMCXR_reports.tgz"):
        for image_id in parse_report(xml, name).image_ids:
            grey.save(partial / f"{image_id}.png")
    partial.rename(folder)
    return folder


def openi_data_dir(args):
    """Where the OpenI runs read their data: <out>/openi-data, a copy of NLMCXR_reports.tgz and
    the placeholders (never under version control: runs/ is ignored)."""
    return args.out / "openi-data"


def openi_ready(args):
    """Set up <out>/openi-data from --openi-dir when given -> whether the OpenI data are there."""
    folder = openi_data_dir(args)
    archive = folder / "NLMCXR_reports.tgz"
    if args.openi_dir is not None and not archive.exists():
        source = Path(args.openi_dir) / "NLMCXR_reports.tgz"
        if not source.exists():
            sys.exit(f"error: --openi-dir {args.openi_dir} holds no NLMCXR_reports.tgz")
        if file_sha256(source) != OPENI_REPORTS_SHA256:
            sys.exit(f"error: {source} is not the official NLMCXR_reports.tgz (sha256 differs)")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, archive)
    if archive.exists() and not (folder / "NLMCXR_png").exists():
        write_placeholders(folder)
    return archive.exists()


# ----------------------------------------------------------------------------------------- training

def prepare_collections(runs):
    """Draw or read each collection and build its image cache once, before runs read them side by
    side."""
    seen = set()
    for flags in runs.values():
        config = planned_config(flags)
        key = tuple(config[name] for name in ("data", "data_dir", "demo_reports", "image_size"))
        if key not in seen:
            seen.add(key)
            print(f"preparing {config['data']} in {config['data_dir']} at {config['image_size']} "
                  f"px")
            data.image_cache(data.prepare_from(config), config["image_size"])


def thread_env(threads):
    return os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


# --------------------------------------------------------------------------------------- evaluation

class Evaluation(NamedTuple):
    """One evaluate.py command: argv (without --json), the command as the document shows it, the
    runs it reads, and the folder of its pictures with the ones kept."""
    key: str
    argv: list
    shown: str
    runs: list
    pictures: tuple = (None, ())


def paths(out, run_set, **fixed):
    """The best.pt of some runs of a RunSet -> (the shell's brace form, the paths in the order the
    shell expands it, the run names)."""
    fields = {name: ((fixed[name],) if name in fixed else values)
              for name, values in run_set.fields.items()}
    braced = {name: (str(v[0]) if len(v) == 1 else "{" + ",".join(map(str, v)) + "}")
              for name, v in fields.items()}
    shown = f"{out}/{run_set.folder.format(**braced)}/best.pt"
    names = RunSet(run_set.folder, [], fields).names()
    return shown, [str(out / name / "best.pt") for name in names], names


def evaluation(key, *items, pictures=(None, ())):
    """An Evaluation from strings and paths() results (brace form, paths, run names)."""
    argv, shown, runs = [], ["python evaluate.py"], []
    for item in items:
        if isinstance(item, tuple):
            shown.append(item[0])
            argv += item[1]
            runs += item[2]
        else:
            shown.append(str(item))
            argv.append(str(item))
    return Evaluation(key, argv, " ".join(shown), runs, pictures)


def plots_available():
    try:
        pyplot()
        return True
    except PlotError:
        return False


def demo_evaluations(args, sets):
    demo, out = sets["demo"]["demo"], args.out
    compare_dir, vkd_dir = args.doc.parent / "demo-seed0", args.doc.parent / "demo-vkd-seed0"
    plots = plots_available()
    compare_plots = ["--plots", "--out", compare_dir] if plots else []
    vkd_plots = (["--plots", "--cam", CAM_LABEL, "--cam-images", CAM_IMAGES, "--out", vkd_dir]
                 if plots else [])
    return [evaluation("demo-compare", "--compare", paths(out, demo), *compare_plots,
                       pictures=(compare_dir, COMPARE_PICTURES) if plots else (None, ())),
            evaluation("demo-vkd-seed0", "--ckpt", paths(out, demo, method="vkd", seed=0),
                       "--temperature", *vkd_plots,
                       pictures=(vkd_dir, RUN_PICTURES) if plots else (None, ())),
            evaluation("demo-image-seed0", "--ckpt", paths(out, demo, method="image", seed=0),
                       "--temperature")]


def openi_evaluations(args, sets, plan):
    teacher, out, jobs = sets["openi"]["teacher"], args.out, []
    seed = plan["openi"]["seeds"][0]
    for split in plan["openi"]["split_seeds"]:
        jobs.append(evaluation(f"openi-split{split}-bow", "--ckpt",
                               paths(out, teacher, split=split, seed=seed), "--bow"))
        jobs.append(evaluation(f"openi-split{split}-seeds", "--compare",
                               paths(out, teacher, split=split)))
    return jobs


def row_key(sets, row):
    """The evaluation that compares the methods of a row: the demo part's where its runs are the
    same (--quick)."""
    return "demo-compare" if sets["tiny"][row] is sets["demo"]["demo"] else f"tiny-{row}"


def tiny_evaluations(args, sets, plan):
    rows, out = sets["tiny"], args.out
    jobs = [evaluation(row_key(sets, row), "--compare", paths(out, rows[row])) for row in rows
            if row_key(sets, row) != "demo-compare"]
    for method in ("vkd", "text"):
        jobs.append(evaluation(f"tiny-{method}", "--compare",
                               *(paths(out, rows[row], method=method) for row in rows)))
    return jobs


def evaluations(args, sets, plan):
    """Every evaluation whose runs have all finished -> {key: Evaluation}."""
    jobs = (demo_evaluations(args, sets) + openi_evaluations(args, sets, plan)
            + tiny_evaluations(args, sets, plan))
    if plan["bootstrap"] != EVALUATE_BOOTSTRAP:
        extra = ["--bootstrap", str(plan["bootstrap"])]
        jobs = [job._replace(argv=job.argv + extra, shown=" ".join([job.shown, *extra]))
                for job in jobs]
    return {job.key: job for job in jobs if all(finished(args.out, name) for name in job.runs)}


def cached(job, folder):
    """The saved result of `job`, when its command is the same, it is newer than the checkpoints it
    read and its pictures exist; else None."""
    path = folder / f"{job.key}.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    newest = max(Path(p).stat().st_mtime for p in job.argv if p.endswith(".pt"))
    pictures_dir, kept = job.pictures
    if (saved["command"] != job.argv or saved.get("code") != evaluation_code()
            or path.stat().st_mtime < newest
            or any(not (Path(pictures_dir) / name).exists() for name in kept)):
        return None
    return saved["result"]


def evaluation_code():
    """The sha256 of the code an evaluation depends on (EVALUATION_CODE)."""
    files = sorted(path for pattern in EVALUATION_CODE for path in REPO.glob(pattern)
                   if str(path.relative_to(REPO)) not in NOT_EVALUATION_CODE)
    return hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()


def run_evaluation(job, folder, threads):
    """evaluate.py <argv> --json -> its result (saved in <folder>/<key>.json)."""
    command = [sys.executable, str(REPO / "evaluate.py"), *job.argv, "--json"]
    with open(folder / f"{job.key}.log", "w") as log:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True,
                              env=thread_env(threads))
    if done.returncode != 0:
        sys.exit(f"error: {job.shown} failed; see {folder / (job.key + '.log')}")
    start = 0 if done.stdout.startswith("{") else done.stdout.index("\n{") + 1
    result = json.loads(done.stdout[start:])             # the JSON, after anything printed before
    pictures_dir, kept = job.pictures
    for picture in result.get("pictures", []):
        if Path(picture).name not in kept:
            Path(picture).unlink(missing_ok=True)
    saved = {"command": job.argv, "result": result, "code": evaluation_code()}
    write_text(folder / f"{job.key}.json", json.dumps(saved))       # whole, or the one before
    return result


def evaluate_all(jobs, args):
    """{key: result} of every evaluation, the saved ones reused, the others --jobs at a time."""
    folder = args.out / "evaluations"
    folder.mkdir(parents=True, exist_ok=True)
    results = {key: cached(job, folder) for key, job in jobs.items()}
    todo = [key for key, result in results.items() if result is None]
    print(f"evaluating: {len(jobs) - len(todo)} of {len(jobs)} evaluations saved before; running "
          f"{len(todo)}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_evaluation, jobs[key], folder, args.threads): key
                   for key in todo}
        for future in tqdm(as_completed(futures), total=len(todo), desc="evaluate", unit="cmd"):
            results[futures[future]] = future.result()
    return results


# ---------------------------------------------------------------------------------------- the runs

def read_json(path):
    return json.loads(Path(path).read_text())


def how_trained(args, names):
    """'at most 2 runs at a time, 1 thread each', from the runs' start and end times (splits.json,
    metrics.json) and the threads in their run.json."""
    spans = [span(args, n) for n in names]
    at_once = max((sum(start <= t < end for start, end in spans) for t, _ in spans), default=0)
    return f"at most {plural(at_once, 'run')} at a time, {thread_words(args, names)} each"


def thread_words(args, names):
    threads = run_threads(args, names)
    return f"{threads} thread" + ("" if threads == "1" else "s")


def run_threads(args, names):
    """The thread count the runs recorded in run.json ('1', or '1 or 2')."""
    return " or ".join(map(str, sorted({read_json(args.out / n / "run.json")["environment"]
                                        ["threads"] for n in names})))


def environment(args, names):
    """'AMD EPYC, torch 2.14.1': the CPU and torch the runs recorded (this machine's when none)."""
    records = [read_json(args.out / n / "run.json")["environment"] for n in names]
    cpus = sorted({r["cpu"] for r in records}) or [cpu_name()]
    versions = sorted({r["torch"] for r in records}) or [torch.__version__]
    return f"{' / '.join(cpus)}, torch {' / '.join(versions)}"


def epoch_log(out, name):
    return [json.loads(line) for line in (out / name / "log.jsonl").open()]


def shell(words):
    """Words as a shell command line; $name stays a variable."""
    return " ".join(w if w.startswith("$") else shlex.quote(w) for w in map(str, words))


def loop(run_set, out):
    """The runs of a RunSet as shell lines: one train.py command, in a loop over every field with
    more than one value."""
    names = sorted(run_set.fields, key=lambda name: run_set.folder.index("{" + name + "}"))
    loops = [name for name in names if len(run_set.fields[name]) > 1]
    values = {name: f"${name}" if name in loops else str(run_set.fields[name][0])
              for name in names}
    command = (f"python train.py {shell(f.format(**values) for f in run_set.flags)} "
               f"--out {out}/{run_set.folder.format(**values)}").replace("train.py  ", "train.py ")
    if not loops:
        return [command]
    head = " ".join(f"for {name} in {' '.join(map(str, run_set.fields[name]))}; do"
                    for name in loops)
    return [head, "    " + command, " ".join(["done;"] * (len(loops) - 1) + ["done"])]


def code(lines, threads):
    return ["```bash", f"export OMP_NUM_THREADS={threads}", *lines, "```"]


# ---------------------------------------------------------------------------------------- numbers

def stats_cell(stats):
    """'0.812 ± 0.010 [0.785, 0.841]': a method's seed mean, std over seeds, interval of the
    mean."""
    return cell(stats["mean"], stats["ci95"], stats["std"])


def difference(method, key, resamples):
    return difference_cell(method["difference"][key], resamples)


def interval_only(method, key):
    d = method["difference"][key]
    return "n/a" if d["ci95"] is None else (f"{signed(d['value'])} [{signed(d['ci95'][0])}, "
                                            f"{signed(d['ci95'][1])}]")


def verdict(method, key):
    """'above' / 'below' when the 95% interval of the difference excludes 0, else 'level'."""
    ci = method["difference"][key]["ci95"]
    return "n/a" if ci is None else "above" if ci[0] > 0 else "below" if ci[1] < 0 else "level"


def label_table(result, columns):
    """Per-label rows, then macro, the CheXpert 5 mean and micro.
    columns: [(header, (label -> cell, kind -> cell))]."""
    first = result["runs"][0]["per_label"]
    lines = ["| label | positives | " + " | ".join(header for header, _ in columns) + " |",
             "|---|---:|" + "---|" * len(columns)]
    for label in result["label_names"]:
        lines.append(f"| {label} | {first[label]['positives']} | "
                     + " | ".join(cells[0](label) for _, cells in columns) + " |")
    for kind, name in KINDS.items():
        lines.append(f"| **{name}** | | " + " | ".join(cells[1](kind) for _, cells in columns)
                     + " |")
    return lines


def method_cells(method, metric):
    return (lambda label: stats_cell(method["per_label"][label][metric]),
            lambda kind: stats_cell(method[f"{kind}_{metric}"]))


def run_cells(run, metric):
    return (lambda label: cell(run["per_label"][label][metric],
                               run["per_label"][label][f"{metric}_ci95"]),
            lambda kind: cell(run[f"{kind}_{metric}"], run[f"{kind}_{metric}_ci95"]))


def differences_table(result):
    resamples, methods = result["num_resamples"], result["methods"]
    lines = ["| difference | " + " | ".join(name for _, name in SUMMARIES) + " |",
             "|---|" + "---|" * len(SUMMARIES)]
    for method in methods[1:]:
        lines.append(f"| {method['name']} - {methods[0]['name']} | "
                     + " | ".join(difference(method, key, resamples) for key, _ in SUMMARIES)
                     + " |")
    return lines


def weak_labels(metrics):
    """'none (lowest: X 0.858, 7 positive test images)' or 'X 0.802, Y 0.844': labels below
    WEAK."""
    aurocs = {label: m["auroc"] for label, m in metrics["per_label"].items()
              if m["auroc"] is not None}
    weak = [f"{label} {value:.3f}" for label, value in aurocs.items() if value < WEAK]
    if weak:
        return ", ".join(weak)
    lowest = min(aurocs, key=aurocs.get)
    return (f"none (lowest: {lowest} {aurocs[lowest]:.3f}, "
            f"{metrics['per_label'][lowest]['positives']} positive test images)")


def three(value):
    return "n/a" if value is None else f"{value:.3f}"


# ------------------------------------------------------------------------------------ the demo

def not_finished(sets, part, out, command):
    names = list(all_runs(sets, (part,)))
    done = sum(finished(out, name) for name in names)
    return [f"Not finished yet ({done} of {len(names)} runs): `{command}` trains the rest.", ""]


def demo_section(args, sets, jobs, results):
    lines = ["## Results on the demo", ""]
    if not all(key in results for key in ("demo-compare", "demo-vkd-seed0", "demo-image-seed0")):
        return lines + not_finished(sets, "demo", args.out, "python -m vkd.results --part demo")
    demo, result = sets["demo"]["demo"], results["demo-compare"]
    config = read_json(args.out / demo.names(method="vkd")[0] / "run.json")["config"]
    seeds = ",".join(map(str, demo.fields["seed"]))
    recipe = shell(["python", "train.py", *demo.flags[:-4], "--method", "all", "--seeds", seeds,
                    "--out", f"{args.out}/demo"])
    options_used = "the demo's default options" if not demo.flags[:-4] else "these options"
    others = [method for method in METHODS_OF_ALL if method not in METHODS]
    lines += [f"Every number and picture in this section comes from these commands (split seed "
              f"{config['split_seed']}, {options_used}). The {len(demo.runs())} runs are the "
              f"{', '.join(METHODS[:-1])} and {METHODS[-1]} runs that `{recipe}` trains one "
              f"after another"
              + (f" (it also trains {' and '.join(others)})" if others else "") + ".", "",
              *code(loop(demo, args.out) + [jobs[key].shown for key in
                                            ("demo-compare", "demo-vkd-seed0",
                                             "demo-image-seed0")],
                   run_threads(args, list(demo.runs()))), ""]
    lines += demo_tables(result, seeds.replace(",", ", "))
    lines += demo_details(args, jobs, results, config)
    return lines + ["**What this shows.** " + " ".join(demo_findings(result, config)), ""]


def demo_tables(result, seeds):
    methods, resamples = result["methods"], result["num_resamples"]
    seed0 = [result["runs"][method["runs"][0]] for method in methods]
    lines = [f"Test AUROC of each run's best-validation checkpoint "
             f"({result['num_bootstrap_units']} test {result['bootstrap_unit']}, "
             f"{result['num_images']} images): mean ± std over seeds {seeds}, and in brackets "
             f"the 95% bootstrap interval of the seed mean ({resamples:,} resamples of "
             f"{result['bootstrap_unit']}; the interval covers the "
             f"sampling of the test set, the ± the spread between seeds). Positives are test "
             f"images.", "", labelling_line(result["labels_from"], result["bootstrap_unit"]) + ".",
             ""]
    lines += label_table(result, [(m["name"], method_cells(m, "auroc")) for m in methods])
    lines += ["", "AUPRC, the same way:", ""]
    lines += label_table(result, [(m["name"], method_cells(m, "auprc")) for m in methods])
    lines += ["", f"Paired bootstrap of the difference of the seed means to "
              f"`{methods[0]['name']}`, all methods on the same resamples: difference [95% "
              f"interval], two-sided p (with {resamples:,} resamples, no resample on the other "
              f"side of zero means {p_value(0, resamples)}):", "", *differences_table(result), "",
              "Each run (macro AUROC and AUPRC with their own intervals, and the epoch chosen on "
              "validation):", "", *runs_table(result), "",
              "Seed 0 alone, each run with its own interval (the runs of the pictures below), "
              "test AUROC and then AUPRC:", ""]
    lines += label_table(result, [(r["method"], run_cells(r, "auroc")) for r in seed0])
    lines += [""] + label_table(result, [(r["method"], run_cells(r, "auprc")) for r in seed0])
    return lines + [""]


def calibration_text(ev):
    c = ev["calibration"]
    return (f"ECE averaged over labels {three(c['ece_mean'])}, {three(c['ece_mean_scaled'])} "
            f"after temperature scaling (T = {c['temperature']:.3f}, fitted on validation); pooled "
            f"over all (image, label) pairs {three(c['ece'])} and {three(c['ece_scaled'])}")


def operating_table(ev, validation):
    points = ev["operating_points"]["per_label"]
    lines = ["| label | test positives | validation positives (reports) | AUROC | threshold | "
             "sensitivity | specificity | PPV | ECE |", "|---|---:|---:|---|---|---|---|---|---|"]
    for label, m in ev["per_label"].items():
        point = points[label] or {}
        lines.append(f"| {label} | {m['positives']} | {validation[label]} | {three(m['auroc'])} | "
                     + " | ".join(three(point.get(key)) for key in
                                  ("threshold", "sensitivity", "specificity", "ppv"))
                     + f" | {three(ev['calibration']['ece_per_label'][label])} |")
    return lines


def demo_details(args, jobs, results, config):
    vkd0, image0 = results["demo-vkd-seed0"], results["demo-image-seed0"]
    run = read_json(Path(jobs["demo-vkd-seed0"].argv[1]).parent / "run.json")
    validation = run["data"]["labels_per_split"]["val"]
    eces = vkd0["calibration"]["ece_per_label"]
    worst = sorted((label for label in eces if eces[label] is not None), key=eces.get)[::-1][:3]
    lines = [f"`vkd`, seed 0, in more detail (`{jobs['demo-vkd-seed0'].shown}`), and its image "
             f"baseline (`{jobs['demo-image-seed0'].shown}`):", "",
             f"- **Calibration.** `vkd`: {calibration_text(vkd0)}. `image`: "
             f"{calibration_text(image0)}. The worst-calibrated labels of `vkd`: "
             + ", ".join(f"{label} (ECE {eces[label]:.3f})" for label in worst) + ".",
             f"- **Operating points** (the table below): a threshold per label chosen on "
             f"validation by {vkd0['operating_points']['rule']}, measured on test. "
             + operating_text(vkd0, validation),
             f"- **Uncertainty.** {uncertainty_text(vkd0)}", "",
             *operating_table(vkd0, validation), ""]
    if not jobs["demo-compare"].pictures[0]:
        return lines + ["(No pictures: matplotlib is not installed.)", ""]
    return lines + [
        "ROC and precision-recall curves of seed 0 of each method (the legend gives each curve's "
        "AUROC or AUPRC):", "", "![ROC curves per label](demo-seed0/roc.png)",
        "![precision-recall curves per label](demo-seed0/pr.png)", "",
        "| reliability (all labels, test) | training curves (`log.jsonl`) |", "|---|---|",
        "| ![reliability diagram](demo-vkd-seed0/reliability.png) | "
        "![training curves](demo-vkd-seed0/training.png) |", "",
        "![latent means, prior vs posterior, PCA](demo-vkd-seed0/latents.png)", "",
        f"Grad-CAM for {CAM_LABEL} on the {CAM_IMAGES} test images with the highest predicted "
        f"probability (top: image; bottom: overlay):", "",
        f"![Grad-CAM, {CAM_LABEL}](demo-vkd-seed0/cam-cardiomegaly.png)", ""]


def operating_text(ev, validation):
    """What the operating points say, from their numbers: labels whose threshold rests on few
    validation reports, and good AUROCs with a low PPV."""
    points, parts = ev["operating_points"]["per_label"], []
    few = [label for label, n in validation.items() if n < 10]
    if few:
        parts.append(f"The thresholds of {', '.join(few)} rest on fewer than 10 positive "
                     f"validation reports.")
    low = [f"{label} (AUROC {m['auroc']:.3f}, PPV {points[label]['ppv']:.3f}, {m['positives']} "
           f"of {ev['num_images']} test images positive)" for label, m in ev["per_label"].items()
           if m["auroc"] is not None and m["auroc"] >= 0.8 and points[label]
           and points[label]["ppv"] is not None and points[label]["ppv"] < 0.3]
    if low:
        parts.append(f"At the prevalence of the test split even a good AUROC can give a low PPV: "
                     f"{', '.join(low)}.")
    return " ".join(parts)


def uncertainty_text(ev):
    u = ev["uncertainty"]
    curve = {float(f): value for f, value in u["macro_auroc_after_rejecting"].items()}
    fractions = sorted(curve)
    rises = all(curve[b] > curve[a] for a, b in zip(fractions, fractions[1:]))
    shown = " / ".join(f"{100 * f:.0f}" for f in fractions)
    return (f"Per-image std of the probability over {u['samples']} prior samples: median "
            f"{u['median']:.3f}. Macro AUROC of the {u['samples']}-sample mean after rejecting the "
            f"most uncertain {shown}% of test images: "
            + " / ".join(three(curve[f]) for f in fractions) + ". "
            + ("It rises with every fraction rejected: the spread of p(z|x) points at some of the "
               "errors." if rises else "It does not rise with every fraction rejected: the "
               "spread of p(z|x) does not point at the errors here."))


def demo_findings(result, config):
    """The reading of the demo's comparison, each sentence chosen by the numbers it states."""
    image, vkd, text = (next(m for m in result["methods"] if m["name"] == name)
                        for name in METHODS)
    resamples, mean = result["num_resamples"], (lambda m: m["macro_auroc"]["mean"])
    carry = {"above": "The reports carry more than the images show the models",
             "level": "Within the intervals the reports carry no more than the images show the "
                      "models", "below": "The teacher that reads the reports is below the image "
                                         "baseline"}.get(verdict(text, "macro_auroc"), "n/a")
    where = {"above": "above the image baseline", "below": "below the image baseline",
             "level": "level with the image baseline (the interval of the difference holds 0)"}
    encoder = "the compact CNN" if config["backbone"] == "cnn" else config["backbone"]
    sentences = [
        f"{carry}: `text` {mean(text):.3f} against {mean(image):.3f} macro AUROC for `image` "
        f"({difference(text, 'macro_auroc', resamples)}).",
        f"In this setting ({plural(config['epochs'], 'epoch')} on a CPU, {encoder} at "
        f"{config['image_size']} px, the generated demo of {config['demo_reports']:,} reports, "
        f"beta = {config['beta']}) VKD's image-only path is "
        f"{where.get(verdict(vkd, 'macro_auroc'), 'n/a')} in macro AUROC "
        f"({difference(vkd, 'macro_auroc', resamples)}); vkd - image by the other summaries: "
        + ", ".join(f"{name} {verdict(vkd, key)}" for key, name in SUMMARIES[1:]) + "."]
    losses = {label: vkd["per_label"][label]["auroc"]["mean"]
              - image["per_label"][label]["auroc"]["mean"]
              for label in result["label_names"]
              if vkd["per_label"][label]["auroc"]["mean"] is not None
              and image["per_label"][label]["auroc"]["mean"] is not None}
    worst = [label for label in sorted(losses, key=losses.get) if losses[label] < 0][:2]
    sentences.append(
        "The largest per-label losses: " + " and ".join(
            f"{label} ({vkd['per_label'][label]['auroc']['mean']:.3f} against "
            f"{image['per_label'][label]['auroc']['mean']:.3f})" for label in worst) + "."
        if worst else "Its seed mean is at or above the image baseline's on every label.")
    sentences += seed_spread(result, image, vkd)
    sentences.append("Nothing here is a verdict on VKD with pretrained encoders, real reports and "
                     "longer training; it says what the image-only path gained from the reports "
                     "on this demo, with these settings.")
    return sentences + auprc_skew(result["methods"])


def seed_spread(result, image, vkd):
    if len(image["runs"]) < 2:
        return []
    stds = [image["macro_auroc"]["std"], vkd["macro_auroc"]["std"]]
    gap = vkd["macro_auroc"]["mean"] - image["macro_auroc"]["mean"]
    runs = result["runs"]
    per_seed = [(runs[j]["seed"], runs[j]["macro_auroc"] - runs[i]["macro_auroc"])
                for i, j in zip(image["runs"], vkd["runs"])]
    signs = {np.sign(d) for _, d in per_seed}
    return [f"The spread between seeds (std {min(stds):.3f} to {max(stds):.3f} in macro AUROC for "
            f"image and vkd) is "
            + ("of the order of" if max(stds) >= abs(gap) / 2 else "small against")
            + f" the difference between the two ({signed(gap)}); seed by seed, vkd - image is "
            + ", ".join(f"{signed(d)} (seed {seed})" for seed, d in per_seed)
            + (", the same sign every time." if len(signs) == 1 else
               ", not the same sign every time.")]


def auprc_skew(methods):
    """A note where a macro AUPRC interval sits mostly above its estimate."""
    skewed = [m for m in methods if m["macro_auprc"]["ci95"] and m["macro_auprc"]["mean"]
              is not None and m["macro_auprc"]["ci95"][1] - m["macro_auprc"]["mean"]
              > 2 * (m["macro_auprc"]["mean"] - m["macro_auprc"]["ci95"][0])]
    if not skewed:
        return []
    return ["Note also that the percentile intervals of macro AUPRC sit mostly above the estimate "
            "(" + "; ".join(f"{m['name']} {stats_cell(m['macro_auprc'])}" for m in skewed)
            + "): the bootstrap of average precision over a few positives is skewed (see "
              "[EVALUATION.md](EVALUATION.md))."]


# ---------------------------------------------------------------------------------------- OpenI

def openi_section(args, sets, plan, jobs, results, available):
    lines = ["## The teacher on the real OpenI reports", ""]
    teacher, seed = sets["openi"]["teacher"], plan["openi"]["seeds"][0]
    splits = plan["openi"]["split_seeds"]
    if not available and not any(finished(args.out, name) for name in teacher.names()):
        return lines + [f"Not measured here: `python -m vkd.results` was given no `--openi-dir` "
                        f"(a folder holding the official NLMCXR_reports.tgz) and found no "
                        f"finished OpenI runs in `{args.out}/openi`.", ""]
    keys = [f"openi-split{k}-{kind}" for k in splits for kind in ("bow", "seeds")]
    if not all(key in results for key in keys):
        return lines + not_finished(sets, "openi", args.out, "python -m vkd.results --part openi "
                                                             "--openi-dir DIR")
    main_runs = {k: teacher.names(split=k, seed=seed)[0] for k in splits}
    summary = read_json(args.out / main_runs[splits[0]] / "run.json")["data"]
    lines += [f"VKD can only pass on what its posterior reads in the report. On the real OpenI "
              f"reports ({summary['reports_used']:,} of the {summary['reports']:,} reports used; "
              f"the official `NLMCXR_reports.tgz`), test macro AUROC of the `text` method with "
              f"the OpenI defaults (training seed {seed}), against the bag-of-words reference "
              f"over the same tokens (`vkd/bow.py`: token presence times IDF, one logistic "
              f"regression per label with balanced positive weights, fitted on the training "
              f"split only):", "",
              labelling_line(results[keys[0]]["labels_from"],
                             results[keys[0]]["bootstrap_unit"]) + ".", "",
              f"| split seed | `text` (the transformer teacher) | its CheXpert 5 mean AUROC | "
              f"best validation epoch (its validation macro AUROC) | labels below {WEAK} | "
              f"bag-of-words reference |",
              "|---|---|---|---|---|---|"]
    for k in splits:
        ev, name = results[f"openi-split{k}-bow"], main_runs[k]
        best = read_json(args.out / name / "metrics.json")["best_epoch"]
        log = epoch_log(args.out, name)
        bow = ev["bag_of_words"]
        lines.append(f"| {k} | {cell(ev['macro_auroc'], ev['macro_auroc_ci95'])} | "
                     f"{cell(ev['chexpert5_auroc'], ev['chexpert5_auroc_ci95'])} | {best} of "
                     f"{len(log)} ({log[best - 1]['val_macro_auroc']:.3f}) | {weak_labels(ev)} | "
                     f"{cell(bow['macro_auroc'], bow['macro_auroc_ci95'])} |")
    lines += ["", *openi_commands(args, sets, jobs, splits),
              *openi_reading(args, sets, results, main_runs), ""]
    lines += run_to_run(args, teacher, results, splits)
    lines += rare_labels(args, teacher, results, splits, seed)
    return lines + timing(args, sets) + openi_defaults()


def openi_commands(args, sets, jobs, splits):
    folder = openi_data_dir(args)
    shown = [jobs[f"openi-split{k}-{kind}"].shown for kind in ("bow", "seeds") for k in splits]
    return [f"The OpenI PNGs are not used: every image is the same grey 8 x 8 placeholder, "
            f"written by `vkd.results.write_placeholders` into `{folder}/NLMCXR_png/` (`{folder}` "
            f"holds a copy of `NLMCXR_reports.tgz` from `--openi-dir`; the first command below). "
            f"The `text` model's posterior q(z | x, t) reads the image as well as the report; a "
            f"grey image tells it nothing, so these numbers are the report's alone. (With the "
            f"real image archive the posterior also reads the X-rays; that was not measured "
            f"here.) `--image-size 32` only makes the placeholder images cheap. The counts of "
            f"reports and positives per label and split come from each run's `run.json` (as "
            f"`python data.py --data openi --data-dir {folder}` prints them).", "",
            *code([f"python -c \"from vkd.results import write_placeholders; "
                   f"write_placeholders('{folder}')\"", *loop(sets["openi"]["teacher"], args.out),
                   *shown], run_threads(args, sets["openi"]["teacher"].names())), ""]


def openi_reading(args, sets, results, main_runs):
    """Time, and what the teacher's numbers say against the bag of words."""
    logs = {k: epoch_log(args.out, name) for k, name in main_runs.items()}
    walls = {k: read_json(args.out / name / "metrics.json")["wall_s"]
             for k, name in main_runs.items()}
    evs = {k: results[f"openi-split{k}-bow"] for k in main_runs}
    weak = {k: [label for label, m in ev["per_label"].items()
                if m["auroc"] is not None and m["auroc"] < WEAK] for k, ev in evs.items()}
    parts = []
    for k, ev in evs.items():
        bow, (low, high) = ev["bag_of_words"]["macro_auroc"], ev["macro_auroc_ci95"]
        parts.append(f"{signed(ev['macro_auroc'] - bow)} on split seed {k} (the bag of words "
                     f"{'inside' if low <= bow <= high else 'outside'} the teacher's interval)")
    return ["Training took " + " and ".join(f"{sum(r['epoch_s'] for r in log):.0f} s"
                                             for log in logs.values())
            + f" on split seeds {' and '.join(map(str, logs))} (the epochs with their validation: "
            f"the sum of `epoch_s` in `log.jsonl`; train.py's whole run, with the test "
            f"evaluation: " + " and ".join(f"{w:.0f} s" for w in walls.values())
            + f"), {company(args, sets, list(main_runs.values()))}, "
            f"{thread_words(args, list(main_runs.values()))} each. With these "
            f"commands the teacher reaches {min(ev['macro_auroc'] for ev in evs.values()):.3f} "
            f"or more, "
            + ("with no label below " + str(WEAK) if not any(weak.values()) else
               "with labels below " + str(WEAK) + ": " + "; ".join(
                   f"{', '.join(w)} on split seed {k}" for k, w in weak.items() if w))
            + "; the teacher minus the bag of words is " + "; ".join(parts) + "."]


def run_to_run(args, teacher, results, splits):
    lines = [f"**Run to run.** The training seed (`--seed`: initialisation, batch order, the "
             f"random draws of training; the split stays), with the defaults (the commands "
             f"above); each row gives the test macro AUROC and the labels below {WEAK}, and the "
             f"last row of a split seed the mean ± std over training seeds with the interval of "
             f"the seed mean:", "", f"| split seed | `--seed` | test macro AUROC | labels below "
             f"{WEAK} |", "|---|---|---|---|"]
    reading = []
    for k in splits:
        result = results[f"openi-split{k}-seeds"]
        for run in result["runs"]:
            lines.append(f"| {k} | {run['seed']} | "
                         f"{cell(run['macro_auroc'], run['macro_auroc_ci95'])} | "
                         f"{weak_labels(run).split(' (')[0]} |")
        lines.append(f"| {k} | all | {stats_cell(result['methods'][0]['macro_auroc'])} | |")
        values = [run["macro_auroc"] for run in result["runs"]]
        counts = {}
        for run in result["runs"]:
            for label, m in run["per_label"].items():
                if m["auroc"] is not None and m["auroc"] < WEAK:
                    counts[label] = counts.get(label, 0) + 1
        reading.append(f"on split seed {k} the training seed moves the test macro AUROC by up to "
                       f"{max(values) - min(values):.3f} ({min(values):.3f} to {max(values):.3f})"
                       + (f"; below {WEAK}: " + ", ".join(
                           f"{label} with {n} of {len(values)} seeds" for label, n in
                           sorted(counts.items(), key=lambda item: -item[1]))
                          if counts else f", and no label is below {WEAK} with any seed"))
    return lines + ["", "Here " + "; ".join(reading) + ".", ""]


def rare_labels(args, teacher, results, splits, seed):
    """The labels below WEAK in any run, with their positive reports per split."""
    rows, unseen = [], []
    for k in splits:
        weak = sorted({label for run in results[f"openi-split{k}-seeds"]["runs"]
                       for label, m in run["per_label"].items()
                       if m["auroc"] is not None and m["auroc"] < WEAK})
        counts = read_json(args.out / teacher.names(split=k, seed=seed)[0]
                           / "run.json")["data"]["labels_per_split"]
        for label in weak:
            train, val, test = (counts[split][label] for split in ("train", "val", "test"))
            rows.append(f"| {k} | {label} | {train} | {val} | {test} |")
            unseen += [f"{label} on split seed {k}"] if val == 0 else []
    if not rows:
        return [f"No label is below {WEAK} in any of these runs.", ""]
    return [f"**The labels below {WEAK}** in any of these runs, with their positive reports per "
            f"split (from `run.json`):", "",
            "| split seed | label | training | validation | test |", "|---|---|---:|---:|---:|",
            *rows, "",
            (f"With no positive validation report ({', '.join(unseen)}), the epoch chosen on "
             f"validation cannot see how the teacher does on it. " if unseen else "")
            + "A teacher that misses a finding cannot teach the image path to see it.", ""]


def span(args, name):
    return ((args.out / name / "splits.json").stat().st_mtime,
            (args.out / name / "metrics.json").stat().st_mtime)


def company(args, sets, names):
    """Whether another run of the grid trained while each of `names` did, as words."""
    others = [name for name in all_runs(sets) if finished(args.out, name)]
    overlapped = [any(span(args, o)[0] < span(args, n)[1] and span(args, n)[0] < span(args, o)[1]
                      for o in others if o != n) for n in names]
    return ("each with another run training beside it" if all(overlapped) else
            "each alone" if not any(overlapped) else "some with another run beside them")


def timing(args, sets):
    run_set = sets["openi"]["timing"]
    names = run_set.names()
    if not all(finished(args.out, name) for name in names):
        return []
    medians = {dropout: float(np.median([r["epoch_s"] for r in epoch_log(args.out, name)]))
               for dropout, name in zip(run_set.fields["dropout"], names)}
    ratio = medians["0"] / medians["0.1"]
    return [f"**Dropout and time.** The first training command with `--epochs "
            f"{read_json(args.out / names[0] / 'run.json')['config']['epochs']}` and "
            f"`--dropout 0` (the default) or `--dropout 0.1`, {company(args, sets, names)}, "
            f"{thread_words(args, names)} each, took a median of "
            f"{medians['0']:.1f} s and {medians['0.1']:.1f} s an epoch: dropout 0 takes "
            f"{ratio:.2f} times the time of dropout 0.1"
            + (". On a CPU, drawing the dropout masks (one random number per element of the "
               "attention weights and of the feed-forward activations) is slow."
               if ratio < 0.9 else ", not much less."), "",
            *code(loop(run_set, args.out), run_threads(args, names)), ""]


def flag_text(defaults):
    """{option: value} -> '--text-dim 128 --sentence-shuffle ...' (train.py's flags)."""
    words = []
    for key, value in defaults.items():
        flag = "--" + key.replace("_", "-")
        words += ([flag] if value is True else [f"--no-{flag[2:]}"] if value is False
                  else [flag, str(value)])
    return " ".join(words)


def openi_defaults():
    return [f"**The OpenI defaults** (`config/collections.py`), which every command above uses: "
            f"`{flag_text(COLLECTIONS['openi'])}`. Word dropout replaces each report token by "
            f"`[UNK]` with that probability in training; `--sentence-shuffle` puts each report's "
            f"sentences in a random order in training (the findings of a report do not depend on "
            f"the order of its sentences); `--sentence-attention` (`sentence_mask` in "
            f"`vkd/text_tuning.py`) lets each report token attend only to the tokens of its own "
            f"sentence (a sentence ends at "
            f"\".\"), and the pooling then reads the whole report; `--oversample` "
            f"(`vkd/batching.py`, `draw_weights`) draws each epoch's training images with "
            f"replacement, an image in proportion to median(n) / n_k for its rarest positive "
            f"label k (at least 1), where n_k counts the positive training images of label k; "
            f"`--group-by-length` forms batches of reports of similar length, each cut to its "
            f"longest. These settings were picked on the validation splits with a quicker, "
            f"report-level script outside this project, so that choice cannot be reproduced "
            f"from this document; the runs here measure the result, not the choice.", ""]


# ------------------------------------------------------------------------------ the tiny preset

def same_numbers(a, b):
    """Whether two runs of a comparison have the same numbers (the same predictions, in effect)."""
    return {k: v for k, v in a.items() if k != "checkpoint"} == \
        {k: v for k, v in b.items() if k != "checkpoint"}


def tiny_section(args, sets, jobs, results):
    lines = ["## Does OpenI's encoder change VKD on the demo?", ""]
    rows = list(sets["tiny"])
    keys = {row: row_key(sets, row) for row in rows}
    if not all(keys[row] in results for row in rows) or "tiny-vkd" not in results:
        return lines + not_finished(sets, "tiny", args.out, "python -m vkd.results --part tiny")
    first = sets["tiny"][rows[0]]
    demo = planned_config(first.runs()[first.names(method="vkd")[0]])
    lines += [f"The demo's numbers above use the demo's report encoder ({demo['text_layers']} "
              f"layers, {demo['text_dim']} wide, word dropout {demo['word_dropout']:g}). Here VKD "
              f"is trained with OpenI's encoder settings instead, added a few at a time, on a "
              f"smaller demo ({demo['demo_reports']} reports, {demo['image_size']} px, "
              f"{plural(demo['epochs'], 'epoch')}; seeds "
              f"{', '.join(map(str, first.fields['seed']))}; test macro AUROC, mean ± std over "
              f"seeds with the interval of the seed mean, paired differences):", "",
              labelling_line(results[keys[rows[0]]]["labels_from"],
                             results[keys[rows[0]]]["bootstrap_unit"]) + ".", "",
              "| encoder | flags added | image | vkd | text | vkd - image | vkd - vkd with "
              f"{TINY_ROWS[rows[0]][0]} |", "|---|---|---|---|---|---|---|"]
    previous = None
    for i, row in enumerate(rows):
        result = results[keys[row]]
        image, vkd, text = result["methods"]
        image_run = result["runs"][image["runs"][0]]
        same = previous is not None and same_numbers(image_run, previous)
        previous = image_run
        cross = results["tiny-vkd"]["methods"][i]
        lines.append(f"| {TINY_ROWS[row][0]} | `{' '.join(TINY_ROWS[row][1]) or '(none)'}` | "
                     f"{stats_cell(image['macro_auroc'])}"
                     + (" (the same numbers as the row above)" if same else "")
                     + f" | {stats_cell(vkd['macro_auroc'])} | {stats_cell(text['macro_auroc'])} "
                     f"| {interval_only(vkd, 'macro_auroc')} | "
                     + (interval_only(cross, "macro_auroc") if i else "–") + " |")
    commands = [line for row in rows for line in loop(sets["tiny"][row], args.out)]
    commands += [jobs[keys[row]].shown for row in rows if keys[row] != "demo-compare"]
    commands += [jobs[f"tiny-{method}"].shown for method in ("vkd", "text")]
    threads = run_threads(args, [n for row in rows for n in sets["tiny"][row].names()])
    return lines + ["", *code(commands, threads), "",
                    " ".join(tiny_findings(keys, results)), ""]


def tiny_findings(keys, results):
    """What the rows say, each sentence chosen by its intervals; keys: {row: the evaluation that
    compares its methods}."""
    rows = list(keys)
    first = TINY_ROWS[rows[0]][0]
    word = {"above": "above", "below": "below", "level": "level with"}
    teachers = results["tiny-text"]["methods"]
    sentences = []
    for i, row in enumerate(rows[1:], start=1):
        vkd = results[keys[row]]["methods"][1]
        cross = results["tiny-vkd"]["methods"][i]
        sentences.append(
            f"With {TINY_ROWS[row][0]}, VKD scored "
            f"{interval_only(cross, 'macro_auroc')} against {first} "
            f"({word.get(verdict(cross, 'macro_auroc'), 'n/a')} it) and "
            f"{interval_only(vkd, 'macro_auroc')} against its image baseline "
            f"({word.get(verdict(vkd, 'macro_auroc'), 'n/a')} it); the teacher "
            f"{teachers[i]['macro_auroc']['mean']:.3f} against "
            f"{teachers[0]['macro_auroc']['mean']:.3f} "
            f"({interval_only(teachers[i], 'macro_auroc')}).")
    above = [TINY_ROWS[row][0] for row in rows
             if verdict(results[keys[row]]["methods"][1], "macro_auroc") == "above"]
    best = max(range(len(rows)), key=lambda i: teachers[i]["macro_auroc"]["mean"])
    best_vkd = results[keys[rows[best]]]["methods"][1]
    sentences.append(
        ("With none of these encoders is VKD's image-only path above its image baseline (no "
         "interval of vkd - image above 0)." if not above else
         f"VKD's image-only path is above its image baseline with: {', '.join(above)}.")
        + f" The strongest teacher here ({TINY_ROWS[rows[best]][0]}, text "
        f"{teachers[best]['macro_auroc']['mean']:.3f}) leaves VKD "
        f"{word.get(verdict(best_vkd, 'macro_auroc'), 'n/a')} its image baseline "
        f"({interval_only(best_vkd, 'macro_auroc')}).")
    return sentences


# ----------------------------------------------------------------------------------------- document

def plural(n, word):
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def duration(seconds):
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.0f} min"


def header(args, done, available, resamples):
    epochs_s = sum(r["epoch_s"] for name in done for r in epoch_log(args.out, name))
    span_s = ((max((args.out / name / "metrics.json").stat().st_mtime for name in done)
               - min((args.out / name / "splits.json").stat().st_mtime for name in done))
              if done else 0)
    command = "python -m vkd.results" + (" --quick" if args.quick else "") \
        + (" --openi-dir DIR" if available else "")
    return ["# Results", "",
            f"Written by `{command}` from the runs in `{args.out}`; rerun it to check every "
            f"number (finished runs and evaluations are reused, interrupted runs resumed). Each "
            f"section shows the commands behind its numbers: the script runs the same commands "
            f"(evaluate.py with `--json`) and writes what they print.", "",
            f"- machine: {environment(args, done)}, {os.cpu_count()} cores, "
            f"{platform.system()}; {how_trained(args, done)} (`OMP_NUM_THREADS`); another CPU, "
            f"torch build or thread count gives slightly different weights (see "
            f"[RUNS.md](RUNS.md))",
            f"- time: the {len(done)} runs trained in {duration(span_s)}, from the first start "
            f"to the last end (their epochs add up to {duration(epochs_s)})",
            f"- intervals: 95% percentile bootstrap over the test reports, "
            f"{plural(resamples, 'resample')}; the ± after a mean is its std over training seeds; "
            f"no interval is corrected for the others", ""]


def write_document(args, sets, plan, jobs, results, available):
    done = [name for name in all_runs(sets) if finished(args.out, name)]
    lines = [*header(args, done, available, plan["bootstrap"]),
             *demo_section(args, sets, jobs, results),
             *openi_section(args, sets, plan, jobs, results, available),
             *tiny_section(args, sets, jobs, results)]
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.doc, "\n".join(lines).rstrip("\n") + "\n")


# --------------------------------------------------------------------------------------------- main

def main(argv=None):
    args = get_args(argv)
    plan = QUICK if args.quick else FULL
    sets = grid(args, plan)
    check_plan(all_runs(sets), args.out)
    available = openi_ready(args)
    if not args.report_only:
        parts = [part for part in (PARTS if args.part == "all" else (args.part,))
                 if part != "openi" or available]
        if "openi" not in parts and args.part in ("openi", "all"):
            print("the OpenI part is left out: give --openi-dir (a folder holding "
                  "NLMCXR_reports.tgz)")
        runs = all_runs(sets, parts)
        prepare_collections({name: flags for name, flags in runs.items()
                             if not finished(args.out, name)})
        failed = train_in_parallel(runs, args.out, args.jobs, args.threads, "results")
        if failed:
            print(f"{len(failed)} run(s) failed: {', '.join(failed)}; the document leaves out "
                  f"what needs them", file=sys.stderr)
    jobs = evaluations(args, sets, plan)
    results = evaluate_all(jobs, args)
    write_document(args, sets, plan, jobs, results, available)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
