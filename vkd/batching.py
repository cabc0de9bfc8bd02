"""The device-side data path of train.py: where the images live, the order of an epoch, batches,
augmentation.

Every image was decoded once into a uint8 cache (image_cache.py). Here that cache is copied to the
device once (or, when it does not fit, streamed from the memory-mapped file through pinned buffers),
each epoch's order is one seeded permutation cut into global batches, and uint8 -> float,
augmentation and normalisation run on the device. No DataLoader workers and no per-step host sync. A
student can skip this file. """
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data


# --------------------------------------------------------------------------------------- the images

def pixel_statistics(cache, indices, chunk=1024, one_pass_bytes=2**30):
    """Mean and std of the training images' pixels in [0, 1], for normalisation. Images of one flat
    grey (std 0, e.g. placeholders for text-only runs) get std 1, so that normalising them only
    removes the mean.

    One float32 pass when those pixels take at most 1 GiB as floats (the demo, OpenI); otherwise
    float64 sums over chunks of images, so that a cache larger than memory (MIMIC-CXR) is never
    copied whole."""
    count = len(indices) * cache[0].size
    if count * 4 <= one_pass_bytes:
        pixels = cache[indices].astype(np.float32) / 255.0
        mean, std = float(pixels.mean()), float(pixels.std())
    else:
        total = total_squares = 0.0
        for start in tqdm(range(0, len(indices), chunk), desc="pixel statistics", unit="chunk",
                          leave=False):
            block = cache[np.sort(indices[start:start + chunk])].astype(np.float64) / 255.0
            total, total_squares = total + block.sum(), total_squares + np.square(block).sum()
        mean = total / count
        std = math.sqrt(max(total_squares / count - mean**2, 0.0))
    return mean, std if std > 1e-6 else 1.0


def free_memory(device):
    """Bytes free on the device: CUDA's own count, or the host's free physical memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def place_images(cache, device, preload="auto", chunk=4096):
    """Where batches are gathered from: the whole uint8 cache copied once to `device`, so that
    gathering, uint8->float, normalisation and augmentation all run there with no transfer per step;
    or, when it does not fit, the memory-mapped cache itself, read batch by batch
    (streamed_batches).

    preload: yes, no, or auto = yes when the cache takes at most half of the device's free memory
    (the other half is left for the model). Copied in chunks, so a large cache never needs a second
    full copy in RAM."""
    if preload == "auto":
        preload = "yes" if cache.nbytes <= free_memory(device) // 2 else "no"
    if preload == "no":
        return cache
    # (N, S, S)
    images = torch.empty(cache.shape, dtype=torch.uint8, device=device)
    for start in tqdm(range(0, len(cache), chunk), desc=f"image cache to {device}", unit="chunk",
                      leave=False):
        images[start:start + chunk] = torch.from_numpy(np.array(cache[start:start + chunk]))
    return images


def on_device(collection, tokenizer, cache, args, procs):
    """The collection ready for training on this process's device (procs.device): images (N, S, S)
    uint8 (on the device, or the memory-mapped cache: place_images), report tokens (N, T), labels
    (N, K), NaN = not observed, the length of every report (N,) on the CPU with --group-by-length,
    else None (report_lengths), and with --oversample how often each training image is drawn
    (draw_weights), else None. Stops on a training split that cannot be trained (check_training);
    warns when reports are cut."""
    check_training(collection, args, procs.main)
    device, main_process = procs.device, procs.main
    images = place_images(cache, device, args.preload)
    tokens = data.sample_tokens(collection, tokenizer, args.max_len, args.report_control,
                                args.split_seed)
    tokens = torch.from_numpy(tokens)
    lengths = report_lengths(tokens, args)
    oversample = args.oversample
    weights = draw_weights(collection.labels, collection.splits["train"]) if oversample else None
    tokens, labels = tokens.to(device), torch.from_numpy(collection.labels).to(device)
    # report filled max_len
    truncated = (tokens[:, -1] != 0).float().mean().item()
    reads_reports = args.method not in ("image", "distill")
    if truncated > 0.05 and main_process and reads_reports:
        print(f"warning: {truncated:.0%} of reports are cut at --max-len {args.max_len} tokens; "
              f"consider a larger one")
    return images, tokens, labels, lengths, weights


def check_training(collection, args, main_process):
    """Stop on a label without a positive training image, which cannot be learnt, unless told to go
    on (--allow-missing-labels); and on a training split smaller than one batch (every epoch drops
    its incomplete last batch)."""
    train_idx = collection.splits["train"]
    missing = [name for k, name in enumerate(collection.label_names)
               if np.nansum(collection.labels[train_idx, k]) == 0]
    if missing and not args.allow_missing_labels:
        them = "it" if len(missing) == 1 else "them"
        raise data.DataError(f"no positive training image for {', '.join(missing)}: the model "
                             f"cannot learn {them}. Use more data (or a larger --train-fraction), "
                             f"another --split-seed, drop the label (--csv-labels), or pass "
                             f"--allow-missing-labels to train anyway")
    if missing and main_process:
        print(f"warning: no positive training image for {', '.join(missing)} "
              f"(--allow-missing-labels)")
    if len(train_idx) < args.batch_size:
        raise data.DataError(f"{len(train_idx)} training images < --batch-size "
                             f"{args.batch_size}; lower it")


def positive_weights(y, mode="sqrt"):
    """(K,) weight of a positive label in the BCE, from the training labels y (N, K) (NaN = not
    observed): sqrt(negatives / positives) per label ("sqrt"), or 1 ("none"). Why: a label with 1%
    positives otherwise gets nearly all of its gradient from negatives; the square root softens the
    full ratio, which overshoots."""
    y = torch.as_tensor(y, dtype=torch.float32)
    if mode == "none":
        return torch.ones(y.shape[1])
    assert mode == "sqrt", f"pos_weight: sqrt or none, not {mode!r}"
    positives = torch.nansum(y, 0)
    negatives = (~torch.isnan(y)).sum(0) - positives
    return (negatives / positives.clamp(min=1)).clamp(min=1).sqrt()


def draw_weights(labels, train_idx):
    """(len(train_idx),) how often each training image is drawn in an epoch, relative to the others,
    with --oversample: median(n) / n_k for an image whose rarest positive label is k, and at least
    1, where n_k is the number of positive training images of label k (and the median runs over the
    labels with any). An image with only common labels, or none, keeps weight 1. OpenI (split seed
    0): 38 of the 5,092 training images show Enlarged Cardiomediastinum, against a median of 156
    over the labels, so they are drawn 4.1 times as often as a normal image. Every epoch still draws
    len(train_idx) images, so its length stays.

    Why: a label with 19 positive training reports (OpenI, two images each) otherwise shows the
    report encoder its wording 38 times an epoch; the BCE's positive weights
    (positive_weights) scale the loss of those few examples but do not show the encoder more
    of them. With --group-by-length, the copies of an image (one report, so one length) often share
    a batch: more weight on that report in one step rather than the report in more steps."""
    # (N, K) of 0/1: not observed counts as 0
    y = np.nan_to_num(labels[train_idx].astype(np.float64), nan=0.0)
    positives = y.sum(0)                                            # (K,) n_k
    if not positives.any():
        # no positive label anywhere: nothing is rare
        return torch.ones(len(train_idx), dtype=torch.float64)
    # (K,); max(.., 1): no division by 0
    boost = np.median(positives[positives > 0]) / np.maximum(positives, 1)
    # (N,) the boost of the rarest positive label
    return torch.from_numpy(np.maximum(1.0, (y * boost).max(1)))


def report_lengths(tokens, args):
    """(N,) tokens per report, on the CPU, for --group-by-length; else None (options.for_method
    turns it off for `--method image`, which reads no report: grouping would only make its batches
    less random)."""
    return (tokens != 0).sum(1) if args.group_by_length else None


# --------------------------------------------------------------------------------- an epoch's order

# the random streams of an epoch, drawn the same in every process
SHUFFLE, AUGMENT = 0, 1


def epoch_generator(seed, epoch, stream, device="cpu"):
    """A torch generator for one stream (SHUFFLE or AUGMENT) of one epoch. numpy's SeedSequence
    hashes (seed, epoch, stream) into the seed, so that shuffling and augmentation never draw the
    same numbers and no (seed, epoch) pair repeats another's; a resumed run recreates them
    exactly."""
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def epoch_order(train_idx, seed, epoch, batch_size, rank=0, world_size=1, lengths=None,
                weights=None):
    """This process's training samples for one epoch, (steps * batch_size / world_size,).

    One permutation (the SHUFFLE stream of (seed, epoch)), the same in every process, is cut into
    global batches of batch_size (the incomplete last one dropped: static shapes); each process
    takes its contiguous 1/world_size of every global batch, so N processes see exactly the batches
    one would. With `weights` (--oversample: draw_weights), len(train_idx) draws with replacement,
    in proportion to the weights, take the permutation's place. With `lengths` (--group-by-length),
    the global batches are formed by group_by_length."""
    shuffle = epoch_generator(seed, epoch, SHUFFLE)
    draws = (torch.randperm(len(train_idx), generator=shuffle) if weights is None else
             torch.multinomial(weights, len(train_idx), replacement=True, generator=shuffle))
    order = torch.from_numpy(train_idx)[draws]
    steps = len(order) // batch_size
    order = order[:steps * batch_size]
    if lengths is not None:
        order = group_by_length(order, lengths, batch_size, shuffle)
    return order.view(steps, world_size, -1)[:, rank].reshape(-1)


def epoch_batches(run, epoch, done=0, augment_state=None):
    """An epoch of train.py's loop -> (this process's batches (x, t, y) from step `done` on, x the
    model's input (B, 1, S, S), normalised and augmented (model_input); the epoch's augmentation
    generator, or None with --no-augment, set to `augment_state` when a checkpoint part-way through
    the epoch gave one). Both the order and the augmentation are seeded by (seed, epoch)."""
    args, procs = run.args, run.procs
    local_batch = args.batch_size // procs.world_size
    order = epoch_order(run.collection.splits["train"], args.seed, epoch, args.batch_size,
                        procs.rank, procs.world_size, run.lengths, run.weights).to(procs.device)
    augment_rng = None
    if not args.no_augment:
        augment_rng = epoch_generator(args.seed, epoch, AUGMENT, procs.device)
        if augment_state is not None:
            augment_rng.set_state(augment_state)
    gather = batches if torch.is_tensor(run.images) else streamed_batches
    rest = order[done * local_batch:]
    gathered = gather(run.images, run.tokens, run.labels, rest, local_batch, run.lengths)
    inputs = ((model_input(x, args.pixel_mean, args.pixel_std, augment_rng, procs.rank,
                           procs.world_size, args.channels_last), t, y) for x, t, y in gathered)
    return inputs, augment_rng


def group_by_length(order, lengths, batch_size, generator, window=50):
    """Global batches of reports of similar length, so that a batch cut to its longest report
    (batch_tokens) is mostly report, not padding: the shuffled order is cut into windows of `window`
    batches, each window is sorted by report length and cut into batches, and the batches of the
    epoch are shuffled.

    The price: the reports sharing a batch are not independent draws. Long reports, which are more
    often abnormal, come together; and when an epoch has few more batches than a window (OpenI: 79),
    the sort spans most of it, so many reports meet the same batch-mates again the next epoch.
    lengths: (N,) on the CPU."""
    grouped = []
    # whole batches: len(order) % batch_size == 0
    for part in order.split(window * batch_size):
        grouped += part[torch.argsort(lengths[part], stable=True)].split(batch_size)
    return torch.cat([grouped[i] for i in torch.randperm(len(grouped), generator=generator)])


def batch_tokens(tokens, idx, batch_lengths=None, multiple=16):
    """The batch's report tokens (B, T); given its reports' lengths (--group-by-length), only the
    first columns, up to its longest report rounded up to `multiple` (a handful of shapes for
    torch.compile). The report encoder ignores padding, so in evaluation the cut changes no output;
    in training the dropout masks, drawn per column, differ."""
    if batch_lengths is None:
        return tokens[idx]
    return tokens[idx, :multiple * math.ceil(int(batch_lengths.max()) / multiple)]


def batches(images, tokens, labels, order, batch_size, lengths=None):
    """(x (B, S, S) uint8, t (B, T), y (B, K)) for each batch of `order`, gathered by indexing whole
    batches out of tensors already on the device: no workers, no copies, no host sync (with
    `lengths`, one per epoch)."""
    order_cpu = order.cpu() if lengths is not None else None           # the lengths live on the CPU
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        batch_lengths = (lengths[order_cpu[start:start + batch_size]] if lengths is not None
                         else None)
        yield images[idx], batch_tokens(tokens, idx, batch_lengths), labels[idx]


def streamed_batches(cache, tokens, labels, order, batch_size, lengths=None):
    """As `batches`, for a memory-mapped cache that was not preloaded (larger than half the free
    memory).

    The images of batch i+1 are read into one of two staging buffers and, on CUDA, their copy from
    pinned memory to the GPU is started (non_blocking) before batch i is handed out, so that reading
    the file overlaps the GPU's work on the steps already queued. A buffer is refilled only after
    its previous copy has finished (a CUDA event). On a CPU the buffer is the batch: the uint8
    images yielded are valid for one step."""
    device, num_batches = tokens.device, len(order) // batch_size
    order_cpu = order.cpu()
    pinned = device.type == "cuda"
    buffers = [torch.empty((batch_size, *cache.shape[1:]), dtype=torch.uint8, pin_memory=pinned)
               for _ in range(2)]
    copied = [None, None]

    def start_copy(i):
        buffer = buffers[i % 2]
        # its copy of batch i-2 must be done before we overwrite it
        if copied[i % 2] is not None:
            copied[i % 2].synchronize()
        buffer.numpy()[:] = cache[order_cpu[i * batch_size:(i + 1) * batch_size].numpy()]
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
        batch_lengths = (lengths[order_cpu[i * batch_size:(i + 1) * batch_size]]
                         if lengths is not None else None)
        yield x, batch_tokens(tokens, idx, batch_lengths), labels[idx]


# ------------------------------------------------------------------------------------- augmentation

def augment(x, generator, rank=0, world_size=1):
    """Random affine per image (rotation +-5 deg, scale +-5%, shift +-3%), one grid_sample for the
    batch. No horizontal flips: the heart is on the patient's left, a flip makes an anatomically
    impossible image.

    Every process draws the parameters of the whole global batch and keeps its own part, so N
    processes augment exactly as one process with the global batch would."""
    B = x.shape[0]
    r = (torch.rand(B * world_size, 4, generator=generator, device=x.device)
         [rank * B:(rank + 1) * B] * 2 - 1)
    angle, scale, shift = r[:, 0] * math.radians(5), 1 + r[:, 1] * 0.05, r[:, 2:] * 0.03
    theta = torch.stack([torch.stack([scale * torch.cos(angle), -scale * torch.sin(angle),
                                      shift[:, 0]], 1),
                         torch.stack([scale * torch.sin(angle), scale * torch.cos(angle),
                                      shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, x.shape, align_corners=False)                  # (B, H, W, 2)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def model_input(x, pixel_mean, pixel_std, augment_rng=None, rank=0, world_size=1,
                channels_last=False):
    """uint8 images (B, S, S) -> normalised float (B, 1, S, S), augmented when a generator is
    given."""
    augmented = (None if augment_rng is None
                 else (lambda x: augment(x, augment_rng, rank, world_size)))
    x = data.normalise(x, pixel_mean, pixel_std, augmented)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
