"""Speed benchmark: the cached data path against decoding PNGs every epoch, and the real training
loop against the model alone. A script, not a test (pytest does not collect it); timings never go
into assertions.

    python tests/benchmark.py                        # about 1-2 minutes on a 2-core CPU
    python tests/benchmark.py --json benchmark.json  # also write every figure as JSON

Everything runs in one process. The variants are interleaved over --rounds rounds and compared
round by round: each ratio is a median of per-round (paired) ratios with its min-max, and an A-vs-A
pair (the same variant measured twice in a round) shows the noise floor. Measured here:
  - loader images/s: the preprocessing cache (memory-mapped, read by batching.streamed_batches; and
    preloaded into device memory with augmentation, batching.batches) against decoding full-size
    8-bit PNGs and resizing them in a torch Dataset with DataLoader workers, as most chest X-ray
    code does every epoch;
  - training images/s of the model alone (random data already on the device, train.train_step)
    against end to end through the loop's own functions (epoch_order, batches, model_input,
    train_step, the schedule): their ratio is the loop efficiency;
  - time to first step, epoch time at OpenI size, peak memory; TFLOP/s from
    torch.utils.flop_counter, and on CUDA the MFU against the card's dense bf16 peak, with a
    torchvision resnet50 at 224 px as calibration.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from model import VKD, VKDConfig  # noqa: E402
from vkd import (
    batching,  # noqa: E402
    runtime,  # noqa: E402
)

PIXEL_MEAN, PIXEL_STD = 0.45, 0.25
OPENI_IMAGES = 7_300
# dense (no sparsity) bf16 tensor-core peak in TFLOP/s,
# matched against the device name in this order
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
                    ("L4", 121.0)]


def get_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    add("--method", default="vkd", choices=["vkd", "image", "text"],
        help="what the model trains (default: vkd)")
    add("--image-size", type=int, default=None,
        help="cached image side (default: 128 on CPU, 256 on CUDA)")
    add("--batch-size", type=int, default=None,
        help="images per step (default: 64 on CPU, 256 on CUDA)")
    add("--steps", type=int, default=None,
        help="training steps per measurement (default: 6 on CPU, 50 on CUDA)")
    add("--rounds", type=int, default=5,
        help="rounds of interleaved measurements, after one warm-up round (default: 5)")
    add("--amp", default="auto", choices=["auto", "bf16", "off"],
        help="auto = bf16 on CUDA, off on CPU (default: auto)")
    add("--channels-last", action="store_true",
        help="channels_last model and inputs (default: off)")
    add("--png-images", type=int, default=12, help="generated PNGs decoded per round (default: 12)")
    add("--png-size", type=int, default=2048, help="side of the generated PNGs (default: 2048)")
    add("--workers", type=int, default=2,
        help="DataLoader workers of the PNG baseline (default: 2)")
    add("--loader-batches", type=int, default=40,
        help="batches per cached-loader measurement (default: 40)")
    add("--json", default=None, help="write all figures to this JSON file (default: none)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device.startswith("cuda")
    args.device = torch.device(("cuda" if cuda else "cpu") if args.device == "auto"
                               else args.device)
    args.image_size = args.image_size or (256 if cuda else 128)
    args.batch_size = args.batch_size or (256 if cuda else 64)
    args.steps = args.steps or (50 if cuda else 6)
    args.amp = ("bf16" if cuda else "off") if args.amp == "auto" else args.amp
    return args


# -------------------------------------------------------------------------------------------- data

def write_pngs(folder, count, size, seed=0):
    """Full-size 8-bit grayscale PNGs with smooth structure and sensor-like noise (so they compress
    like radiographs, not like flat images)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(40, 220, (32, 32), dtype=np.uint8)).resize(
            (size, size), Image.BICUBIC)
        pixels = (np.asarray(coarse, dtype=np.int16)
                  + rng.integers(-6, 7, (size, size), dtype=np.int16))
        paths.append(Path(folder) / f"{i}.png")
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(paths[-1])
    return paths


class PNGDataset(torch.utils.data.Dataset):
    """The usual way: decode a PNG and resize it every time it is read."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as image:
            # (1, H, W) uint8
            x = TF.pil_to_tensor(image.convert("L"))
        x = TF.resize(x, [self.size, self.size], antialias=True)                        # (1, S, S)
        return (x.float() / 255 - PIXEL_MEAN) / PIXEL_STD


def write_cache(folder, count, size, vocab_size, max_len, num_labels, seed=0):
    """A memory-mapped uint8 cache at OpenI size, with tokens and labels, as
    image_cache.cached_images leaves it."""
    rng = np.random.default_rng(seed)
    cache = np.lib.format.open_memmap(Path(folder) / "images.npy", mode="w+", dtype=np.uint8,
                                      shape=(count, size, size))
    for start in range(0, count, 1024):
        cache[start:start + 1024] = rng.integers(0, 256, cache[start:start + 1024].shape,
                                                 dtype=np.uint8)
    cache.flush()
    del cache
    tokens = rng.integers(1, vocab_size, (count, max_len))
    # padding, as real reports
    tokens[:, max_len // 2:] = 0
    labels = (rng.random((count, num_labels)) < 0.2).astype(np.float32)
    return (np.load(Path(folder) / "images.npy", mmap_mode="r"), torch.from_numpy(tokens),
            torch.from_numpy(labels))


# ------------------------------------------------------------------------------------ measurements

def timed(device, fn):
    """(seconds, result) of fn(), with the device's queue drained before and after."""
    runtime.synchronize(device)
    start = time.perf_counter()
    result = fn()
    runtime.synchronize(device)
    return time.perf_counter() - start, result


def png_loader(loader):
    return sum(len(x) for x in loader)


def cached_loader(images, tokens, labels, order, args, augment):
    """Batches as train() gathers them, through model_input (uint8 -> normalised float, augmented or
    not)."""
    source = batching.batches if torch.is_tensor(images) else batching.streamed_batches
    augment_rng = torch.Generator(device=args.device).manual_seed(0) if augment else None
    count = 0
    for _, (x, t, y) in zip(range(args.loader_batches),
                            source(images, tokens, labels, order, args.batch_size)):
        x = batching.model_input(x, PIXEL_MEAN, PIXEL_STD, augment_rng,
                                 channels_last=args.channels_last)
        count += len(x)
    return count


def model_only(run, batch, steps):
    """train_step on one batch already on the device: the model's own speed."""
    x, t, y = batch
    for _ in range(steps):
        train.train_step(run.model, run.model, run.optimizer, run.scaler, run.autocast, x, t, y,
                         run.beta, run.step_args)
    return steps * len(x)


def end_to_end(run, images, tokens, labels, train_idx, epoch, args):
    """The body of train()'s loop over `steps` steps: shuffled batches from the cache, model_input
    with augmentation, train_step, the learning-rate schedule and the on-device loss sums, read once
    at the end."""
    order = batching.epoch_order(train_idx, 0, epoch, args.batch_size).to(args.device)
    source = batching.batches if torch.is_tensor(images) else batching.streamed_batches
    augment_rng = torch.Generator(device=args.device).manual_seed(epoch)
    sums = torch.zeros(4, device=args.device)
    for step, (x, t, y) in zip(range(args.steps),
                               source(images, tokens, labels, order, args.batch_size)):
        x = batching.model_input(x, PIXEL_MEAN, PIXEL_STD, augment_rng,
                                 channels_last=args.channels_last)
        parts = train.train_step(run.model, run.model, run.optimizer, run.scaler, run.autocast,
                                 x, t, y, run.beta, run.step_args)
        for group in run.optimizer.param_groups:
            group["lr"] = train.lr_at(step + 1, 10 * args.steps, 1e-4, 2)
        sums += torch.stack([parts[k].detach().float()
                             for k in ("loss", "bce_posterior", "bce_prior", "kl")])
    sums.tolist()
    return args.steps * args.batch_size


def setup_run(model, args):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device.type == "cuda")
    autocast = (torch.autocast(args.device.type, dtype=torch.bfloat16) if args.amp == "bf16"
                else nullcontext())
    return SimpleNamespace(model=model, optimizer=optimizer, autocast=autocast,
                           scaler=torch.amp.GradScaler(args.device.type, enabled=False),
                           beta=torch.tensor(0.1, device=args.device),
                           step_args=SimpleNamespace(prior_weight=1.0, latent_samples=1,
                                                     clip_grad=1.0))


def training_flops(run, batch):
    """Floating-point operations of one training step's forward and backward
    (torch.utils.flop_counter)."""
    x, t, y = batch
    with FlopCounterMode(display=False) as counter:
        with run.autocast:
            loss = run.model(x, t, y, run.beta)["loss"]
        loss.backward()
    run.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def resnet50_calibration(args, steps=20, batch_size=128):
    """MFU of a torchvision resnet50 training at 224 px, bf16, channels_last: what this card gives a
    well-known convolutional network, to read the compact CNN's MFU against."""
    model = torchvision.models.resnet50().to(args.device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch_size, 3, 224, 224, device=args.device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch_size,), device=args.device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(3):
        step()
    seconds, _ = timed(args.device, lambda: [step() for _ in range(steps)])
    return {"images_per_s": steps * batch_size / seconds,
            "tflops": counter.get_total_flops() * steps / seconds / 1e12}


def cpu_name():
    """The processor's model name (Linux), else what platform knows, with the number of cores."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def peak_tflops(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": values}


# -------------------------------------------------------------------------------------------- main

def main():
    args = get_args()
    device = args.device
    torch.manual_seed(0)
    if device.type == "cuda":                                  # as train() sets them
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    config = VKDConfig(method=args.method, cnn_width=16, latent_dim=64, text_dim=64, text_layers=2,
                       max_len=64)
    print(f"benchmark on {device_name} ({device.type}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}; "
          f"{args.method}, {args.image_size} px, batch {args.batch_size}, amp {args.amp}, "
          f"{args.rounds} rounds")
    with tempfile.TemporaryDirectory() as folder:
        paths = write_pngs(folder, args.png_images, args.png_size)
        cache, tokens, labels = write_cache(folder, OPENI_IMAGES, args.image_size,
                                            config.vocab_size, config.max_len, config.num_labels)
        tokens, labels = tokens.to(device), labels.to(device)
        train_idx = np.arange(OPENI_IMAGES)

        # time to first step: model, optimizer, cache placement, first batch and step, as train()
        # does them
        start = time.perf_counter()
        model = VKD(config).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        run = setup_run(model, args)
        images = batching.place_images(cache, device)
        args.steps, steps = 1, args.steps
        end_to_end(run, images, tokens, labels, train_idx, 0, args)
        runtime.synchronize(device)
        time_to_first_step = time.perf_counter() - start
        args.steps = steps
        preloaded = torch.is_tensor(images)
        resident = images if preloaded else batching.place_images(cache, device, "yes")

        loader = torch.utils.data.DataLoader(PNGDataset(paths, args.image_size), batch_size=4,
                                             shuffle=True, num_workers=args.workers,
                                             persistent_workers=args.workers > 0)
        order = batching.epoch_order(train_idx, 0, 0, args.batch_size).to(device)
        x = torch.randn(args.batch_size, 1, args.image_size, args.image_size, device=device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batch = (x, tokens[:args.batch_size], labels[:args.batch_size])
        flops_per_step = training_flops(run, batch)

        variants = {
            "png": ("PNG decode + resize, DataLoader", lambda: png_loader(loader)),
            "memmap": ("cache memmap, streamed batches",
                       lambda: cached_loader(cache, tokens, labels, order, args, False)),
            "resident": (f"cache in {device.type} memory + augmentation",
                         lambda: cached_loader(resident, tokens, labels, order, args, True)),
            "model_a": ("model only (random batch on device)",
                        lambda: model_only(run, batch, args.steps)),
            "end_to_end": ("end to end (train.py loop functions)",
                           lambda: end_to_end(run, images, tokens, labels, train_idx, round_ + 2,
                                              args)),
            "model_b": ("model only, again (A vs A)", lambda: model_only(run, batch, args.steps)),
        }
        rates = {key: [] for key in variants}
        # round -1 warms every variant up and is not kept
        for round_ in range(-1, args.rounds):
            for key, (_, fn) in variants.items():
                seconds, count = timed(device, fn)
                rates[key].append(count / seconds)
            if round_ < 0:
                rates = {key: [] for key in variants}
                continue
            # progress: stdout holds only the results
            print(f"round {round_ + 1}/{args.rounds}: "
                  + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items()),
                  file=sys.stderr, flush=True)
        calibration = resnet50_calibration(args) if device.type == "cuda" else None

    ratios = {"loader_speedup": ("loader speedup (memmap / PNG)", "memmap", "png"),
              "resident_speedup": ("loader speedup (device memory + augmentation / PNG)",
                                   "resident", "png"),
              "loop_efficiency": ("loop efficiency (end to end / model only)",
                                  "end_to_end", "model_a"),
              "noise_floor": ("noise floor (model only again / model only)", "model_b", "model_a")}
    paired = {key: summary([a / b for a, b in zip(rates[num], rates[den])])
              for key, (_, num, den) in ratios.items()}
    model_rate = statistics.median(rates["model_a"])
    end_to_end_rate = statistics.median(rates["end_to_end"])
    tflops = flops_per_step * model_rate / args.batch_size / 1e12
    peak = peak_tflops(device)
    peak_memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {
        "device": device_name, "device_type": device.type, "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": {k: str(v) for k, v in vars(args).items()}, "preloaded": preloaded,
        "loader_speedup": paired["loader_speedup"]["median"],
        "loop_efficiency": paired["loop_efficiency"]["median"],
        "paired": paired, "images_per_s": {key: summary(values) for key, values in rates.items()},
        "time_to_first_step_s": time_to_first_step, "openi_epoch_s": OPENI_IMAGES / end_to_end_rate,
        "peak_memory_bytes": peak_memory, "flops_per_image": flops_per_step / args.batch_size,
        "tflops": tflops, "mfu": tflops / peak if peak else None, "peak_bf16_tflops": peak,
        "resnet50_224px": calibration and calibration | {
            "mfu": calibration["tflops"] / peak if peak else None},
    }

    print(f"\n{'variant':56s} {'images/s: median [min, max]':>30s}")
    for key, (label, _) in variants.items():
        s = result["images_per_s"][key]
        print(f"{label:56s} {s['median']:>12,.0f} [{s['min']:,.0f}, {s['max']:,.0f}]")
    print(f"\n{'paired ratio, per round':56s} {'median [min, max]':>30s}")
    for key, (label, _, _) in ratios.items():
        s = paired[key]
        print(f"{label:56s} {s['median']:>12.3g} [{s['min']:.3g}, {s['max']:.3g}]")
    print(f"\ntime to first step {time_to_first_step:.2f} s; "
          f"epoch at OpenI size ({OPENI_IMAGES:,} images) "
          f"{result['openi_epoch_s']:.1f} s at the end-to-end rate; "
          f"peak memory {peak_memory / 2**20:,.0f} MiB "
          f"({'CUDA allocated' if device.type == 'cuda' else 'process RSS'})")
    print(f"{flops_per_step / args.batch_size / 1e9:.2f} GFLOP per training image; "
          f"{tflops:.3f} TFLOP/s"
          + (f", MFU {result['mfu']:.1%} of {peak:.0f} bf16 TFLOP/s" if peak
             else " (MFU: no bf16 peak known here)"))
    if calibration:
        print(f"calibration: resnet50 224 px bf16 {calibration['images_per_s']:,.0f} images/s, "
              f"{calibration['tflops']:.0f} TFLOP/s"
              + (f", MFU {result['resnet50_224px']['mfu']:.1%}" if peak else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
