"""The recipe behind `python train.py --method all` and `--seeds 0,1,2`: several methods and seeds
on one split, then the paired comparison of their test predictions (evaluate.compare_checkpoints).
A student can skip it.
"""
import json
import os
from pathlib import Path

import torch

import evaluate
from vkd.compare import format_comparison
from vkd.options import collection_name, for_method, run_name
from vkd.reports import DataError
from vkd.runtime import write_text

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
