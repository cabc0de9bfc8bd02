"""Image cache: every image of a collection decoded once, resized, and kept on disk as one uint8
array.

data.image_cache calls cached_images(image paths, size, cache folder) and gets back a memory-mapped
(N, size, size) array; evaluate.py decodes single files with decode_job, exactly as the cache build
does. What makes it safe to interrupt and to share: a build that continues where it stopped, a lock
between runs, a manifest written last, and a check of the free disk space first.
"""
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from vkd.reports import DataError, write_error

try:
    # file locks (POSIX); without them, two runs must not share a cache
    import fcntl
except ImportError:
    fcntl = None

CACHE_VERSION = 1
CACHE_CHUNK = 1024                          # images decoded between two progress records


def load_image(path, size):
    """Decode a PNG/JPEG (8/16-bit, gray/RGB/RGBA) -> (size, size) uint8 grayscale, aspect ratio
    squashed."""
    with Image.open(path) as image:
        # 16-bit grayscale PNG
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            pixels = np.asarray(image, dtype=np.float32) / 65535.0
        else:
            # RGB(A) -> ITU-R 601 luma
            pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(pixels)[None, None]                                  # (1, 1, H, W)
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True,
                           align_corners=False)
    return (pixels[0, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def cache_key(image_paths, size):
    """Changes when any source file, the file list or the size changes."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}/{size}".encode())
    for path in image_paths:
        stat = os.stat(path)
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def decode_job(job):
    """Worker side of the cache build: (path, size) -> (pixels, None) or (None, why it cannot be
    decoded)."""
    path, size = job
    try:
        return load_image(path, size), None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        # truncated, empty, not an image
        return None, f"{path}: {error}"


def init_worker():
    # one image per process; the processes are the parallelism
    torch.set_num_threads(1)


@contextmanager
def locked(lock_path):
    """Hold an exclusive lock on `lock_path` so that two runs never build the same cache at once."""
    with open(lock_path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def write_json(path, value):
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)
    except OSError as error:          # a full disk: the last whole progress record stays
        tmp.unlink(missing_ok=True)
        raise write_error(path, error) from error


def cached_images(image_paths, size, cache_dir, workers=1):
    """(N, size, size) uint8 memory-mapped array of all images, decoded once and reused, and
    {index: why} of the images that could not be decoded (their rows stay zero).

    The array is built in `images-{size}.partial.npy`, preallocated on disk, in `workers` processes;
    every chunk is flushed and then recorded in a progress file, so an interrupted build continues
    where it stopped. The finished array is renamed into place and the manifest holding its key is
    written last: a cache without a matching manifest is never used. A lock file keeps a second run
    from building at the same time; it waits and then uses the first run's cache.
    """
    cache_dir = Path(cache_dir)
    array_path, manifest_path = cache_dir / f"images-{size}.npy", cache_dir / f"images-{size}.json"
    key = cache_key(image_paths, size)

    def complete():
        """The finished cache, or None when it is missing, stale, or not the file the manifest
        describes."""
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest["key"] == key and array_path.stat().st_size == manifest["bytes"]:
                return (np.load(array_path, mmap_mode="r"),
                        {int(i): why for i, why in manifest["bad"].items()})
        except (OSError, ValueError, KeyError):
            pass
        return None

    if (done := complete()) is not None:
        return done
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with locked(cache_dir / f"images-{size}.lock"):
            return build(image_paths, size, cache_dir, workers, key, complete)
    except OSError as error:          # a full disk or a folder that is not writable
        raise write_error(cache_dir, error) from error


def build(image_paths, size, cache_dir, workers, key, complete):
    """The body of cached_images, under its lock."""
    array_path, manifest_path = cache_dir / f"images-{size}.npy", cache_dir / f"images-{size}.json"
    partial_path, progress_path = (cache_dir / f"images-{size}.partial.npy",
                                   cache_dir / f"images-{size}.progress.json")
    # another run finished it while we waited
    if (done := complete()) is not None:
        return done
    manifest_path.unlink(missing_ok=True)
    shape = (len(image_paths), size, size)
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {}
    if progress.get("key") == key and partial_path.exists():
        array = np.load(partial_path, mmap_mode="r+")
        start, bad = progress["done"], {int(i): why for i, why in progress["bad"].items()}
    else:
        check_free_space(cache_dir, np.prod(shape))
        array = np.lib.format.open_memmap(partial_path, mode="w+", dtype=np.uint8, shape=shape)
        allocate(partial_path)
        start, bad = 0, {}
    jobs = [(path, size) for path in image_paths[start:]]
    pool = Pool(workers, initializer=init_worker) if workers > 1 and len(jobs) > 64 else None
    results = pool.imap(decode_job, jobs, chunksize=16) if pool else map(decode_job, jobs)
    try:
        bar = tqdm(results, total=len(image_paths), initial=start,
                   desc=f"caching images at {size}px", unit="img")
        for i, (pixels, why) in enumerate(bar, start=start):
            if why is None:
                array[i] = pixels
            else:
                array[i], bad[i] = 0, why
            if (i + 1) % CACHE_CHUNK == 0 or i + 1 == len(image_paths):
                # the rows first, then the record that they are there
                array.flush()
                write_json(progress_path, {"key": key, "done": i + 1, "bad": bad})
    finally:
        if pool:
            pool.terminate()
    array.flush()
    del array
    os.replace(partial_path, array_path)
    write_json(manifest_path, {"key": key, "size": size, "count": len(image_paths), "bad": bad,
                               "bytes": array_path.stat().st_size})
    progress_path.unlink()
    return complete()


def allocate(path):
    """Reserve the disk blocks of the memory-mapped file at `path` now: a memory map writes into a
    sparse file, and a disk that fills up under it kills the process (SIGBUS) instead of raising.
    A disk too full for it is a DataError naming the path and the free space; the file is
    removed."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        with open(path, "r+b") as file:
            os.posix_fallocate(file.fileno(), 0, os.path.getsize(path))
    except OSError as error:
        Path(path).unlink(missing_ok=True)
        raise write_error(path, error) from error


def check_free_space(folder, needed):
    free = shutil.disk_usage(folder).free
    if free < needed * 1.05 + 2**20:
        raise DataError(f"the image cache needs {needed / 2**30:.2f} GiB in {folder} "
                        f"but only {free / 2**30:.2f} GiB "
                        f"is free; free some space, or use a smaller --image-size")
