"""Train VKD (or a baseline) and evaluate the best checkpoint on the test split.

    python train.py                          # the embedded demo, VKD, CPU-friendly defaults
    python train.py --method image           # the image-only baseline VKD must beat
    python train.py --data openi --data-dir DIR
    python train.py --out runs/demo-vkd-seed0 --resume    # continue an interrupted run

Writes into --out: run.json (resolved config), splits.json, tokenizer.json, log.jsonl (one line per epoch),
last.pt and best.pt (plain dicts), metrics.json (test AUROC of best.pt with 95% bootstrap intervals).
"""
import argparse
import atexit
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import evaluate
from compare import format_comparison
from metrics import auroc_summary
from model import METHODS, VKD, VKDConfig, describe


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data.add_data_args(parser)
    add = parser.add_argument
    add("--method", default="vkd", choices=[*METHODS, "all"],
        help="vkd, image (baseline), text (upper bound), or all: the three on one split, then compared (default: vkd)")
    add("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2: one run per seed (and method), then the "
                                      "comparison with mean +- std across seeds (default: --seed alone)")
    add("--epochs", type=int, default=None, help="training epochs (default: 12, or the resumed run's)")
    add("--batch-size", type=int, default=64, help="images per step (default: 64)")
    add("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default: 2e-3)")
    add("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    add("--warmup-steps", type=int, default=30, help="linear learning-rate warm-up steps (default: 30)")
    add("--beta", type=float, default=0.1, help="weight of KL(q || p) after annealing (default: 0.1)")
    add("--beta-warmup-epochs", type=float, default=3, help="epochs over which beta rises from 0 (default: 3)")
    add("--prior-weight", type=float, default=1.0, help="lambda: weight of the BCE on prior samples (default: 1.0)")
    add("--latent-samples", type=int, default=1, help="L: reparameterised samples per image (default: 1)")
    add("--latent-dim", type=int, default=64, help="size of z (default: 64)")
    add("--backbone", default="cnn", choices=["cnn", "resnet18", "densenet121"], help="image encoder (default: cnn)")
    add("--backbone-weights", default=None, help="local torchvision state_dict for the backbone (default: none)")
    add("--cnn-width", type=int, default=16, help="channels of the compact CNN's first stage (default: 16)")
    add("--vocab-size", type=int, default=2000, help="tokenizer vocabulary (default: 2000)")
    add("--max-len", type=int, default=64, help="report tokens kept (default: 64)")
    add("--text-dim", type=int, default=64, help="transformer width (default: 64)")
    add("--text-layers", type=int, default=2, help="transformer layers (default: 2)")
    add("--dropout", type=float, default=0.1, help="transformer dropout (default: 0.1)")
    add("--no-augment", action="store_true", help="turn off random affine augmentation (default: on)")
    add("--clip-grad", type=float, default=1.0, help="gradient-norm clip (default: 1.0)")
    add("--seed", type=int, default=0, help="seed of initialisation, shuffling and sampling (default: 0)")
    add("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    add("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
        help="autocast: auto = bf16 on CUDA, off on CPU (default: auto)")
    add("--compile", action="store_true", help="torch.compile the model (default: off)")
    add("--preload", default="auto", choices=["auto", "yes", "no"],
        help="copy the whole uint8 image cache to the device once; no = stream batches from the memory-mapped "
             "file; auto = yes when it takes at most half the free device memory (default: auto)")
    add("--log-every", type=int, default=50,
        help="show the running loss on the progress bar every N steps, one host sync each; 0 = never (default: 50)")
    add("--channels-last", action="store_true", help="channels_last memory format, faster convs on GPUs (default: off)")
    add("--bootstrap", type=int, default=1000, help="bootstrap resamples for test intervals (default: 1000)")
    add("--out", default=None, help="run folder (default: runs/<data>-<method>-seed<seed>); with --method all or "
                                    "--seeds, the folder that holds those run folders (default: runs)")
    add("--resume", action="store_true", help="continue from <out>/last.pt with its saved config (default: off)")
    add("--allow-missing-labels", action="store_true",
        help="train even when a label has no positive training image (its AUROC is then meaningless) (default: stop)")
    add("--stop-after", type=int, default=None,
        help="leave after this many epochs of this invocation, e.g. for time-limited jobs; continue with --resume "
             "(default: run to --epochs)")
    args = parser.parse_args(argv)
    if args.method != "all" and args.seeds is None:
        args.out = args.out or f"runs/{args.data}-{args.method}-seed{args.seed}"
    return args


# --------------------------------------------------------------------------------------------- schedules

def lr_at(step, total_steps, peak_lr, warmup_steps):
    """Linear warm-up to peak_lr, then cosine decay to zero at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * 0.5 * (1 + math.cos(math.pi * progress))


def beta_at(step, beta, warmup_steps):
    """KL weight rising linearly from 0 to beta over warmup_steps, then constant.

    Why this schedule: at the start the posterior has learnt nothing from the report yet, and a full-weight KL
    would pull it onto the untrained prior (the posterior 'collapses' and ignores t). One monotonic ramp is
    enough for runs of tens of epochs; the authors' cyclical schedule repeats the ramp, which matters for long
    runs, and is a one-line change here (use step % period).
    """
    return beta * min(1.0, step / warmup_steps) if warmup_steps > 0 else beta


# ------------------------------------------------------------------------------------------------ pieces

def save_checkpoint(path, checkpoint):
    """Write to a temporary file, then rename: a crash mid-write never leaves a truncated checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def rng_states(device):
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states, device):
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def own_part(saved, rank, world_size):
    """This process's entry of a per-process list that a checkpoint holds (gather_to_main); a lone value is
    a checkpoint of one process written before such lists existed."""
    saved = saved if isinstance(saved, list) else [saved]
    if len(saved) != world_size:
        raise data.DataError(f"the checkpoint was written by {len(saved)} process(es): resume it with as many "
                             f"(torchrun --nproc_per_node {len(saved)}), so that each continues its own random draws")
    return saved[rank]


def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout
    except OSError:
        return ""


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device):
    """What a reader needs to rerun this: the code (commit, and whether it had uncommitted changes), the
    library versions and the hardware."""
    import PIL
    import tokenizers
    import torchvision
    return {"git_commit": git("rev-parse", "HEAD").strip() or None,
            "git_uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no").strip()),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "tokenizers": tokenizers.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "cpu": cpu_name()} | numerics()


def numerics():
    """What else decides the exact floating-point results of the same command: the threads (a sum split
    over more threads is added in another order), the torch build and the kernels it picks (CPU vector
    instructions, CUDA/cuDNN versions), and the determinism settings."""
    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "torch_git_version": torch.version.git_version, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}


# ------------------------------------------------------------------------------------------- distributed

def setup_distributed(device_name):
    """-> (rank, world_size, device). Under torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK) join the process
    group, NCCL on GPUs and gloo on CPUs, one GPU per process; a plain `python train.py` is rank 0 of 1 and
    runs the same code with no process group.

    The group is created once per process and destroyed when the process exits, because one process may train
    several runs (--method all, --seeds); each run ends at a barrier (finish_distributed)."""
    if "RANK" not in os.environ:
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        return 0, 1, torch.device(auto if device_name == "auto" else device_name)
    local_rank = int(os.environ["LOCAL_RANK"])
    on_gpus = torch.cuda.is_available() and device_name != "cpu"
    device = torch.device(f"cuda:{local_rank}" if on_gpus else "cpu")
    if on_gpus:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpus else "gloo")
        atexit.register(dist.destroy_process_group)
    return dist.get_rank(), dist.get_world_size(), device


def finish_distributed(world_size):
    """Every process waits here for rank 0 (still evaluating and saving) before the run is over."""
    if world_size > 1:
        dist.barrier()


def gather_to_main(value, world_size):
    """[value of process 0, value of process 1, ...]: what each process must get back on --resume (its RNG
    states, its loss sums), collected for process 0 to save. One small collective, at a checkpoint only."""
    if world_size == 1:
        return [value]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def synchronize(device):
    """Wait for the device's queued work; used only where a time is read, never inside the step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ batches

def pixel_statistics(cache, indices, chunk=1024, one_pass_bytes=2**30):
    """Mean and std of the training images' pixels in [0, 1], for normalisation.

    One float32 pass when those pixels take at most 1 GiB as floats (the demo, OpenI); otherwise float64 sums
    over chunks of images, so that a cache larger than memory (MIMIC-CXR) is never copied whole."""
    count = len(indices) * cache[0].size
    if count * 4 <= one_pass_bytes:
        pixels = cache[indices].astype(np.float32) / 255.0
        return float(pixels.mean()), float(pixels.std())
    total = total_squares = 0.0
    for start in tqdm(range(0, len(indices), chunk), desc="pixel statistics", unit="chunk", leave=False):
        block = cache[np.sort(indices[start:start + chunk])].astype(np.float64) / 255.0
        total, total_squares = total + block.sum(), total_squares + np.square(block).sum()
    mean = total / count
    return mean, math.sqrt(max(total_squares / count - mean**2, 0.0))


def free_memory(device):
    """Bytes free on the device: CUDA's own count, or the host's free physical memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def place_images(cache, device, preload="auto", chunk=4096):
    """Where batches are gathered from: the whole uint8 cache copied once to `device`, so that gathering,
    uint8->float, normalisation and augmentation all run there with no transfer per step; or, when it does
    not fit, the memory-mapped cache itself, read batch by batch (streamed_batches).

    preload: yes, no, or auto = yes when the cache takes at most half of the device's free memory (the other
    half is left for the model). Copied in chunks, so a large cache never needs a second full copy in RAM."""
    if preload == "auto":
        preload = "yes" if cache.nbytes <= free_memory(device) // 2 else "no"
    if preload == "no":
        return cache
    images = torch.empty(cache.shape, dtype=torch.uint8, device=device)                       # (N, S, S)
    for start in tqdm(range(0, len(cache), chunk), desc=f"image cache to {device}", unit="chunk", leave=False):
        images[start:start + chunk] = torch.from_numpy(np.array(cache[start:start + chunk]))
    return images


SHUFFLE, AUGMENT = 0, 1                              # the random streams of an epoch, drawn the same in every process


def epoch_generator(seed, epoch, stream, device="cpu"):
    """A torch generator for one stream (SHUFFLE or AUGMENT) of one epoch. numpy's SeedSequence hashes
    (seed, epoch, stream) into the seed, so that shuffling and augmentation never draw the same numbers and no
    (seed, epoch) pair repeats another's; a resumed run recreates them exactly."""
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def epoch_order(train_idx, seed, epoch, batch_size, rank=0, world_size=1):
    """This process's training samples for one epoch, (steps * batch_size / world_size,).

    One permutation (the SHUFFLE stream of (seed, epoch)), the same in every process, is cut into global
    batches of batch_size (the incomplete last one dropped: static shapes); each process takes its contiguous
    1/world_size of every global batch, so N processes see exactly the batches one would."""
    shuffle = epoch_generator(seed, epoch, SHUFFLE)
    order = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=shuffle)]
    steps = len(order) // batch_size
    return order[:steps * batch_size].view(steps, world_size, -1)[:, rank].reshape(-1)


def batches(images, tokens, labels, order, batch_size):
    """(x (B, S, S) uint8, t (B, T), y (B, K)) for each batch of `order`, gathered by indexing whole batches out
    of tensors already on the device: no workers, no copies, no host sync."""
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        yield images[idx], tokens[idx], labels[idx]


def streamed_batches(cache, tokens, labels, order, batch_size):
    """As `batches`, for a memory-mapped cache that was not preloaded (larger than half the free memory).

    The images of batch i+1 are read into one of two staging buffers and, on CUDA, their copy from pinned
    memory to the GPU is started (non_blocking) before batch i is handed out, so that reading the file overlaps
    the GPU's work on the steps already queued. A buffer is refilled only after its previous copy has finished
    (a CUDA event). On a CPU the buffer is the batch: the uint8 images yielded are valid for one step."""
    device, num_batches = tokens.device, len(order) // batch_size
    order_cpu = order.cpu().numpy()
    pinned = device.type == "cuda"
    buffers = [torch.empty((batch_size, *cache.shape[1:]), dtype=torch.uint8, pin_memory=pinned) for _ in range(2)]
    copied = [None, None]

    def start_copy(i):
        buffer = buffers[i % 2]
        if copied[i % 2] is not None:                  # its copy of batch i-2 must be done before we overwrite it
            copied[i % 2].synchronize()
        buffer.numpy()[:] = cache[order_cpu[i * batch_size:(i + 1) * batch_size]]
        x = buffer.to(device, non_blocking=True)
        if pinned:
            copied[i % 2] = torch.cuda.Event()
            copied[i % 2].record()
        return x

    x_next = start_copy(0) if num_batches else None
    for i in range(num_batches):
        x = x_next
        if i + 1 < num_batches:
            x_next = start_copy(i + 1)
        idx = order[i * batch_size:(i + 1) * batch_size]
        yield x, tokens[idx], labels[idx]


def augment(x, generator, rank=0, world_size=1):
    """Random affine per image (rotation +-5 deg, scale +-5%, shift +-3%), one grid_sample for the batch.
    No horizontal flips: the heart is on the patient's left, a flip makes an anatomically impossible image.

    Every process draws the parameters of the whole global batch and keeps its own part, so N processes
    augment exactly as one process with the global batch would."""
    B = x.shape[0]
    r = torch.rand(B * world_size, 4, generator=generator, device=x.device)[rank * B:(rank + 1) * B] * 2 - 1
    angle, scale, shift = r[:, 0] * math.radians(5), 1 + r[:, 1] * 0.05, r[:, 2:] * 0.03
    theta = torch.stack([torch.stack([scale * torch.cos(angle), -scale * torch.sin(angle), shift[:, 0]], 1),
                         torch.stack([scale * torch.sin(angle), scale * torch.cos(angle), shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, x.shape, align_corners=False)                  # (B, H, W, 2)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def model_input(x, pixel_mean, pixel_std, augment_rng=None, rank=0, world_size=1, channels_last=False):
    """uint8 images (B, S, S) -> normalised float (B, 1, S, S), augmented when a generator is given."""
    augmented = None if augment_rng is None else (lambda x: augment(x, augment_rng, rank, world_size))
    x = data.normalise(x, pixel_mean, pixel_std, augmented)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def freeze_unreached(model, x, t, y, args):
    """Parameters that the method's loss never reaches get requires_grad=False; returns their names.

    `text` trains the posterior path only, so the prior head p(z|x) gets no gradient. DDP waits for a gradient
    of every parameter that requires one and fails at the second step ("Expected to have finished reduction in
    the prior iteration"); its find_unused_parameters=True would search the graph after every step instead.
    Found once by one probe backward in eval mode (BatchNorm statistics untouched) with the RNG restored
    afterwards (the run's draws unchanged). AdamW skipped these parameters already (no gradient), so one
    process trains exactly as before, and DDP now leaves them out."""
    model.eval()
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        loss = model(x, t, y, 1.0, args.prior_weight, args.latent_samples)["loss"]
        names, parameters = zip(*model.named_parameters())
        gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
    model.train()
    unreached = [name for name, gradient in zip(names, gradients) if gradient is None]
    for name in unreached:
        model.get_parameter(name).requires_grad_(False)
    return unreached


# --------------------------------------------------------------------------------------------------- step

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


# ------------------------------------------------------------------------------------------------- train

class TrainingStopped(Exception):
    """The run cannot go on (non-finite losses); the message says which checkpoint is kept and what to try."""


class StopRequest:
    """Ctrl-C (SIGINT) during training: the step in flight finishes, last.pt is written at that exact step, and
    the run exits; a second Ctrl-C stops at once. One process checks its flag between steps as a plain Python
    flag (no device sync). Under torchrun (which passes the Ctrl-C on to every process) see `agreed`."""

    def __init__(self, world_size, log_every, device):
        self.world_size, self.log_every, self.device = world_size, log_every, device

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)
        when = "this step" if self.world_size == 1 else "up to --log-every steps (all processes stop together)"
        tqdm.write(f"Ctrl-C: finishing {when}, then saving last.pt (Ctrl-C again to quit without saving)")

    def agreed(self, steps_done, steps_per_epoch):
        """Whether every process stops after this step. The signal reaches the processes at different steps,
        and one that stops while another starts the next step hangs both in a collective; so they agree with
        an all-reduce (max) of their flags, only at the steps where the loop syncs the host anyway: every
        --log-every steps and the epoch's last step. One process reads its own flag after every step."""
        if self.world_size == 1:
            return self.requested
        if steps_done != steps_per_epoch and not (self.log_every and steps_done % self.log_every == 0):
            return False
        flag = torch.tensor(float(self.requested), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def __exit__(self, *exception):
        signal.signal(signal.SIGINT, self.previous)


def test_signal(rank, world_size):
    """For the tests only: VKD_TEST_SIGNAL_AT_STEP=N:NAME (e.g. 12:SIGINT) makes the last process send itself
    that signal after global step N, so that an interruption lands at a known step however busy the machine,
    through the real handler. -> (step, signal) in that process, else None."""
    spec = os.environ.get("VKD_TEST_SIGNAL_AT_STEP")
    if spec is None or rank != world_size - 1:
        return None
    step, name = spec.split(":")
    return int(step), signal.Signals[name]


def check_finite(bad_steps, steps, epoch, amp, out, saved_epoch):
    """Non-finite loss or gradients. With fp16 the GradScaler already skipped those steps (and lowered its
    scale): they are only counted, unless they are most of the epoch. Otherwise the update has reached the
    weights, so the run stops here, before anything is saved, and the last good checkpoint stays as it is."""
    if bad_steps == 0 or (amp == "fp16" and bad_steps <= steps // 2):
        return
    kept = (f"{out}/last.pt keeps epoch {saved_epoch + 1}" if saved_epoch is not None
            else "no checkpoint had been written yet")
    raise TrainingStopped(f"non-finite loss or gradients in {bad_steps} of {steps} steps of epoch {epoch + 1}; stopped "
                          f"without saving them ({kept}). Try a lower --lr, --amp bf16 or off, and check the inputs")


def resume_args(args):
    """For --resume: the run's saved config (with --epochs/--stop-after of this command) and its last.pt."""
    last = Path(args.out) / "last.pt"
    if not last.exists():
        raise data.DataError(f"--resume: {last} does not exist; pass the --out of the run to continue")
    checkpoint = evaluate.read_checkpoint(last)
    saved = argparse.Namespace(**checkpoint["config"])
    saved.epochs = args.epochs or saved.epochs
    saved.stop_after, saved.resume = args.stop_after, True
    print(f"resuming {last} at epoch {checkpoint['epoch'] + 2}/{saved.epochs} with its saved config")
    return saved, checkpoint


def load_data(args, out, checkpoint, main_process=True):
    """Collection, tokenizer (trained on the training split's reports only) and the image cache.
    Only the main process writes splits.json and the tokenizer; under torchrun the others run this after it."""
    collection = data.prepare_from(vars(args))
    cache = data.image_cache(collection, args.image_size, args.strict)    # drops reports left without an image
    split_sha256 = data.split_hash(collection.split_ids)
    if checkpoint is not None and checkpoint["split_sha256"] != split_sha256:
        raise data.DataError(f"the data under {args.data_dir} now give a different split than {out}/last.pt "
                             f"was trained on; resume with the original data or start a new --out")
    if main_process:
        (out / "splits.json").write_text(json.dumps({"split_seed": args.split_seed} | collection.split_ids))
    tokenizer_path = out / "tokenizer.json"
    if checkpoint is None and main_process:
        train_reports = np.unique(collection.report_index[collection.splits["train"]])
        data.train_tokenizer([collection.reports[i].text for i in train_reports], args.vocab_size).save(
            str(tokenizer_path))
    tokenizer = data.load_tokenizer(tokenizer_path)
    return collection, split_sha256, tokenizer, cache


def train(args):
    """Train one run; under torchrun every process calls this, and rank 0 alone prints, logs, saves and evaluates.
    Returns the test metrics (rank 0 of a finished run) or None."""
    start_time = time.time()
    checkpoint = None
    if args.resume:
        args, checkpoint = resume_args(args)
    args.epochs = args.epochs or 12
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world_size, device = setup_distributed(args.device)
    main_process = rank == 0
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
    collection, split_sha256, tokenizer, cache = load_data(args, out, checkpoint, main_process)
    if main_process and world_size > 1:
        dist.barrier()
    train_idx, val_idx = collection.splits["train"], collection.splits["val"]
    if checkpoint is None:
        args.pixel_mean, args.pixel_std = pixel_statistics(cache, train_idx)
    images = place_images(cache, device, args.preload)                 # (N, S, S) uint8, on the device or memmap
    tokens = torch.from_numpy(data.sample_tokens(collection, tokenizer, args.max_len)).to(device)  # (N, T)
    labels = torch.from_numpy(collection.labels).to(device)                                   # (N, K), NaN kept
    truncated = (tokens[:, -1] != 0).float().mean().item()                                  # report filled max_len
    if truncated > 0.05 and main_process:
        print(f"warning: {truncated:.0%} of reports are cut at --max-len {args.max_len} tokens; consider a larger one")
    missing = [name for k, name in enumerate(collection.label_names) if np.nansum(collection.labels[train_idx, k]) == 0]
    if missing and not args.allow_missing_labels:
        raise data.DataError(f"no positive training image for {', '.join(missing)}: the model cannot learn "
                             f"{'it' if len(missing) == 1 else 'them'}. Use more data, another --split-seed, drop the "
                             f"label (--csv-labels), or pass --allow-missing-labels to train anyway")
    if missing and main_process:
        print(f"warning: no positive training image for {', '.join(missing)} (--allow-missing-labels)")
    steps_per_epoch = len(train_idx) // args.batch_size                                     # drop_last
    if steps_per_epoch == 0:
        raise data.DataError(f"{len(train_idx)} training images < --batch-size {args.batch_size}; lower it")

    model_config = VKDConfig(num_labels=len(collection.label_names), latent_dim=args.latent_dim, backbone=args.backbone,
                             cnn_width=args.cnn_width, vocab_size=tokenizer.get_vocab_size(), max_len=args.max_len,
                             text_dim=args.text_dim, text_layers=args.text_layers, dropout=args.dropout,
                             method=args.method)
    model = VKD(model_config, args.backbone_weights).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    total_steps = steps_per_epoch * args.epochs
    beta_warmup_steps = int(args.beta_warmup_epochs * steps_per_epoch)
    # the whole beta schedule as one device tensor: indexing it per step needs no host-to-device copy (a sync)
    # and, being a tensor, never makes torch.compile recompile for a new value
    betas = torch.tensor([beta_at(s, args.beta, beta_warmup_steps) for s in range(total_steps)], device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr_at(0, total_steps, args.lr, args.warmup_steps),
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                if amp != "off" else nullcontext())
    start_epoch, step, best_auroc = 0, 0, -math.inf
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, step, best_auroc = checkpoint["epoch"] + 1, checkpoint["step"], checkpoint["best_auroc"]
        set_rng_states(own_part(checkpoint["rng"], rank, world_size), device)
    probe = torch.zeros(2, 1, args.image_size, args.image_size, device=device)   # any input: the graph is the same
    untrained = freeze_unreached(model, probe, tokens[:2], labels[:2], args)
    # a checkpoint written on Ctrl-C is part-way through epoch start_epoch: the steps it has done are skipped
    interrupted = checkpoint.get("interrupted") if checkpoint is not None else None
    # `model` stays the plain module (saved, evaluated, clipped); `forward` is what the step calls
    forward = torch.compile(model) if args.compile else model
    if world_size > 1:
        forward = DistributedDataParallel(forward, device_ids=[device] if device.type == "cuda" else None)
    config = vars(args)
    run_record = {"config": config, "environment": environment(device), "model": describe(model),
                  "split_sha256": split_sha256,
                  "data": collection.summary, "amp": amp, "world_size": world_size,
                  "preloaded": torch.is_tensor(images), "untrained_parameters": untrained}
    if main_process:
        (out / "run.json").write_text(json.dumps(run_record, indent=1))
        skipped = ", ".join(f"{reason} {n}" for reason, n in collection.summary["skipped"].items() if n)
        print(f"{args.method} on {args.data}: {collection.summary['reports_used']} of {collection.summary['reports']} "
              f"reports used (skipped: {skipped or 'none'}); {len(train_idx)} train / {len(val_idx)} val images, "
              f"{steps_per_epoch} steps/epoch, device {device} x {world_size}, amp {amp}, images "
              f"{'preloaded' if torch.is_tensor(images) else 'streamed'}; {describe(model)}")
        log_lines = (out / "log.jsonl").read_text().splitlines()[:start_epoch] if checkpoint is not None else []
        log = open(out / "log.jsonl", "w")             # a resumed run keeps the epochs its checkpoint has seen
        log.writelines(line + "\n" for line in log_lines)
    end_epoch = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    first_step = step
    saved_epoch = start_epoch - 1 if checkpoint is not None else None

    def checkpoint_state(epoch, rng, **extra):
        """last.pt / best.pt: a plain dict of tensors and numbers (loadable with weights_only=True); `rng` holds
        every process's RNG states (gather_to_main): each draws its own latent noise and dropout masks."""
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "step": step, "best_auroc": best_auroc, "config": config,
                "model_config": vars(model_config), "tokenizer": "tokenizer.json", "split_sha256": split_sha256,
                "label_names": collection.label_names, "rng": rng} | extra

    signal_at = test_signal(rank, world_size)
    with StopRequest(world_size, args.log_every, device) as stop:
        for epoch in range(start_epoch, end_epoch):
            # Shuffle and augmentation draw from their own generators of (seed, epoch): a resumed run repeats them
            order = epoch_order(train_idx, args.seed, epoch, args.batch_size, rank, world_size).to(device)
            augment_rng = epoch_generator(args.seed, epoch, AUGMENT, device) if not args.no_augment else None
            sums = torch.zeros(5, device=device)      # loss parts and non-finite steps, summed on the device: no sync
            done = 0                                  # steps of this epoch already taken
            if interrupted is not None:
                done, sums = interrupted["steps_done"], own_part(interrupted["sums"], rank, world_size).to(device)
                if augment_rng is not None:
                    augment_rng.set_state(interrupted["augment_rng"])
                interrupted = None
            epoch_batches = (batches if torch.is_tensor(images) else streamed_batches)(
                images, tokens, labels, order[done * (args.batch_size // world_size):], args.batch_size // world_size)
            model.train()
            epoch_start = time.time()
            bar = tqdm(epoch_batches, total=steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{args.epochs}",
                       leave=False, unit="step", disable=not main_process)
            for i, (x, t, y) in enumerate(bar, start=done):
                x = model_input(x, args.pixel_mean, args.pixel_std, augment_rng, rank, world_size, args.channels_last)
                parts = train_step(model, forward, optimizer, scaler, autocast, x, t, y, betas[step], args)
                step += 1
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total_steps, args.lr, args.warmup_steps)
                sums += torch.stack([parts[k].detach().float() for k in ("loss", "bce_posterior", "bce_prior", "kl")]
                                    + [~(parts["loss"].isfinite() & parts["grad_norm"].isfinite())])
                if step == first_step + 1:
                    synchronize(device)
                    run_record["first_step_s"] = time.time() - epoch_start      # includes compilation with --compile
                    run_record["time_to_first_step_s"] = time.time() - start_time
                if args.log_every and (i + 1) % args.log_every == 0:          # the one host sync every N steps
                    bar.set_postfix(loss=f"{sums[0].item() / (i + 1):.3f}")
                if signal_at is not None and step == signal_at[0]:
                    signal.raise_signal(signal_at[1])
                if stop.agreed(i + 1, steps_per_epoch):  # exactly where this epoch stands, to continue from here
                    rng, own_sums = (gather_to_main(part, world_size) for part in (rng_states(device), sums.cpu()))
                    if main_process:
                        save_checkpoint(out / "last.pt", checkpoint_state(epoch - 1, rng, interrupted={
                            "steps_done": i + 1, "sums": own_sums,
                            "augment_rng": augment_rng.get_state() if augment_rng is not None else None}))
                        log.close()
                        print(f"\ninterrupted at step {i + 1}/{steps_per_epoch} of epoch {epoch + 1}; saved "
                              f"{out}/last.pt. Continue with: {resume_command(out, world_size)}")
                    finish_distributed(world_size)
                    raise KeyboardInterrupt
            if world_size > 1:
                dist.all_reduce(sums)                          # loss parts averaged over all processes' batches
            loss, bce_posterior, bce_prior, kl = (sums[:4] / (steps_per_epoch * world_size)).tolist()
            bad_steps = int(sums[4].item())
            check_finite(bad_steps, steps_per_epoch * world_size, epoch, amp, out, saved_epoch)
            train_time = time.time() - epoch_start
            rng = gather_to_main(rng_states(device), world_size)
            lr = lr_at(step - 1, total_steps, args.lr, args.warmup_steps)      # the rate the last step used
            if not main_process:
                continue

            p, _ = evaluate.predict(model, images, tokens, val_idx, config, device)
            val_auroc = auroc_summary(collection.labels[val_idx], p)["macro"]
            beta = betas[step - 1].item() if args.method == "vkd" else None        # image, text: no KL term
            record = {"epoch": epoch + 1, "step": step, "loss": loss, "bce_posterior": bce_posterior,
                      "bce_prior": bce_prior, "kl": kl, "beta": beta, "lr": lr,
                      "val_macro_auroc": val_auroc, "images_per_s": steps_per_epoch * args.batch_size / train_time,
                      "epoch_s": time.time() - epoch_start, "nonfinite_steps": bad_steps}
            tqdm.write(f"epoch {epoch + 1:3d} step {step:6d} | loss {loss:7.3f} (bce_q {bce_posterior:.3f} "
                       f"bce_p {bce_prior:.3f} kl {kl:7.3f}) | beta {format_beta(beta)} | lr {lr:.2e} | "
                       f"val macro AUROC {val_auroc:.4f} | {record['images_per_s']:.0f} img/s | "
                       f"{record['epoch_s']:.1f}s")
            if epoch == start_epoch and args.compile:
                tqdm.write(f"torch.compile: the first step took {run_record['first_step_s']:.1f}s, "
                           f"compilation included")
            log.write(json.dumps(record) + "\n")
            log.flush()

            # best by validation macro AUROC; an undefined AUROC (no label with both classes) never wins,
            # but the first epoch is always saved so that best.pt exists
            score = -math.inf if math.isnan(val_auroc) else val_auroc
            is_best = score > best_auroc or not (out / "best.pt").exists()
            best_auroc = max(best_auroc, score)
            state = checkpoint_state(epoch, rng, val_macro_auroc=val_auroc)
            if is_best:
                save_checkpoint(out / "best.pt", state)
            save_checkpoint(out / "last.pt", state)
            saved_epoch = epoch
    if main_process:
        log.close()
        if end_epoch < args.epochs:
            print(f"stopped after epoch {end_epoch}/{args.epochs}; continue with: {resume_command(out, world_size)}")
    if end_epoch < args.epochs or not main_process:
        finish_distributed(world_size)
        return None

    metrics = evaluate_best(out, collection, images, tokens, config, device, args.bootstrap)
    metrics |= {"method": args.method, "wall_s": time.time() - start_time}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    run_record["metrics"], run_record["wall_s"] = metrics, metrics["wall_s"]
    (out / "run.json").write_text(json.dumps(run_record, indent=1))
    print(evaluate.format_metrics(metrics, f"test AUROC of {out / 'best.pt'} (best val epoch {metrics['best_epoch']})"))
    print(f"wall time {metrics['wall_s']:.0f}s; results in {out}/")
    finish_distributed(world_size)
    return metrics


def resume_command(out, world_size):
    """A run continues with as many processes as it had (each resumes its own random draws)."""
    launcher = "python" if world_size == 1 else f"torchrun --standalone --nproc_per_node {world_size}"
    return f"{launcher} train.py --out {out} --resume"


def format_beta(beta):
    """The KL weight for the epoch line; '-' for the methods whose loss has no KL term (image, text)."""
    return "-" if beta is None else f"{beta:.3f}"


def evaluate_best(out, collection, images, tokens, config, device, num_resamples):
    """The test split is touched once, with the checkpoint chosen on validation."""
    model, checkpoint = evaluate.load_checkpoint(out / "best.pt", device)
    test_idx = collection.splits["test"]
    p, _ = evaluate.predict(model, images, tokens, test_idx, config, device)
    metrics = evaluate.metrics_report(collection.labels[test_idx], p, collection.bootstrap_groups[test_idx],
                                      num_resamples, label_names=collection.label_names, unit=collection.bootstrap_unit)
    return metrics | {"best_epoch": checkpoint["epoch"] + 1}


def run_recipe(args):
    """--method all and/or --seeds: train each method for each seed on the same split (--split-seed), each in
    <out>/<data>-<method>-seed<seed>, then compare them on the test split with evaluate.py (the image baseline
    first, so that every difference reads 'method - image'). Writes <out>/<data>-comparison.json."""
    if args.resume:
        raise data.DataError("--resume continues one run: pass its --out and --method instead of --method all/--seeds")
    methods = ("image", "vkd", "text") if args.method == "all" else (args.method,)
    seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else [args.seed]
    root = Path(args.out or "runs")
    checkpoints, other_process = [], int(os.environ.get("RANK", "0")) > 0
    for seed in seeds:
        for method in methods:
            out = root / f"{args.data}-{method}-seed{seed}"
            if not other_process:
                print(f"\n=== {method}, seed {seed} -> {out}")
            metrics = train(argparse.Namespace(**vars(args) | {"method": method, "seed": seed, "out": str(out)}))
            if metrics is None and not other_process:
                return None                                   # stopped early (--stop-after)
            checkpoints.append(out / "best.pt")
    if other_process:
        return None                                           # under torchrun, process 0 compares
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    result, _ = evaluate.compare_checkpoints(checkpoints, device, num_resamples=args.bootstrap, seed=0)
    (root / f"{args.data}-comparison.json").write_text(json.dumps(result, indent=1))
    print(f"\n{len(methods)} method(s) x {len(seeds)} seed(s) on {args.data}, split seed {args.split_seed}\n")
    print(format_comparison(result))
    return result


def main():
    try:
        args = get_args()
        if args.method == "all" or args.seeds:
            run_recipe(args)
        else:
            train(args)
    except (data.DataError, TrainingStopped) as error:
        sys.exit(f"error: {error}")
    except torch.cuda.OutOfMemoryError:
        sys.exit(f"error: the device ran out of memory at --batch-size {args.batch_size}; try --batch-size "
                 f"{max(1, args.batch_size // 2)}, a smaller --image-size, or --preload no (the image cache then "
                 f"stays in host memory)")
    except KeyboardInterrupt:
        sys.exit(130)                             # the message (and last.pt, when saved) came from train()


if __name__ == "__main__":
    main()
