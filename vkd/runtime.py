"""Runtime helpers for train.py: processes, random states, checkpoints on disk, interruption, what
a run prints and records. A student can skip this file: train.py calls each of these by name.

    Processes                    this process among the run's (1, or N under torchrun), its device
                                 and autocast mode; every collective train.py uses
    save_checkpoint, write_text  atomic writes: a crash or a full disk never leaves half a file (an
                                 error names the path and the free space)
    read_checkpoint              a read that never runs code (weights_only=True) and refuses what
                                 train.py did not write
    resume_args, restore         --resume: the run's saved options, then its saved state
    StopRequest                  Ctrl-C or SIGTERM: stop at an exact step, all processes together,
                                 save it, and resume from it exactly
    FolderLock                   one run per --out folder
    RunLog                       run.json, one line per epoch printed and in log.jsonl, metrics.json
    check_finite                 stop before saving a non-finite update
"""
import argparse
import atexit
import json
import os
import platform
import signal
import sys
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

try:
    import fcntl                      # file locks (POSIX)
except ImportError:
    fcntl = None

from model import LOSS_PARTS
from vkd.reports import DataError, save_atomically, write_error


# ------------------------------------------------------------------------------------- processes

def setup_distributed(device_name):
    """-> (rank, world_size, device). Under torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK) join
    the process group, NCCL on GPUs and gloo on CPUs, one GPU per process; a plain `python train.py`
    is rank 0 of 1 and runs the same code with no process group.

    The group is created once per process and destroyed when the process exits, because one process
    may train several runs (--method all, --seeds); each run ends at a barrier
    (Processes.finish)."""
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


@dataclass
class Processes:
    """This process among the run's: rank of world_size (1 for `python train.py`, N under
    torchrun), its device, and the autocast mode there (bf16, fp16 or off). Process 0, the main
    one, alone prints, logs, saves and evaluates. Every collective that train.py uses is a method
    here, and each does nothing for a single process."""
    rank: int
    world_size: int
    device: torch.device
    amp: str = "off"

    @property
    def main(self):
        return self.rank == 0

    @classmethod
    def start(cls, args):
        """The processes (setup_distributed), the autocast mode (--amp auto: bf16 on CUDA, off on
        a CPU), this process's seed and the GPU's kernels."""
        rank, world_size, device = setup_distributed(args.device)
        amp = args.amp
        if amp == "auto":
            amp = "bf16" if device.type == "cuda" else "off"
        if amp == "fp16" and device.type != "cuda":
            raise DataError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or off")
        if args.batch_size % world_size:
            raise DataError(f"--batch-size {args.batch_size} must be divisible by the "
                            f"{world_size} processes")
        # dropout and latent samples differ between processes; DDP gives all rank 0's weights
        torch.manual_seed(args.seed + rank)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True        # cuDNN picks kernels for our fixed shapes
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        return cls(rank, world_size, device, amp)

    @contextmanager
    def main_first(self):
        """Process 0 runs the block first (it draws or reads the data and writes the tokenizer),
        then the others, which read what it wrote."""
        if self.rank > 0:
            dist.barrier()
        yield
        if self.rank == 0 and self.world_size > 1:
            dist.barrier()

    def sum(self, tensor):
        """The tensor added up over the processes, in place (one all-reduce)."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def gather(self, value):
        """[value of process 0, value of process 1, ...]: what each process must get back on
        --resume (its RNG states, its loss sums), collected for process 0 to save. One small
        collective, at a checkpoint only."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def own(self, saved):
        """This process's entry of a per-process list that a checkpoint holds (gather)."""
        if len(saved) != self.world_size:
            raise DataError(f"the checkpoint was written by {len(saved)} process(es): resume it "
                            f"with as many (torchrun --nproc_per_node {len(saved)}), so that each "
                            f"continues its own random draws")
        return saved[self.rank]

    def rng_states(self):
        """Every process's RNG states, for process 0 to save: each resumes its own draws."""
        return self.gather(rng_states(self.device))

    def finish(self):
        """Every process waits here for rank 0 (still evaluating and saving) before the run is
        over."""
        if self.world_size > 1:
            dist.barrier()


def synchronize(device):
    """Wait for the device's queued work; used only where a time is read, never inside the step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------- random states, checkpoints

def rng_states(device):
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states, device):
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def save_checkpoint(path, checkpoint):
    """Write to a temporary file, then rename: a crash or a full disk mid-write never leaves a
    truncated checkpoint, and the one written before stays whole. torch.save reports a full disk
    as a RuntimeError ("unexpected pos"), not as an OSError."""
    save_atomically(path, lambda tmp: torch.save(checkpoint, tmp), (OSError, RuntimeError))


def write_text(path, text):
    """A whole text file (run.json, metrics.json, splits.json, the tokenizer), written as
    save_checkpoint writes: a temporary file beside it, then a rename."""
    save_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def resume_command(out, world_size):
    """A run continues with as many processes as it had (each resumes its own random draws)."""
    launcher = ("python" if world_size == 1
                else f"torchrun --standalone --nproc_per_node {world_size}")
    return f"{launcher} train.py --out {out} --resume"


CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "epoch", "step", "best_auroc", "config",
                   "model_config", "split_sha256", "label_names", "rng")


def read_checkpoint(path, device="cpu"):
    """The plain dict of a checkpoint written by train.py. torch.load(weights_only=True) unpickles
    tensors, numbers, strings and containers only: a file that would run code is refused, and so
    is one that is empty, truncated, not a checkpoint, or a checkpoint of another program (a
    DataError naming the file and what is wrong; the file is never touched)."""
    if not Path(path).is_file():
        raise DataError(f"{path} does not exist")
    if Path(path).stat().st_size == 0:
        raise DataError(f"{path} was refused: the file is empty (a write that never finished?)")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:        # torch.load raises many kinds: pickle, zip, EOF, Runtime
        why = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"{path} was refused: not a whole checkpoint of plain tensors and "
                        f"numbers as train.py writes them ({why})") from error
    missing = [key for key in CHECKPOINT_KEYS
               if not isinstance(checkpoint, dict) or key not in checkpoint]
    if not missing:                   # the two configs must be dicts of options
        missing = [key for key in ("config", "model_config")
                   if not isinstance(checkpoint[key], dict)]
    if missing:
        raise DataError(f"{path} was refused: not a checkpoint of this project's train.py "
                        f"(missing: {', '.join(missing)})")
    return checkpoint


def resume_args(args):
    """For --resume: the run's saved config (with --epochs/--stop-after of this command) and its
    last.pt."""
    last = Path(args.out) / "last.pt"
    if not last.exists():
        raise DataError(f"--resume: {last} does not exist; pass the --out of the run to continue")
    checkpoint = read_checkpoint(last)
    saved = argparse.Namespace(**checkpoint["config"])
    missing = sorted(set(vars(args)) - set(vars(saved)))
    if missing:
        raise DataError(f"{last} was written by another version of train.py (its config lacks "
                        f"{', '.join(missing)}); start a new run")
    saved.epochs = args.epochs or saved.epochs
    # the folder given now: a run folder that was moved or copied continues where it is
    saved.out, saved.stop_after, saved.resume = args.out, args.stop_after, True
    if int(os.environ.get("RANK", "0")) == 0:          # under torchrun: process 0 says it
        print(f"resuming {last} at epoch {checkpoint['epoch'] + 2}/{saved.epochs} "
              f"with its saved config")
    return saved, checkpoint


class RunLog:
    """What a run tells its user, all from process 0 (the others get a log that does nothing):
    run.json at the start (the resolved config, the machine, the model, the data), one line per
    epoch printed and appended to log.jsonl (EpochLog), and at the end metrics.json, with run.json
    written again to hold the metrics. A resumed run keeps the log lines of the epochs its
    checkpoint has seen."""

    def __init__(self, run):
        self.run, self.main = run, run.procs.main
        if not self.main:
            return
        self.record = {"config": vars(run.args), "environment": environment(run.procs.device),
                       "model": describe(run.model), "split_sha256": run.split_sha256,
                       "data": run.collection.summary, "amp": run.procs.amp,
                       "world_size": run.procs.world_size,
                       "preloaded": torch.is_tensor(run.images),
                       "untrained_parameters": run.untrained}
        write_text(run.out / "run.json", json.dumps(self.record, indent=1))
        print(run_line(run))
        self.lines = EpochLog(run.out / "log.jsonl", run.start_epoch)

    def first_step(self, epoch_start):
        """The run's first step: its time and the time from the start (compilation included).
        Once per run, a host sync."""
        if not self.main or "first_step_s" in self.record:
            return
        synchronize(self.run.procs.device)
        self.record["first_step_s"] = time.time() - epoch_start
        self.record["time_to_first_step_s"] = time.time() - self.run.start_time

    def epoch(self, record, epoch):
        """The epoch's line (epoch_line), printed and appended to log.jsonl."""
        if self.main:
            tqdm.write(epoch_line(record, self.run, epoch, self.record))
            self.lines.write(record)

    def finish(self, metrics):
        """metrics.json, and run.json again with the metrics and the wall time."""
        write_text(self.run.out / "metrics.json", json.dumps(metrics, indent=1))
        self.record |= {"metrics": metrics, "wall_s": metrics["wall_s"]}
        write_text(self.run.out / "run.json", json.dumps(self.record, indent=1))

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        if self.main:
            self.lines.__exit__(*exception)


class EpochLog:
    """log.jsonl: one JSON line per epoch, flushed as it is written. The lines kept on --resume
    are rewritten atomically (write_text), so a full disk cannot lose them; a line that cannot be
    appended is a DataError (write_error), and --resume later keeps only whole epochs."""

    def __init__(self, path, keep_epochs):
        self.path = path
        kept = path.read_text().splitlines()[:keep_epochs] if keep_epochs else []
        write_text(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a")

    def write(self, record):
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as error:
            raise write_error(self.path, error) from error

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        try:
            self.file.close()
        except OSError:
            pass                          # the write that failed has raised already


# --------------------------------------------------------------------------------- what is trained

def freeze_unreached(model, t, y, args):
    """Parameters that the method's loss never reaches get requires_grad=False; returns their names.

    `text` trains the posterior path only, so the prior head p(z|x) gets no gradient. DDP waits for
    a gradient of every parameter that requires one and fails at the second step ("Expected to have
    finished reduction in the prior iteration"); its find_unused_parameters=True would search the
    graph after every step instead. Found once by one probe backward in eval mode (BatchNorm
    statistics untouched) with the RNG restored afterwards (the run's draws unchanged). AdamW
    skipped these parameters already (no gradient), so one process trains exactly as before, and DDP
    now leaves them out."""
    # any image: the same graph
    x = torch.zeros(len(t), 1, args.image_size, args.image_size, device=t.device)
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


# ------------------------------------------------------------------------- interruption and failure

class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (what SLURM and Kubernetes send before they stop a job) during
    training: the step in flight finishes, last.pt is written at that exact step (`save`), and the
    run exits with 128 + the signal's number (130, 143); a second signal stops at once; --resume
    continues that epoch where it stopped (`resume_point`). One process checks its flag between
    steps as a plain Python value (no device sync). Under torchrun (which passes the signal on to
    every process) see `agreed`."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, run):
        self.procs, self.log_every = run.procs, run.args.log_every
        self.world_size = run.procs.world_size
        self.interrupted = run.interrupted      # where an earlier stop left the run, or None
        self.signal_at = test_signal(run.procs.rank, run.procs.world_size)

    def __enter__(self):
        self.signum = 0                       # the signal received; 0: none
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        if self.signum:                   # a repeat: torchrun passes on a signal its group got
            return
        self.signum = signum
        # a second Ctrl-C quits at once; a second SIGTERM is ignored (the job's own signal may
        # reach every process twice, through torchrun)
        signal.signal(signal.SIGINT, self.previous[signal.SIGINT])
        when = ("this step" if self.world_size == 1
                else "up to --log-every steps (all processes stop together)")
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self.procs.main:
            tqdm.write(f"{name}: finishing {when}, then saving last.pt "
                       f"(Ctrl-C to quit without saving)")

    def restore(self):
        for s, previous in self.previous.items():
            signal.signal(s, previous)

    def interrupt(self):
        """The exception that ends the run after last.pt is saved: a KeyboardInterrupt holding
        the signal's number, which train.main turns into the exit status."""
        return KeyboardInterrupt(self.signum)

    def agreed(self, steps_done, steps_per_epoch, step):
        """Whether every process stops after this step (`steps_done` of this epoch, global `step`).
        The signal reaches the processes at different steps, and one that stops while another starts
        the next step hangs both in a collective; so they agree with an all-reduce (max) of their
        flags, only at the steps where the loop syncs the host anyway: every --log-every steps and
        the epoch's last step. One process reads its own flag after every step."""
        # tests only: see test_signal
        if self.signal_at is not None and step == self.signal_at[0]:
            # the handler runs before this returns
            signal.raise_signal(self.signal_at[1])
        if self.world_size == 1:
            return self.signum > 0
        if steps_done != steps_per_epoch and not (self.log_every
                                                  and steps_done % self.log_every == 0):
            return False
        # the largest signal number over the processes: each then exits with the same status
        flag = torch.tensor(float(self.signum), device=self.procs.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = int(flag.item())
        return self.signum > 0

    def __exit__(self, *exception):
        self.restore()

    def resume_point(self, run):
        """Where an epoch starts: (steps done, loss sums (parts + 1,) on the device, the
        augmentation generator's state): where an earlier stop left it (the checkpoint resumed;
        used once, by the first epoch), else (0, zeros, None). The sums hold the method's loss
        parts and the non-finite steps."""
        interrupted, self.interrupted = self.interrupted, None
        device = run.procs.device
        if interrupted is None:
            return 0, torch.zeros(len(LOSS_PARTS[run.args.method]) + 1, device=device), None
        sums = run.procs.own(interrupted["sums"]).to(device)
        return interrupted["steps_done"], sums, interrupted["augment_rng"]

    def save(self, run, epoch, steps_done, sums, augment_rng, checkpoint_state):
        """last.pt at the exact step, with the loss sums and the augmentation generator of the
        epoch so far, so that --resume ends exactly as the uninterrupted run would (resume_point).
        `checkpoint_state` is train.checkpoint_state."""
        rng = run.procs.rng_states()
        own_sums = run.procs.gather(sums.cpu())
        if run.procs.main:
            augment_state = augment_rng.get_state() if augment_rng is not None else None
            interrupted = {"steps_done": steps_done, "sums": own_sums, "augment_rng": augment_state}
            state = checkpoint_state(run, epoch - 1, rng, interrupted=interrupted)
            save_checkpoint(run.out / "last.pt", state)
            print(f"\ninterrupted at step {steps_done}/{run.steps_per_epoch} of epoch "
                  f"{epoch + 1}; saved {run.out}/last.pt. Continue with: "
                  f"{resume_command(run.out, run.procs.world_size)}")
        run.procs.finish()


class FolderLock:
    """One run per folder: process 0 holds an exclusive lock on <out>/.lock (fcntl.flock) while the
    run trains, so that a second run or a resume of the same --out (a job submitted twice, a
    second terminal) refuses at once, naming the process that holds it. The operating system
    drops the lock when its process ends, however it ends: a lock left by a killed run or a
    rebooted machine never blocks. Without fcntl (Windows) there is no lock."""

    def __init__(self, out):
        self.path, self.handle = Path(out) / ".lock", None
        main = int(os.environ.get("RANK", "0")) == 0             # under torchrun: process 0
        self.main = main and fcntl is not None

    def __enter__(self):
        if not self.main:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "a+")
        except OSError as error:
            raise write_error(self.path, error) from error
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if not isinstance(error, BlockingIOError):   # e.g. NFS without a lock daemon
                print(f"warning: {self.path.parent} cannot be locked ({error.strerror}); make "
                      f"sure no other run uses it", file=sys.stderr)
                return self
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise DataError(f"{self.path.parent} is in use by another run ({holder}); wait for it "
                            f"to end, or give this run another --out") from None
        try:
            self.handle.seek(0)
            self.handle.truncate()
            self.handle.write(f"process {os.getpid()} on {platform.node()}")
            self.handle.flush()
        except OSError as error:
            self.handle.close()
            raise write_error(self.path, error) from error
        return self

    def __exit__(self, *exception):
        if self.handle is not None:
            self.handle.close()               # closing the file releases the lock


def test_signal(rank, world_size):
    """For the tests only: VKD_TEST_SIGNAL_AT_STEP=N:NAME (e.g. 12:SIGINT) makes the last process
    send itself that signal after global step N, so that an interruption lands at a known step
    however busy the machine, through the real handler. -> (step, signal) in that process, else
    None."""
    spec = os.environ.get("VKD_TEST_SIGNAL_AT_STEP")
    if spec is None or rank != world_size - 1:
        return None
    step, name = spec.split(":")
    return int(step), signal.Signals[name]


class TrainingStopped(DataError):
    """The run cannot go on (non-finite losses); the message says which checkpoint is kept and what
    to try. A DataError, so that it ends in one `error:` line as bad data does."""


def check_finite(run, epoch, bad_steps):
    """Non-finite loss or gradients in `bad_steps` steps of the epoch, over all processes. With
    fp16 the GradScaler already skipped those steps (and lowered its scale): they are only counted,
    unless they are most of the epoch. Otherwise the update has reached the weights, so the run
    stops here, before anything is saved, and the last good checkpoint stays as it is."""
    steps = run.steps_per_epoch * run.procs.world_size
    if bad_steps == 0 or (run.procs.amp == "fp16" and bad_steps <= steps // 2):
        return
    kept = (f"{run.out}/last.pt keeps epoch {run.saved_epoch + 1}"
            if run.saved_epoch is not None else "no checkpoint had been written yet")
    raise TrainingStopped(f"non-finite loss or gradients in {bad_steps} of {steps} steps of epoch "
                          f"{epoch + 1}; stopped without saving them ({kept}). Try a lower --lr, "
                          f"--amp bf16 or off, and check the inputs")


# -------------------------------------------------------------------------------------- environment

def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout
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
    """What a reader needs to rerun this: the code (commit, and whether it had uncommitted changes),
    the library versions and the hardware."""
    import PIL
    import tokenizers
    import torchvision
    return {"git_commit": git("rev-parse", "HEAD").strip() or None,
            "git_uncommitted_changes": bool(git("status", "--porcelain",
                                                "--untracked-files=no").strip()),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "tokenizers": tokenizers.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "cpu": cpu_name()} | numerics()


def numerics():
    """What else decides the exact floating-point results of the same command: the threads (a sum
    split over more threads is added in another order), the torch build and the kernels it picks
    (CPU vector instructions, CUDA/cuDNN versions), and the determinism settings."""
    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "torch_git_version": torch.version.git_version,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32}


# --------------------------------------------------------------------- what train.py calls by name

def restore(run, checkpoint):
    """A resumed run's weights, optimizer, scaler, progress (and where a stop signal left its epoch:
    run.interrupted) and this process's RNG states; then the parameters the method never trains are
    frozen (run.untrained, their names) and the model is wrapped for the step: compiled
    (--compile), in DistributedDataParallel (torchrun)."""
    if checkpoint is not None:
        try:
            run.model.load_state_dict(checkpoint["model"])
            run.optimizer.load_state_dict(checkpoint["optimizer"])
            run.scaler.load_state_dict(checkpoint["scaler"])
            set_rng_states(run.procs.own(checkpoint["rng"]), run.procs.device)
        except (RuntimeError, ValueError, KeyError, TypeError) as error:   # another version's
            raise DataError(f"{run.out}/last.pt does not fit this model.py and its options "
                            f"({str(error).splitlines()[0][:200]})") from error
        run.start_epoch, run.step = checkpoint["epoch"] + 1, checkpoint["step"]
        run.best_auroc, run.saved_epoch = checkpoint["best_auroc"], checkpoint["epoch"]
        run.interrupted = checkpoint.get("interrupted")
    run.untrained = freeze_unreached(run.model, run.tokens[:2], run.labels[:2], run.args)
    run.forward = torch.compile(run.model) if run.args.compile else run.model
    if run.procs.world_size > 1:              # gradients averaged over the processes in backward
        device = run.procs.device
        devices = [device] if device.type == "cuda" else None           # one GPU each, or CPUs
        run.forward = DistributedDataParallel(run.forward, device_ids=devices)


def run_line(run):
    """What is trained on what, printed once at the start of a run."""
    where = "preloaded" if torch.is_tensor(run.images) else "streamed"
    procs = run.procs
    return (f"{run.args.method} on {run.args.data}: {usage(run.collection)}, "
            f"{run.steps_per_epoch} steps/epoch, device {procs.device} x {procs.world_size}, "
            f"amp {procs.amp}, images {where}; {describe(run.model)}")


def usage(collection):
    """'562 of 600 reports used (skipped: no_text 8, ...); 781 train / 121 val images'."""
    summary = collection.summary
    skipped = ", ".join(f"{reason} {n}" for reason, n in summary["skipped"].items() if n)
    return (f"{summary['reports_used']} of {summary['reports']} reports used (skipped: "
            f"{skipped or 'none'}); {len(collection.splits['train'])} train / "
            f"{len(collection.splits['val'])} val images")


SHORT = {"bce_posterior": "bce_q", "bce_prior": "bce_p", "kl": "kl", "distill": "distill",
         "contrastive": "nce"}                   # the loss parts' names in the log line


def epoch_line(record, run, epoch, run_record):
    """The one log line of an epoch (and, after the first epoch with --compile, its first step's
    time from `run_record`, RunLog's). An epoch that a resumed run enters at its last step runs no
    step: no images/s, and no first step."""
    r, beta, rate = record, record["beta"], record["images_per_s"]
    parts = " ".join(f"{SHORT[name]} {r[name]:{'7.3f' if name == 'kl' else '.3f'}}"
                     for name in LOSS_PARTS[run.args.method][1:])
    line = (f"epoch {r['epoch']:3d} step {r['step']:6d} | loss {r['loss']:7.3f} ({parts}) | "
            f"beta {'-' if beta is None else f'{beta:.3f}'} | lr {r['lr']:.2e} | "
            f"val macro AUROC {r['val_macro_auroc']:.4f} | "
            f"{'-' if rate is None else f'{rate:.0f}'} img/s | {r['epoch_s']:.1f}s")
    if epoch == run.start_epoch and run.args.compile and "first_step_s" in run_record:
        line += (f"\ntorch.compile: the first step took {run_record['first_step_s']:.1f}s, "
                 f"compilation included")
    return line


def describe(model):
    """Parameter counts, e.g. 'image encoder 0.49M, text encoder 0.23M, total 0.81M'."""
    parts = {"image encoder": model.image_encoder, "text encoder": model.text_encoder}
    counts = [f"{name} {count_parameters(m) / 1e6:.2f}M"
              for name, m in parts.items() if m is not None]
    return ", ".join(counts + [f"total {count_parameters(model) / 1e6:.2f}M"])


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())
