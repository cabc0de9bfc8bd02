"""The recipe behind `python train.py --method all` and `--seeds 0,1,2`: several methods and seeds
on one split, then the paired comparison of their test predictions (evaluate.compare_checkpoints);
and train_in_parallel, the many runs of study.py and vkd/results.py. A student can skip it.
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm import tqdm

import evaluate
from vkd.compare import format_comparison
from vkd.options import collection_name, for_method, run_name
from vkd.reports import DataError
from vkd.runtime import write_text

REPO = Path(__file__).resolve().parent.parent

# image first (every difference reads "method - image"), and text before distill, its student
METHODS_OF_ALL = ("image", "vkd", "text", "distill", "contrastive")


def run_recipe(args, train):
    """--method all and/or --seeds: train each method for each seed on the same split
    (--split-seed), each in <out>/<data>[-<preset>]-<method>-seed<seed>, then compare them on the
    test split with evaluate.py (the image baseline first, so that every difference reads
    'method - image'). Writes <out>/<data>[-<preset>]-comparison.json.

    `train` is train.train, passed in so that this file does not import train.py (train.py calls
    this)."""
    if args.resume:
        raise DataError("--resume continues one run: pass its --out and --method instead of "
                        "--method all/--seeds")
    methods = METHODS_OF_ALL if args.method == "all" else (args.method,)
    seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else [args.seed]
    root = Path(args.out or "runs")
    checkpoints, other_process = [], int(os.environ.get("RANK", "0")) > 0
    for seed in seeds:
        for method in methods:
            out = root / run_name(args, method, seed)
            if not other_process:
                print(f"\n=== {method}, seed {seed} -> {out}")
            # distill's teacher: this seed's text run, trained just before it
            teacher = str(root / run_name(args, "text", seed) / "best.pt")
            changes = {"teacher": teacher} if method == "distill" and args.method == "all" else {}
            metrics = train(for_method(args, method=method, seed=seed, out=str(out), **changes))
            if metrics is None and not other_process:
                return None                               # stopped early (--stop-after)
            checkpoints.append(out / "best.pt")
    if other_process:
        return None                               # under torchrun, process 0 compares
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    result, _ = evaluate.compare_checkpoints(checkpoints, device, num_resamples=args.bootstrap,
                                             seed=0)
    write_text(root / f"{collection_name(args)}-comparison.json", json.dumps(result, indent=1))
    print(f"\n{len(methods)} method(s) x {len(seeds)} seed(s) on {args.data}, "
          f"split seed {args.split_seed}\n")
    print(format_comparison(result))
    return result


def train_in_parallel(runs, out, jobs, threads, desc):
    """Train every unfinished run of `runs` (name -> train.py flags) into out/<name>, `jobs`
    train.py processes at a time with `threads` threads each (None: torch's default), the largest
    --train-fraction first; an interrupted run resumes from its last.pt, and its output goes to
    out/<name>/train.log. A run with --teacher waits for the others, and is not started when its
    teacher did not finish. -> the names of the runs that failed."""
    todo = [name for name in runs if not (out / name / "metrics.json").exists()]
    todo.sort(key=lambda name: -train_fraction(runs[name]))
    threads_each = threads or "torch's default"
    print(f"{len(runs) - len(todo)} of {len(runs)} runs finished before; training {len(todo)}, "
          f"{jobs} side by side with {threads_each} thread(s) each; logs in "
          f"{out}/<run>/train.log", flush=True)
    env = os.environ.copy()
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def train_one(name):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        resume = ["--resume"] if (folder / "last.pt").exists() else []
        command = [sys.executable, str(REPO / "train.py"), *runs[name], "--out", str(folder),
                   *resume]
        with open(folder / "train.log", "a") as log:
            return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode

    failed = []
    students = [name for name in todo if "--teacher" in runs[name]]
    progress = tqdm(total=len(todo), desc=desc, unit="run")
    with ThreadPoolExecutor(jobs) as pool:
        try:
            for wave in ([name for name in todo if name not in students], students):
                orphans = [name for name in wave if not teacher_finished(runs[name])]
                for name in orphans:               # its teacher failed: nothing to learn from
                    failed.append(name)
                    progress.update()
                    tqdm.write(f"run {name} not started: its teacher did not finish")
                futures = {pool.submit(train_one, name): name for name in wave
                           if name not in orphans}
                for future in as_completed(futures):
                    progress.update()
                    if future.result() != 0:
                        failed.append(futures[future])
                        tqdm.write(f"run {futures[future]} failed: see "
                                   f"{out / futures[future] / 'train.log'}")
        # Ctrl-C reached the runs too: each saved its last.pt at the exact step
        except KeyboardInterrupt:
            pool.shutdown(cancel_futures=True)
            sys.exit("\ninterrupted; the same command continues (finished runs are kept, others "
                     "resumed)")
    progress.close()
    return failed


def train_fraction(flags):
    return float(flags[flags.index("--train-fraction") + 1]) if "--train-fraction" in flags else 1.0


def teacher_finished(flags):
    """Whether the --teacher in a run's flags (if any) has finished (its metrics.json)."""
    if "--teacher" not in flags:
        return True
    return (Path(flags[flags.index("--teacher") + 1]).parent / "metrics.json").exists()
