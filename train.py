"""Train VKD (or a baseline), choose the best epoch on validation, evaluate it once on the test
split.

    python train.py --preset tiny            # the whole pipeline in under a minute on a CPU
    python train.py                          # the demo collection, VKD, CPU-friendly defaults
    python train.py --method image           # the image-only baseline VKD must beat
    python train.py --data openi --data-dir DIR
    python train.py --out runs/demo-vkd-seed0 --resume    # continue an interrupted run

One run, in the order of this file: setup -> for each epoch: train_epoch (the loop) -> end_epoch
(validate, log, checkpoint) -> test. Writes into --out: run.json (the resolved config), splits.json,
tokenizer.json, log.jsonl, last.pt and best.pt (plain dicts), metrics.json (test AUROC and AUPRC of
best.pt with 95% bootstrap intervals).
"""
import argparse
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import data
import evaluate
from config.collections import COLLECTIONS
from config.presets import PRESETS
from model import LOSS_PARTS, VKD
from vkd import batching, options, recipe, runtime, teachers
from vkd.metrics import auroc_summary

# ----------------------------------------------------------------------------------------- options

def get_args(argv=None):
    """The command line (vkd/options.py), resolved in one place: the collection's defaults
    (config/collections.py), then the preset's (config/presets.py), then the flags given."""
    parser = options.build_parser(PRESETS, __doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    if args.resume:                                         # a resumed run keeps its saved options
        parser.set_defaults(epochs=None)                    # (and epochs, unless given)
    else:
        parser.set_defaults(**COLLECTIONS[args.data] | PRESETS.get(args.preset, {}))
    args = parser.parse_args(argv)                          # flags given on the command line win
    return options.for_method(args)         # its folder; options the method cannot use turned off


# --------------------------------------------------------------------------------------- schedules

def lr_at(step, total_steps, peak_lr, warmup_steps):
    """Linear warm-up to peak_lr, then cosine decay to zero at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * 0.5 * (1 + math.cos(math.pi * progress))


def beta_at(step, beta, warmup_steps, cycle_steps=0):
    """KL weight rising linearly from 0 to beta over warmup_steps, then constant; with cycle_steps >
    0 the ramp restarts every cycle_steps steps (the authors' cyclical schedule,
    --beta-cycle-epochs).

    Why a ramp: at first the posterior has learnt nothing from the report, and a full-weight KL
    would pull it onto the untrained prior (it 'collapses' and ignores t). study.py measures the
    cycles."""
    step = step % cycle_steps if cycle_steps > 0 else step
    return beta * min(1.0, step / warmup_steps) if warmup_steps > 0 else beta


# ------------------------------------------------------------------------------------------- setup

@dataclass
class Run:
    """What one run is made of: built once by setup(), read by the phases below (a record, not a
    trainer). `model` is the plain module (saved, evaluated, clipped); `forward` is what the step
    calls: the same module, compiled (--compile) and/or wrapped in DistributedDataParallel."""
    args: argparse.Namespace
    out: Path
    procs: runtime.Processes        # this process's rank, world size, device, autocast mode
    collection: data.Collection
    split_sha256: str
    images: object                  # (N, S, S) uint8: on the device, or the memory-mapped cache
    tokens: torch.Tensor            # (N, T) report token ids, 0 = padding; distill: (N, K) logits
    labels: torch.Tensor            # (N, K), NaN = not observed
    lengths: torch.Tensor | None    # (N,) report tokens, on the CPU, with --group-by-length
    weights: torch.Tensor | None    # (N_train,) how often each image is drawn, with --oversample
    model: VKD
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    betas: torch.Tensor             # (total_steps,) the KL weight of every step, on the device
    steps_per_epoch: int
    start_time: float               # time.time() when the run started
    step: int = 0                   # optimisation steps taken
    start_epoch: int = 0
    best_auroc: float = -math.inf   # best validation macro AUROC so far
    saved_epoch: int | None = None  # the last epoch with a checkpoint; None before the first
    interrupted: dict | None = None  # --resume: where a stop signal left start_epoch
    untrained: list | None = None   # the parameters the method never trains (runtime.restore)

    @property
    def total_steps(self):
        return self.steps_per_epoch * self.args.epochs


def setup(args, start_time):
    """Processes, data on the device, model, optimizer and, with --resume, their saved state."""
    args, checkpoint = runtime.resume_args(args) if args.resume else (args, None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    procs = runtime.Processes.start(args)         # torchrun or not, seeds, the autocast mode
    with procs.main_first():                      # it writes the splits and the tokenizer
        collection, split_sha256, tokenizer, cache = data.load_for_run(args, out, checkpoint,
                                                                       procs.main)
    train_idx = collection.splits["train"]
    if checkpoint is None:
        args.pixel_mean, args.pixel_std = batching.pixel_statistics(cache, train_idx)
    images, tokens, labels, lengths, weights = batching.on_device(collection, tokenizer, cache,
                                                                  args, procs)
    if args.method == "distill":          # the teacher's logits (N, K) take the reports' place
        tokens = teachers.teacher_logits(args, collection, cache, split_sha256, procs.device)
    steps_per_epoch = len(train_idx) // args.batch_size      # the incomplete last batch dropped
    model_config = options.model_config(args, len(collection.label_names),
                                        tokenizer.get_vocab_size(), tokenizer.token_to_id("."))
    pos_weight = batching.positive_weights(collection.labels[train_idx], args.pos_weight)
    model, optimizer, scaler, autocast, betas = build_model(model_config, args, procs.device,
                                                            procs.amp, steps_per_epoch,
                                                            pos_weight)
    run = Run(args=args, out=out, procs=procs, collection=collection, split_sha256=split_sha256,
              images=images, tokens=tokens, labels=labels, lengths=lengths, weights=weights,
              model=model, forward=model, optimizer=optimizer, scaler=scaler, autocast=autocast,
              betas=betas, steps_per_epoch=steps_per_epoch, start_time=start_time)
    runtime.restore(run, checkpoint)          # saved state, frozen parameters, compile, DDP
    return run


def build_model(model_config, args, device, amp, steps_per_epoch, pos_weight=None):
    """-> model, optimizer, GradScaler, autocast context, the beta of every step."""
    model = VKD(model_config, args.backbone_weights, pos_weight).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    total_steps = steps_per_epoch * args.epochs
    beta_warmup_steps = int(args.beta_warmup_epochs * steps_per_epoch)
    cycle_steps = int(args.beta_cycle_epochs * steps_per_epoch)
    # the whole beta schedule as one device tensor: indexing it needs no host-to-device copy (a
    # sync) and, being a tensor, never makes torch.compile recompile for a new value
    betas = [beta_at(s, args.beta, beta_warmup_steps, cycle_steps) for s in range(total_steps)]
    betas = torch.tensor(betas, device=device)
    optimizer = torch.optim.AdamW(model.parameters(),
                                  lr=lr_at(0, total_steps, args.lr, args.warmup_steps),
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    autocast = torch.autocast(device.type, dtype=dtype) if amp != "off" else nullcontext()
    return model, optimizer, scaler, autocast, betas


# ---------------------------------------------------------------------------------------- training

def train_step(model, forward, optimizer, scaler, autocast, x, t, y, beta, args):
    """One optimisation step in the standard order -> the loss parts and the gradient norm before
    clipping, as device tensors (no host sync).

    `forward` is the model as called (compiled and/or DDP-wrapped), `model` the plain module whose
    gradients are clipped. With fp16 the scaler scales the loss and unscales the gradients before
    clipping, and skips the step on inf/NaN gradients; otherwise it does nothing."""
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        parts = forward(x, t, y, beta, args.prior_weight, args.latent_samples)
    scaler.scale(parts["loss"]).backward()
    scaler.unscale_(optimizer)
    # inf/NaN: a bad step, counted by the loop
    parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return parts


def train_epoch(run, epoch, stop, log):
    """One pass over this process's share of the training split -> (loss parts and non-finite steps
    summed on the device, the epoch's start time, the steps this call ran). The host waits for the
    device only at the run's first step and every --log-every."""
    args = run.args
    # steps done, loss sums so far, augmentation state: 0, zeros, None unless a stop signal left
    # this epoch part-way (--resume)
    done, sums, augment_state = stop.resume_point(run)
    # shuffle and augmentation draw from generators of (seed, epoch): a resumed run repeats them
    batches, augment_rng = batching.epoch_batches(run, epoch, done, augment_state)
    run.model.train()
    epoch_start = time.time()
    bar = tqdm(batches, total=run.steps_per_epoch, initial=done, leave=False, unit="step",
               desc=f"epoch {epoch + 1}/{args.epochs}", disable=not run.procs.main)
    for i, (x, t, y) in enumerate(bar, start=done):   # x (B, 1, S, S): normalised, augmented
        parts = train_step(run.model, run.forward, run.optimizer, run.scaler, run.autocast,
                           x, t, y, run.betas[run.step], args)
        run.step += 1
        for group in run.optimizer.param_groups:     # the schedule, last: the next step's rate
            group["lr"] = lr_at(run.step, run.total_steps, args.lr, args.warmup_steps)
        finite = parts["loss"].isfinite() & parts["grad_norm"].isfinite()
        sums += torch.stack([parts[k].detach().float() for k in LOSS_PARTS[args.method]]
                            + [~finite])
        log.first_step(epoch_start)                  # once per run: a host sync
        if args.log_every and (i + 1) % args.log_every == 0:        # a host sync every N steps
            bar.set_postfix(loss=f"{sums[0].item() / (i + 1):.3f}")
        if stop.agreed(i + 1, run.steps_per_epoch, run.step):      # a stop signal: save this step
            stop.save(run, epoch, i + 1, sums, augment_rng, checkpoint_state)
            raise stop.interrupt()
    return sums, epoch_start, run.steps_per_epoch - done


def end_epoch(run, epoch, sums, epoch_start, steps_run, log):
    """Loss parts averaged over all processes, a stop on non-finite steps; then (process 0)
    validate, log one line, save last.pt, and best.pt when validation improved."""
    args, steps = run.args, run.steps_per_epoch * run.procs.world_size
    # every process, in this order: the collectives below must meet
    sums = run.procs.sum(sums)                         # the batches of every process
    means = (sums[:-1] / steps).tolist()               # the method's loss parts (LOSS_PARTS)
    bad_steps = int(sums[-1].item())                   # waits for the device: the epoch is done
    train_time = time.time() - epoch_start
    runtime.check_finite(run, epoch, bad_steps)        # stops before a bad update is saved
    rng = run.procs.rng_states()                       # every process's, for an exact resume
    if not run.procs.main:
        return
    val_auroc = validate(run)
    lr = lr_at(run.step - 1, run.total_steps, args.lr, args.warmup_steps)  # the last step's
    beta = run.betas[run.step - 1].item() if args.method == "vkd" else None   # no KL otherwise
    parts = dict(zip(LOSS_PARTS[args.method], means))
    images = steps_run * args.batch_size               # none when resumed at the epoch's end
    record = {"epoch": epoch + 1, "step": run.step, **parts, "beta": beta, "lr": lr,
              "val_macro_auroc": val_auroc,
              "images_per_s": images / train_time if steps_run else None,
              "epoch_s": time.time() - epoch_start, "nonfinite_steps": bad_steps}
    log.epoch(record, epoch)                           # one line, printed and in log.jsonl
    save_checkpoints(run, epoch, rng, val_auroc)


def validate(run):
    """Validation macro AUROC of the test-time prediction, the prior mean (`text` reads the
    report)."""
    val_idx = run.collection.splits["val"]
    p, _ = evaluate.predict(run.model, run.images, run.tokens, val_idx, vars(run.args),
                            run.procs.device)
    return auroc_summary(run.collection.labels[val_idx], p)["macro"]


# ------------------------------------------------------------------------------------- checkpoints

def checkpoint_state(run, epoch, rng, **extra):
    """last.pt / best.pt: a plain dict of tensors, numbers, strings and containers (loadable with
    weights_only=True). `rng` holds every process's RNG states: each draws its own latent noise and
    dropout masks."""
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "epoch": epoch, "step": run.step,
            "best_auroc": run.best_auroc, "config": vars(run.args),
            "model_config": vars(run.model.cfg), "tokenizer": "tokenizer.json",
            "split_sha256": run.split_sha256, "label_names": run.collection.label_names,
            "rng": rng} | extra


def save_checkpoints(run, epoch, rng, val_auroc):
    """best.pt by validation macro AUROC; an undefined AUROC (no label with both classes) never
    wins, but the first epoch is always saved so that best.pt exists. last.pt every epoch."""
    score = -math.inf if math.isnan(val_auroc) else val_auroc
    is_best = score > run.best_auroc or not (run.out / "best.pt").exists()
    run.best_auroc = max(run.best_auroc, score)
    state = checkpoint_state(run, epoch, rng, val_macro_auroc=val_auroc)
    if is_best:
        runtime.save_checkpoint(run.out / "best.pt", state)
    runtime.save_checkpoint(run.out / "last.pt", state)
    run.saved_epoch = epoch


# ------------------------------------------------------------------------------------------- a run

def train(args):
    """Train one run; under torchrun every process calls this, and process 0 alone prints, logs,
    saves and evaluates. Returns the test metrics (process 0 of a finished run) or None."""
    with runtime.FolderLock(args.out):            # one run per folder: a second one refuses
        run = setup(args, time.time())
        args, main_process = run.args, run.procs.main      # --resume: the run's saved options
        last_epoch = args.epochs                  # where this invocation stops (--stop-after)
        if args.stop_after is not None:
            last_epoch = min(args.epochs, run.start_epoch + args.stop_after)
        with runtime.RunLog(run) as log:          # run.json, log.jsonl, metrics.json
            with runtime.StopRequest(run) as stop:    # Ctrl-C, SIGTERM: save the step, then exit
                for epoch in range(run.start_epoch, last_epoch):
                    sums, epoch_start, steps_run = train_epoch(run, epoch, stop, log)
                    end_epoch(run, epoch, sums, epoch_start, steps_run, log)
            metrics = test(run, log) if last_epoch == args.epochs and main_process else None
        if last_epoch < args.epochs and main_process:
            print(f"stopped after epoch {last_epoch}/{args.epochs}; continue with: "
                  f"{runtime.resume_command(run.out, run.procs.world_size)}")
    run.procs.finish()
    return metrics


def test(run, log):
    """The test split is touched once, with the checkpoint chosen on validation -> metrics.json."""
    out, collection, device = run.out, run.collection, run.procs.device
    model, checkpoint = evaluate.load_checkpoint(out / "best.pt", device)
    test_idx = collection.splits["test"]
    p, _ = evaluate.predict(model, run.images, run.tokens, test_idx, vars(run.args), device)
    metrics = evaluate.metrics_report(collection.labels[test_idx], p,
                                      collection.bootstrap_groups[test_idx], run.args.bootstrap,
                                      label_names=collection.label_names,
                                      unit=collection.bootstrap_unit, options=vars(run.args))
    metrics |= {"best_epoch": checkpoint["epoch"] + 1, "method": run.args.method,
                "wall_s": time.time() - run.start_time}
    log.finish(metrics)                           # metrics.json, and run.json with the metrics
    title = f"test AUROC of {out / 'best.pt'} (best val epoch {metrics['best_epoch']})"
    print(evaluate.format_metrics(metrics, title))
    print(f"wall time {metrics['wall_s']:.0f}s; results in {out}/")
    return metrics


def main():
    try:
        args = get_args()
        if args.method == "all" or args.seeds:
            recipe.run_recipe(args, train)
        else:
            train(args)
    except data.DataError as error:       # bad data, or a run that cannot go on
        sys.exit(f"error: {error}")
    except torch.cuda.OutOfMemoryError:
        sys.exit(f"error: the device ran out of memory at --batch-size {args.batch_size}; try "
                 f"--batch-size {max(1, args.batch_size // 2)}, a smaller --image-size, or "
                 f"--preload no (cache in host memory)")
    except KeyboardInterrupt as stop:     # the message (and last.pt, when saved) came from train()
        sys.exit(128 + (stop.args[0] if stop.args else 2))     # 130 for Ctrl-C, 143 for SIGTERM


if __name__ == "__main__":
    main()
