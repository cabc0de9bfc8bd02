"""Train VKD (or a baseline), choose the best epoch on validation, and evaluate it once on the test split.

    python train.py --preset tiny            # the whole pipeline in under a minute on a CPU
    python train.py                          # the demo collection, VKD, CPU-friendly defaults
    python train.py --method image           # the image-only baseline VKD must beat
    python train.py --data openi --data-dir DIR
    python train.py --out runs/demo-vkd-seed0 --resume    # continue an interrupted run

One run, in the order of this file: setup -> for each epoch: train_epoch (the loop) -> end_epoch (validate, log,
checkpoint) -> test. Writes into --out: run.json (the resolved config), splits.json, tokenizer.json, log.jsonl,
last.pt and best.pt (plain dicts), metrics.json (test AUROC and AUPRC of best.pt with 95% bootstrap intervals).
"""
import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import batching
import data
import evaluate
import options
import recipe
import runtime
from metrics import auroc_summary
from model import VKD, describe, positive_weights

# ----------------------------------------------------------------------------------------------- options

PRESETS = {       # named option defaults (--preset NAME); flags given on the command line still win
    "tiny": {"demo_reports": 600, "image_size": 64, "epochs": 8, "batch_size": 32},   # the pipeline in < 1 min
    "authors": options.AUTHORS,                       # the authors' design choices (options.py)
}


def get_args(argv=None):
    """The command line (options.py), with the presets above."""
    return options.get_args(argv, PRESETS, __doc__.split("\n\n")[0])


# --------------------------------------------------------------------------------------------- schedules

def lr_at(step, total_steps, peak_lr, warmup_steps):
    """Linear warm-up to peak_lr, then cosine decay to zero at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * 0.5 * (1 + math.cos(math.pi * progress))


def beta_at(step, beta, warmup_steps, cycle_steps=0):
    """KL weight rising linearly from 0 to beta over warmup_steps, then constant; with cycle_steps > 0 the ramp
    restarts every cycle_steps steps (the authors' cyclical schedule, --beta-cycle-epochs).

    Why a ramp: at first the posterior has learnt nothing from the report, and a full-weight KL would pull it
    onto the untrained prior (it 'collapses' and ignores t). study.py measures the cyclical schedule."""
    step = step % cycle_steps if cycle_steps > 0 else step
    return beta * min(1.0, step / warmup_steps) if warmup_steps > 0 else beta


# -------------------------------------------------------------------------------------------------- setup

@dataclass
class Run:
    """What one run is made of: built once by setup(), read by the phases below (a record, not a trainer).
    `model` is the plain module (saved, evaluated, clipped); `forward` is what the step calls: the same module,
    compiled (--compile) and/or wrapped in DistributedDataParallel (torchrun)."""
    args: argparse.Namespace
    out: Path
    rank: int
    main: bool                      # process 0: the only one that prints, logs, saves and evaluates
    world_size: int
    device: torch.device
    amp: str
    collection: data.Collection
    split_sha256: str
    images: object                  # (N, S, S) uint8: a device tensor, or the memory-mapped cache (streamed)
    tokens: torch.Tensor            # (N, T) report token ids, 0 = padding
    labels: torch.Tensor            # (N, K), NaN = not observed
    lengths: torch.Tensor | None    # (N,) report tokens, on the CPU, with --group-by-length; else None
    weights: torch.Tensor | None    # (N_train,) how often each training image is drawn (--oversample); else None
    model: VKD
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    betas: torch.Tensor             # (total_steps,) the KL weight of every step, on the device: no per-step copy
    steps_per_epoch: int
    start_time: float               # time.time() when the run started
    record: dict = None             # run.json
    step: int = 0                   # optimisation steps taken
    start_epoch: int = 0
    best_auroc: float = -math.inf   # best validation macro AUROC so far
    saved_epoch: int = None         # the last epoch with a checkpoint; None before the first


def setup(args, start_time):
    """Processes, data on the device, model, optimizer, and (with --resume) their saved state -> (Run, checkpoint)."""
    args, checkpoint = runtime.resume_args(args) if args.resume else (args, None)
    args.epochs = args.epochs or 12
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world_size, device = runtime.setup_distributed(args.device)
    amp = ("bf16" if device.type == "cuda" else "off") if args.amp == "auto" else args.amp
    if amp == "fp16" and device.type != "cuda":
        raise data.DataError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or off")
    if args.batch_size % world_size:
        raise data.DataError(f"--batch-size {args.batch_size} must be divisible by the {world_size} processes")
    torch.manual_seed(args.seed + rank)               # dropout and latent samples differ between processes;
    if device.type == "cuda":                         # DDP gives all of them rank 0's initial weights
        torch.backends.cudnn.benchmark = True         # let cuDNN pick kernels for our fixed shapes; TF32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if rank > 0:                                      # rank 0 draws/reads the data and writes the tokenizer first
        dist.barrier()
    collection, split_sha256, tokenizer, cache = data.load_for_run(args, out, checkpoint, rank == 0)
    if rank == 0 and world_size > 1:
        dist.barrier()
    train_idx = collection.splits["train"]
    if checkpoint is None:
        args.pixel_mean, args.pixel_std = batching.pixel_statistics(cache, train_idx)
    images, tokens, labels, lengths, weights = batching.on_device(collection, tokenizer, cache, args, device,
                                                                  rank == 0)
    runtime.check_labels(collection, args.allow_missing_labels, rank == 0)
    steps_per_epoch = len(train_idx) // args.batch_size                                     # drop_last
    if steps_per_epoch == 0:
        raise data.DataError(f"{len(train_idx)} training images < --batch-size {args.batch_size}; lower it")
    model_config = options.model_config(args, len(collection.label_names), tokenizer.get_vocab_size(),
                                        tokenizer.token_to_id("."))
    pos_weight = positive_weights(collection.labels[train_idx], getattr(args, "pos_weight", "none"))
    model, optimizer, scaler, autocast, betas = build_model(model_config, args, device, amp, steps_per_epoch,
                                                            pos_weight)
    run = Run(args=args, out=out, rank=rank, main=rank == 0, world_size=world_size, device=device, amp=amp,
              collection=collection, split_sha256=split_sha256, images=images, tokens=tokens, labels=labels,
              lengths=lengths, weights=weights, model=model, forward=model, optimizer=optimizer, scaler=scaler,
              autocast=autocast, betas=betas, steps_per_epoch=steps_per_epoch, start_time=start_time)
    untrained = restore(run, checkpoint)
    run.record = {"config": vars(args), "environment": runtime.environment(device), "model": describe(model),
                  "split_sha256": split_sha256, "data": collection.summary, "amp": amp, "world_size": world_size,
                  "preloaded": torch.is_tensor(images), "untrained_parameters": untrained}
    return run, checkpoint


def build_model(model_config, args, device, amp, steps_per_epoch, pos_weight=None):
    """-> model, optimizer, GradScaler, autocast context, the beta of every step."""
    model = VKD(model_config, args.backbone_weights, pos_weight).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    total_steps = steps_per_epoch * args.epochs
    beta_warmup_steps = int(args.beta_warmup_epochs * steps_per_epoch)
    cycle_steps = int(getattr(args, "beta_cycle_epochs", 0) * steps_per_epoch)
    # the whole beta schedule as one device tensor: indexing it per step needs no host-to-device copy (a sync)
    # and, being a tensor, never makes torch.compile recompile for a new value
    betas = torch.tensor([beta_at(s, args.beta, beta_warmup_steps, cycle_steps) for s in range(total_steps)], device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr_at(0, total_steps, args.lr, args.warmup_steps),
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                if amp != "off" else nullcontext())
    return model, optimizer, scaler, autocast, betas


def restore(run, checkpoint):
    """A resumed run's weights, optimizer, scaler, progress and this process's RNG states; then the parameters
    the method never trains are frozen (-> their names) and the model is wrapped for the step (compile, DDP)."""
    if checkpoint is not None:
        run.model.load_state_dict(checkpoint["model"])
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        run.scaler.load_state_dict(checkpoint["scaler"])
        run.start_epoch, run.step = checkpoint["epoch"] + 1, checkpoint["step"]
        run.best_auroc, run.saved_epoch = checkpoint["best_auroc"], checkpoint["epoch"]
        runtime.set_rng_states(runtime.own_part(checkpoint["rng"], run.rank, run.world_size), run.device)
    untrained = runtime.freeze_unreached(run.model, run.tokens[:2], run.labels[:2], run.args)
    run.forward = torch.compile(run.model) if run.args.compile else run.model
    if run.world_size > 1:                            # gradients averaged over the processes during backward
        devices = [run.device] if run.device.type == "cuda" else None              # one GPU per process, or CPUs
        run.forward = DistributedDataParallel(run.forward, device_ids=devices)
    return untrained


def announce(run):
    """run.json, and one line saying what is trained on what (process 0)."""
    (run.out / "run.json").write_text(json.dumps(run.record, indent=1))
    print(f"{run.args.method} on {run.args.data}: {data.usage(run.collection)}, {run.steps_per_epoch} steps/epoch, "
          f"device {run.device} x {run.world_size}, amp {run.amp}, images "
          f"{'preloaded' if torch.is_tensor(run.images) else 'streamed'}; {describe(run.model)}")


# --------------------------------------------------------------------------------------------- training

def train_step(model, forward, optimizer, scaler, autocast, x, t, y, beta, args):
    """One optimisation step in the standard order; returns the loss parts and the gradient norm before
    clipping as device tensors (no host sync).

    `forward` is the model as called (compiled and/or DDP-wrapped), `model` the plain module whose gradients
    are clipped. With fp16 the scaler scales the loss and unscales the gradients before clipping; with fused
    AdamW it also skips the step on inf/NaN gradients without a host sync. Otherwise it does nothing."""
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        parts = forward(x, t, y, beta, args.prior_weight, args.latent_samples)
    scaler.scale(parts["loss"]).backward()
    scaler.unscale_(optimizer)
    parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)   # inf/NaN: a bad step
    scaler.step(optimizer)
    scaler.update()
    return parts


def train_epoch(run, epoch, stop, interrupted=None):
    """One pass over this process's share of the training split -> (loss parts and non-finite steps summed on the
    device, the epoch's start time). `interrupted`: where a Ctrl-C checkpoint left this epoch; its steps are
    skipped. Nothing here waits for the device except every --log-every steps."""
    args, device = run.args, run.device
    local_batch = args.batch_size // run.world_size
    total_steps = run.steps_per_epoch * args.epochs
    # shuffle and augmentation draw from their own generators of (seed, epoch): a resumed run repeats them
    order = batching.epoch_order(run.collection.splits["train"], args.seed, epoch, args.batch_size, run.rank,
                                 run.world_size, run.lengths, run.weights).to(device)
    augment_rng = batching.epoch_generator(args.seed, epoch, batching.AUGMENT, device) if not args.no_augment else None
    sums = torch.zeros(5, device=device)          # loss parts and non-finite steps, summed on the device: no sync
    done = 0                                      # steps of this epoch already taken
    if interrupted is not None:
        done = interrupted["steps_done"]
        sums = runtime.own_part(interrupted["sums"], run.rank, run.world_size).to(device)
        if augment_rng is not None:
            augment_rng.set_state(interrupted["augment_rng"])
    gather = batching.batches if torch.is_tensor(run.images) else batching.streamed_batches
    epoch_batches = gather(run.images, run.tokens, run.labels, order[done * local_batch:], local_batch, run.lengths)
    run.model.train()
    epoch_start = time.time()
    bar = tqdm(epoch_batches, total=run.steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{args.epochs}",
               leave=False, unit="step", disable=not run.main)
    for i, (x, t, y) in enumerate(bar, start=done):
        x = batching.model_input(x, args.pixel_mean, args.pixel_std, augment_rng, run.rank, run.world_size,
                                 args.channels_last)                           # (B, 1, S, S), augmented
        parts = train_step(run.model, run.forward, run.optimizer, run.scaler, run.autocast, x, t, y,
                           run.betas[run.step], args)
        run.step += 1
        for group in run.optimizer.param_groups:  # the schedule, last: the learning rate of the next step
            group["lr"] = lr_at(run.step, total_steps, args.lr, args.warmup_steps)
        sums += torch.stack([parts[k].detach().float() for k in ("loss", "bce_posterior", "bce_prior", "kl")]
                            + [~(parts["loss"].isfinite() & parts["grad_norm"].isfinite())])
        if "first_step_s" not in run.record:
            runtime.synchronize(device)
            run.record["first_step_s"] = time.time() - epoch_start      # includes compilation with --compile
            run.record["time_to_first_step_s"] = time.time() - run.start_time
        if args.log_every and (i + 1) % args.log_every == 0:             # the one host sync every N steps
            bar.set_postfix(loss=f"{sums[0].item() / (i + 1):.3f}")
        if stop.agreed(i + 1, run.steps_per_epoch, run.step):   # exactly where this epoch stands, to continue from here
            save_interrupted(run, epoch, i + 1, sums, augment_rng)
            raise KeyboardInterrupt
    return sums, epoch_start


def end_epoch(run, epoch, sums, epoch_start, log):
    """Loss parts averaged over all processes, a stop on non-finite steps; then (process 0) validate, log one
    line, and save last.pt, and best.pt when validation improved."""
    args, steps = run.args, run.steps_per_epoch * run.world_size
    if run.world_size > 1:
        dist.all_reduce(sums)                          # loss parts averaged over all processes' batches
    loss, bce_posterior, bce_prior, kl = (sums[:4] / steps).tolist()
    bad_steps = int(sums[4].item())
    runtime.check_finite(bad_steps, steps, epoch, run.amp, run.out, run.saved_epoch)
    train_time = time.time() - epoch_start
    rng = runtime.gather_to_main(runtime.rng_states(run.device), run.world_size)
    lr = lr_at(run.step - 1, run.steps_per_epoch * args.epochs, args.lr, args.warmup_steps)  # the last step's rate
    if not run.main:
        return
    val_auroc = validate(run)
    beta = run.betas[run.step - 1].item() if args.method == "vkd" else None        # image, text: no KL term
    record = {"epoch": epoch + 1, "step": run.step, "loss": loss, "bce_posterior": bce_posterior,
              "bce_prior": bce_prior, "kl": kl, "beta": beta, "lr": lr, "val_macro_auroc": val_auroc,
              "images_per_s": run.steps_per_epoch * args.batch_size / train_time,
              "epoch_s": time.time() - epoch_start, "nonfinite_steps": bad_steps}
    tqdm.write(f"epoch {epoch + 1:3d} step {run.step:6d} | loss {loss:7.3f} (bce_q {bce_posterior:.3f} "
               f"bce_p {bce_prior:.3f} kl {kl:7.3f}) | beta {'-' if beta is None else f'{beta:.3f}'} | lr {lr:.2e} | "
               f"val macro AUROC {val_auroc:.4f} | {record['images_per_s']:.0f} img/s | {record['epoch_s']:.1f}s")
    if epoch == run.start_epoch and args.compile:
        tqdm.write(f"torch.compile: the first step took {run.record['first_step_s']:.1f}s, compilation included")
    log.write(json.dumps(record) + "\n")
    log.flush()
    save_checkpoints(run, epoch, rng, val_auroc)


def validate(run):
    """Validation macro AUROC of the test-time prediction: the prior mean (the `text` upper bound reads the report)."""
    val_idx = run.collection.splits["val"]
    p, _ = evaluate.predict(run.model, run.images, run.tokens, val_idx, vars(run.args), run.device)
    return auroc_summary(run.collection.labels[val_idx], p)["macro"]


# ------------------------------------------------------------------------------------------- checkpoints

def checkpoint_state(run, epoch, rng, **extra):
    """last.pt / best.pt: a plain dict of tensors and numbers (loadable with weights_only=True); `rng` holds
    every process's RNG states (runtime.gather_to_main): each draws its own latent noise and dropout masks."""
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "epoch": epoch, "step": run.step, "best_auroc": run.best_auroc,
            "config": vars(run.args), "model_config": vars(run.model.cfg), "tokenizer": "tokenizer.json",
            "split_sha256": run.split_sha256, "label_names": run.collection.label_names, "rng": rng} | extra


def save_checkpoints(run, epoch, rng, val_auroc):
    """best.pt by validation macro AUROC; an undefined AUROC (no label with both classes) never wins, but the
    first epoch is always saved so that best.pt exists. last.pt every epoch."""
    score = -math.inf if math.isnan(val_auroc) else val_auroc
    is_best = score > run.best_auroc or not (run.out / "best.pt").exists()
    run.best_auroc = max(run.best_auroc, score)
    state = checkpoint_state(run, epoch, rng, val_macro_auroc=val_auroc)
    if is_best:
        runtime.save_checkpoint(run.out / "best.pt", state)
    runtime.save_checkpoint(run.out / "last.pt", state)
    run.saved_epoch = epoch


def save_interrupted(run, epoch, steps_done, sums, augment_rng):
    """Ctrl-C: last.pt at the exact step (with the loss sums and the augmentation generator of the epoch so far),
    so that --resume ends exactly as the uninterrupted run would."""
    rng, own_sums = (runtime.gather_to_main(part, run.world_size) for part in (runtime.rng_states(run.device),
                                                                                sums.cpu()))
    if run.main:
        runtime.save_checkpoint(run.out / "last.pt", checkpoint_state(run, epoch - 1, rng, interrupted={
            "steps_done": steps_done, "sums": own_sums,
            "augment_rng": augment_rng.get_state() if augment_rng is not None else None}))
        print(f"\ninterrupted at step {steps_done}/{run.steps_per_epoch} of epoch {epoch + 1}; saved "
              f"{run.out}/last.pt. Continue with: {runtime.resume_command(run.out, run.world_size)}")
    runtime.finish_distributed(run.world_size)


# ------------------------------------------------------------------------------------------------- a run

def train(args):
    """Train one run; under torchrun every process calls this, and process 0 alone prints, logs, saves and
    evaluates. Returns the test metrics (process 0 of a finished run) or None."""
    run, checkpoint = setup(args, time.time())
    args = run.args
    if run.main:
        announce(run)
    end_epoch_ = args.epochs if args.stop_after is None else min(args.epochs, run.start_epoch + args.stop_after)
    # a checkpoint written on Ctrl-C is part-way through epoch start_epoch: the steps it has done are skipped
    interrupted = checkpoint.get("interrupted") if checkpoint is not None else None
    with (runtime.open_log(run.out, run.start_epoch if checkpoint else 0) if run.main else nullcontext()) as log, \
            runtime.StopRequest(run.world_size, args.log_every, run.device, run.rank) as stop:
        for epoch in range(run.start_epoch, end_epoch_):
            sums, epoch_start = train_epoch(run, epoch, stop, interrupted)
            interrupted = None
            end_epoch(run, epoch, sums, epoch_start, log)
    if end_epoch_ < args.epochs and run.main:
        print(f"stopped after epoch {end_epoch_}/{args.epochs}; continue with: "
              f"{runtime.resume_command(run.out, run.world_size)}")
    metrics = test(run) if end_epoch_ == args.epochs and run.main else None
    runtime.finish_distributed(run.world_size)
    return metrics


def test(run):
    """The test split is touched once, with the checkpoint chosen on validation -> metrics.json, run.json."""
    out, collection = run.out, run.collection
    model, checkpoint = evaluate.load_checkpoint(out / "best.pt", run.device)
    test_idx = collection.splits["test"]
    p, _ = evaluate.predict(model, run.images, run.tokens, test_idx, vars(run.args), run.device)
    metrics = evaluate.metrics_report(collection.labels[test_idx], p, collection.bootstrap_groups[test_idx],
                                      run.args.bootstrap, label_names=collection.label_names,
                                      unit=collection.bootstrap_unit)
    metrics |= {"best_epoch": checkpoint["epoch"] + 1, "method": run.args.method,
                "wall_s": time.time() - run.start_time}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    run.record |= {"metrics": metrics, "wall_s": metrics["wall_s"]}
    (out / "run.json").write_text(json.dumps(run.record, indent=1))
    print(evaluate.format_metrics(metrics, f"test AUROC of {out / 'best.pt'} (best val epoch {metrics['best_epoch']})"))
    print(f"wall time {metrics['wall_s']:.0f}s; results in {out}/")
    return metrics


def main():
    try:
        args = get_args()
        if args.method == "all" or args.seeds:
            recipe.run_recipe(args, train)
        else:
            train(args)
    except (data.DataError, runtime.TrainingStopped) as error:
        sys.exit(f"error: {error}")
    except torch.cuda.OutOfMemoryError:
        sys.exit(f"error: the device ran out of memory at --batch-size {args.batch_size}; try --batch-size "
                 f"{max(1, args.batch_size // 2)}, a smaller --image-size, or --preload no (cache in host memory)")
    except KeyboardInterrupt:
        sys.exit(130)                             # the message (and last.pt, when saved) came from train()


if __name__ == "__main__":
    main()
