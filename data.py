"""Data: read OpenI-format reports and images, derive the 14 CheXpert labels, split by report,
train the report tokenizer, and cache resized images. MIMIC-CXR and a user's own CSV are read by tables.py.

    python data.py --data demo            # prepare the demo collection and print a summary
    python data.py --data demo --json     # the same summary as one JSON object
    python data.py --data openi --data-dir DIR

The demo collection (drawn by demo.py) is written to disk in exactly the OpenI layout (ecgen-radiology/*.xml +
PNGs named by parentImage id) and then read back by the same reader as the real collection.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from demo import make_demo

try:
    import fcntl                             # file locks (POSIX); without them, two runs must not share a cache
except ImportError:
    fcntl = None

LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
CACHE_VERSION = 1
CACHE_CHUNK = 1024                          # images decoded between two progress records
OPENI_URL = "https://openi.nlm.nih.gov/imgs/collections"     # the one place it is written; download.py reads it
UNCERTAIN_POLICIES = ("zeros", "ones", "ignore")               # --uncertain: what a -1 label of mimic/csv becomes

# MeSH major term -> CheXpert label. A term reads "Head/qualifier/qualifier/..."; a rule matches when the head
# equals `head` and, if `qualifiers` is given, at least one of them is among the term's qualifiers.
# "No Finding" is not a rule: it is positive exactly when the only major term is "normal" (see labels_from_mesh).
#   label                          head                       qualifiers
MESH_RULES = [
    ("Enlarged Cardiomediastinum", "mediastinum",             {"prominent", "enlarged"}),
    ("Cardiomegaly",               "cardiomegaly",            None),
    ("Cardiomegaly",               "cardiac shadow",          {"enlarged"}),
    ("Lung Opacity",               "opacity",                 None),
    ("Lung Opacity",               "airspace disease",        None),
    ("Lung Opacity",               "infiltrate",              None),
    ("Lung Opacity",               "density",                 {"lung"}),
    ("Lung Lesion",                "nodule",                  None),
    ("Lung Lesion",                "mass",                    None),
    ("Lung Lesion",                "cavitation",              None),
    ("Edema",                      "pulmonary edema",         None),
    ("Edema",                      "pulmonary congestion",    None),
    ("Edema",                      "heart failure",           None),
    ("Consolidation",              "consolidation",           None),
    ("Pneumonia",                  "pneumonia",               None),
    ("Atelectasis",                "pulmonary atelectasis",   None),
    ("Pneumothorax",               "pneumothorax",            None),
    ("Pneumothorax",               "hydropneumothorax",       None),
    ("Pneumothorax",               "hemopneumothorax",        None),
    ("Pleural Effusion",           "pleural effusion",        None),
    ("Pleural Other",              "thickening",              {"pleura"}),
    ("Pleural Other",              "pleura",                  None),
    ("Fracture",                   "fractures, bone",         None),
    ("Support Devices",            "catheters, indwelling",   None),
    ("Support Devices",            "implanted medical device", None),
    ("Support Devices",            "tube, inserted",          None),
    ("Support Devices",            "medical device",          None),
    ("Support Devices",            "stents",                  None),
    ("Support Devices",            "surgical instruments",    None),
]


class DataError(Exception):
    """A problem with the user's data that makes the run meaningless; the message says what to do."""


# ----------------------------------------------------------------------------------------------- reports

@dataclass
class Report:
    id: str                 # e.g. "CXR1"
    findings: str
    impression: str
    majors: list            # MeSH major terms as written (stripped)
    image_ids: list         # parentImage ids, e.g. "CXR1_1_IM-0001-3001"
    patient_id: str = None  # where the collection names the patient (MIMIC's subject_id, a CSV's patient column)

    @property
    def text(self):
        """The model's t: FINDINGS and IMPRESSION, the parts of the report written after reading the image."""
        return " ".join(part for part in (self.findings, self.impression) if part)


def normalise_term(term):
    return " ".join(term.split()).lower()


def labels_from_mesh(majors):
    """14-dim 0/1 vector from MeSH major terms, by MESH_RULES.

    No Finding follows OpenI's own reading: positive only when the sole major term is `normal` (the indexers'
    word for a normal study; it never co-occurs with another major). This is not CheXpert's rule, which
    MIMIC-CXR's labels follow: there No Finding is positive when none of the 12 findings (Enlarged
    Cardiomediastinum ... Fracture) is positive, support devices ignored. The two differ on
      - a report whose majors name nothing among the 14 (e.g. `Granuloma`, `Spine/degenerative`): CheXpert
        would call it No Finding, here it is negative for every label (counted in the summary as
        reports_without_positive_label);
      - a report whose only finding is a support device: CheXpert No Finding, here Support Devices alone.
    A No Finding AUROC across the two collections therefore compares two definitions of the label.
    """
    y = np.zeros(len(LABELS), dtype=np.float32)
    terms = [[normalise_term(part) for part in major.split("/")] for major in majors]
    if [t[0] for t in terms] == ["normal"]:
        y[LABELS.index("No Finding")] = 1
    for head, *qualifiers in terms:
        for label, rule_head, rule_qualifiers in MESH_RULES:
            if head == rule_head and (rule_qualifiers is None or rule_qualifiers & set(qualifiers)):
                y[LABELS.index(label)] = 1
    return y


def parse_report(xml_bytes, source):
    """One OpenI XML file -> Report. Raises ValueError naming `source` when the XML is unusable."""
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError as error:
        raise ValueError(f"{source}: malformed XML ({error})") from None
    uid = root.find("uId")
    if uid is None or not uid.get("id"):
        raise ValueError(f"{source}: no <uId id=...> element")
    sections = {node.get("Label"): " ".join("".join(node.itertext()).split())
                for node in root.iterfind(".//AbstractText[@Label]")}
    return Report(
        id=uid.get("id"),
        findings=sections.get("FINDINGS", ""),
        impression=sections.get("IMPRESSION", ""),
        majors=[node.text.strip() for node in root.iterfind("MeSH/major") if node.text and node.text.strip()],
        image_ids=[node.get("id") for node in root.iterfind("parentImage") if node.get("id")],
    )


def iter_report_files(source):
    """Yield (name, bytes) for every ecgen-radiology/*.xml in a folder or read straight from a .tgz."""
    source = Path(source)
    if source.is_dir():
        for path in sorted(source.glob("*.xml"), key=lambda p: (len(p.stem), p.stem)):
            yield str(path), path.read_bytes()
        return
    try:
        with tarfile.open(source, "r:*") as archive:            # members are read, never extracted
            files = [(member.name, archive.extractfile(member).read()) for member in archive
                     if member.isfile() and member.name.endswith(".xml")]
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(f"{source} is not a readable .tgz ({error}); delete it and download it again") from None
    for name, xml_bytes in sorted(files, key=lambda f: (len(Path(f[0]).stem), Path(f[0]).stem)):
        yield f"{source}:{name}", xml_bytes                      # same order as a folder: 1, 2, ..., 10, ...


def find_images(root):
    """{image id: path} for every PNG below `root`, searched recursively."""
    return {path.stem: path for path in sorted(Path(root).rglob("*.png"))}


@dataclass
class Collection:
    """A prepared collection: one row per image (a sample), each carrying its report's labels and text."""
    root: Path
    reports: list           # used reports, in reading order (one whose images all fail to decode stays, in no split)
    image_paths: list       # (N,) one PNG per sample
    report_index: np.ndarray  # (N,) index into `reports`
    labels: np.ndarray      # (N, 14) float32
    splits: dict            # split -> sorted sample indices
    split_ids: dict         # split -> report ids (what splits.json holds)
    summary: dict
    label_names: list = field(default_factory=lambda: list(LABELS))   # the columns of `labels`
    bootstrap_unit: str = "reports"         # what evaluation's bootstrap resamples: "reports" or "patients"
    bootstrap_groups: np.ndarray = None     # (N,) each sample's report, or its patient: see bootstrap_groups()

    def texts(self):
        return [report.text for report in self.reports]


def read_openi(reports_source, images_root, strict=False):
    """Read reports and pair them with images. Returns (used reports, {report id: [paths]}, summary parts).

    malformed_xml and duplicate_id are problems (--strict stops on them); no_indexing, no_text and no_image
    are reports the real collection has by design, always skipped and counted."""
    images = find_images(images_root)
    used, paths, seen = [], {}, set()
    skipped = {"malformed_xml": 0, "duplicate_id": 0, "no_indexing": 0, "no_text": 0, "no_image": 0}
    skipped_ids = {reason: [] for reason in skipped}
    found = 0
    for name, xml_bytes in iter_report_files(reports_source):
        found += 1
        try:
            report = parse_report(xml_bytes, name)
        except ValueError as error:
            reason, report_id, problem = "malformed_xml", name, str(error)
        else:
            report_paths = [images[i] for i in report.image_ids if i in images]
            report_id, problem = report.id, f"{name}: report id {report.id} was already read from another file"
            if report.id in seen:
                reason = "duplicate_id"
            elif not report.majors or {normalise_term(m) for m in report.majors} == {"no indexing"}:
                reason = "no_indexing"
            elif not report.text:
                reason = "no_text"
            elif not report_paths:
                reason = "no_image"
            else:
                reason = None
                seen.add(report.id)
                used.append(report)
                paths[report.id] = report_paths
        if strict and reason in ("malformed_xml", "duplicate_id"):
            raise DataError(f"{problem} (--strict; without it this report would be skipped and counted)")
        if reason:
            skipped[reason] += 1
            skipped_ids[reason].append(report_id)
    return used, paths, {"reports": found, "skipped": skipped, "skipped_ids": skipped_ids}


def split_reports(report_ids, seed, fractions=SPLIT_FRACTIONS):
    """Deterministic split by report: a seeded permutation of the sorted ids cut at the given fractions."""
    ids = sorted(report_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    cuts = np.round(np.cumsum(fractions)[:-1] * len(ids)).astype(int)
    return {split: sorted(ids[i] for i in part) for split, part in zip(SPLITS, np.split(order, cuts))}


def split_by_patient(reports, seed, fractions=SPLIT_FRACTIONS):
    """A seeded split of the patients (as split_reports does for reports); every report goes where its patient
    is, so that no patient is in two splits."""
    patients = split_reports({report.patient_id for report in reports}, seed, fractions)
    split_of = {patient: split for split, ids in patients.items() for patient in ids}
    return {split: sorted(r.id for r in reports if split_of[r.patient_id] == split) for split in SPLITS}


def bootstrap_groups(reports, report_index):
    """(N,) bootstrap group of each sample and its unit. The images of a report share its labels, and the
    studies of one patient are correlated, so resampling single images (or, when patients are known, single
    reports) would make intervals too narrow: the bootstrap draws whole patients when every report names one
    (MIMIC-CXR, a CSV with a patient column), else whole reports (OpenI, the demo)."""
    patients = [report.patient_id for report in reports]
    if all(patients):
        _, patient_index = np.unique(patients, return_inverse=True)
        return patient_index[report_index], "patients"
    return report_index, "reports"


def split_hash(split_ids):
    return hashlib.sha256(json.dumps(split_ids, sort_keys=True).encode()).hexdigest()


def assemble(root, reports, report_labels, paths, read_summary, split_ids, label_names=LABELS):
    """Used reports, their labels (R, K) and image paths -> Collection with one sample per image."""
    if not reports:
        raise DataError(f"no usable report under {root}: skipped {read_summary['skipped']}")
    report_index = np.array([i for i, report in enumerate(reports) for _ in paths[report.id]])
    image_paths = [path for report in reports for path in paths[report.id]]
    split_of_report = {rid: split for split, ids in split_ids.items() for rid in ids}
    report_split = np.array([split_of_report[r.id] for r in reports])
    empty = [split for split in SPLITS if not split_ids.get(split)]
    if empty:
        raise DataError(f"no usable report under {root} falls in the {' and '.join(empty)} split; "
                        f"{len(reports)} reports are too few or the split column leaves it empty")
    sample_split = report_split[report_index]
    summary = {"reports": read_summary["reports"], "skipped": read_summary["skipped"],
               "skipped_ids": read_summary["skipped_ids"]}
    collection = Collection(
        root=Path(root), reports=reports, image_paths=image_paths, report_index=report_index,
        labels=report_labels[report_index].astype(np.float32),
        splits={s: np.flatnonzero(sample_split == s) for s in SPLITS},
        split_ids={split: split_ids[split] for split in SPLITS}, summary=summary, label_names=list(label_names),
    )
    summary.update(count_used(collection))
    collection.bootstrap_groups, collection.bootstrap_unit = bootstrap_groups(reports, report_index)
    return collection


def count_used(collection):
    """The summary's counts of exactly what training uses: the samples in the three splits and the reports they
    come from, labels counted once per report. NaN (an ignored uncertain label) counts as neither 0 nor 1."""
    reports, first_sample = np.unique(collection.report_index, return_index=True)
    split_of = np.full(len(collection.reports), "", dtype=object)
    for split in SPLITS:
        split_of[collection.report_index[collection.splits[split]]] = split
    used = split_of[reports] != ""
    labels, split_of = collection.labels[first_sample[used]], split_of[reports[used]]       # (R, K), (R,)
    positives, names = labels == 1, collection.label_names
    counts = {
        "reports_used": int(used.sum()),
        "images_used": int(sum(len(collection.splits[split]) for split in SPLITS)),
        "labels": {name: int(positives[:, k].sum()) for k, name in enumerate(names)},
        "splits": {split: int((split_of == split).sum()) for split in SPLITS},
        "labels_per_split": {split: {name: int(positives[split_of == split, k].sum()) for k, name in enumerate(names)}
                             for split in SPLITS},
        "reports_without_positive_label": int((~positives.any(1)).sum()),
    }
    if np.isnan(labels).any():
        counts["ignored_uncertain"] = {name: int(np.isnan(labels[:, k]).sum()) for k, name in enumerate(names)}
    return counts


# --------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts, vocab_size):
    """Byte-pair-encoding tokenizer trained on the given (training split) texts. [PAD] is id 0.

    BPE rather than WordPiece because the tokenizers library's WordPiece trainer breaks ties between equally
    frequent merges differently from run to run, which would make a seeded run unrepeatable.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]"], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(path))


def encode_texts(tokenizer, texts, max_len):
    """(N, max_len) int64 token ids, truncated and right-padded with [PAD] = 0."""
    tokens = np.zeros((len(texts), max_len), dtype=np.int64)
    for i, encoding in enumerate(tokenizer.encode_batch(texts)):
        ids = encoding.ids[:max_len]
        tokens[i, :len(ids)] = ids
    return tokens


def sample_tokens(collection, tokenizer, max_len):
    """(N, max_len) token ids of each sample's report (reports are tokenised once, then indexed)."""
    return encode_texts(tokenizer, collection.texts(), max_len)[collection.report_index]


# ----------------------------------------------------------------------------------------- image cache

def load_image(path, size):
    """Decode a PNG/JPEG (8/16-bit, gray/RGB/RGBA) -> (size, size) uint8 grayscale, aspect ratio squashed."""
    with Image.open(path) as image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):                        # 16-bit grayscale PNG
            pixels = np.asarray(image, dtype=np.float32) / 65535.0
        else:                                                                      # RGB(A) -> ITU-R 601 luma
            pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(pixels)[None, None]                                  # (1, 1, H, W)
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (pixels[0, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def cache_key(image_paths, size):
    """Changes when any source file, the file list or the size changes."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}/{size}".encode())
    for path in image_paths:
        stat = os.stat(path)
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def decode_job(job):
    """Worker side of the cache build: (path, size) -> (pixels, None) or (None, why it cannot be decoded)."""
    path, size = job
    try:
        return load_image(path, size), None
    except (OSError, ValueError, Image.DecompressionBombError) as error:   # truncated, empty, not an image
        return None, f"{path}: {error}"


def init_worker():
    torch.set_num_threads(1)                 # one image per process; the processes are the parallelism


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
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def cached_images(image_paths, size, cache_dir, workers=1):
    """(N, size, size) uint8 memory-mapped array of all images, decoded once and reused, and {index: why} of
    the images that could not be decoded (their rows stay zero).

    The array is built in `images-{size}.partial.npy`, preallocated on disk, in `workers` processes; every
    chunk is flushed and then recorded in a progress file, so an interrupted build continues where it stopped.
    The finished array is renamed into place and the manifest holding its key is written last: a cache without
    a matching manifest is never used. A lock file keeps a second run from building at the same time; it
    waits and then uses the first run's cache.
    """
    cache_dir = Path(cache_dir)
    array_path, manifest_path = cache_dir / f"images-{size}.npy", cache_dir / f"images-{size}.json"
    partial_path, progress_path = cache_dir / f"images-{size}.partial.npy", cache_dir / f"images-{size}.progress.json"
    key = cache_key(image_paths, size)

    def complete():
        """The finished cache, or None when it is missing, stale, or not the file the manifest describes."""
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest["key"] == key and array_path.stat().st_size == manifest["bytes"]:
                return np.load(array_path, mmap_mode="r"), {int(i): why for i, why in manifest["bad"].items()}
        except (OSError, ValueError, KeyError):
            pass
        return None

    if (done := complete()) is not None:
        return done
    cache_dir.mkdir(parents=True, exist_ok=True)
    with locked(cache_dir / f"images-{size}.lock"):
        if (done := complete()) is not None:                 # another run finished it while we waited
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
            start, bad = 0, {}
        jobs = [(path, size) for path in image_paths[start:]]
        pool = Pool(workers, initializer=init_worker) if workers > 1 and len(jobs) > 64 else None
        results = pool.imap(decode_job, jobs, chunksize=16) if pool else map(decode_job, jobs)
        try:
            bar = tqdm(results, total=len(image_paths), initial=start, desc=f"caching images at {size}px", unit="img")
            for i, (pixels, why) in enumerate(bar, start=start):
                if why is None:
                    array[i] = pixels
                else:
                    array[i], bad[i] = 0, why
                if (i + 1) % CACHE_CHUNK == 0 or i + 1 == len(image_paths):
                    array.flush()                        # the rows first, then the record that they are there
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


def check_free_space(folder, needed):
    free = shutil.disk_usage(folder).free
    if free < needed * 1.05 + 2**20:
        raise DataError(f"the image cache needs {needed / 2**30:.2f} GiB in {folder} but only {free / 2**30:.2f} GiB "
                        f"is free; free some space, or use a smaller --image-size")


def image_cache(collection, size, strict=False, workers=None):
    """The collection's image cache; images that cannot be decoded are dropped from the splits and counted
    under skipped/bad_image (with --strict they stop the run instead)."""
    workers = workers or min(8, os.cpu_count() or 1)
    images, bad = cached_images(collection.image_paths, size, collection.root / "cache", workers)
    if bad and strict:
        raise DataError(f"cannot decode image {next(iter(bad.values()))} (--strict; without it the "
                        f"{len(bad)} undecodable image(s) would be skipped and counted)")
    if bad:
        print(f"warning: skipped {len(bad)} image(s) that cannot be decoded, e.g. {next(iter(bad.values()))}",
              file=sys.stderr)                   # stdout carries only the result (data.py --json: one JSON object)
        drop_undecodable(collection, sorted(bad))
    return images


def drop_undecodable(collection, bad):
    """Leave the samples at `bad` out of the splits (counted under skipped/bad_image). A report left with no
    image is skipped whole (skipped/no_decodable_image) and leaves split_ids, so that the split files, their
    hash and every count of the summary describe exactly what training uses."""
    collection.splits = {split: np.setdiff1d(idx, bad) for split, idx in collection.splits.items()}
    kept = set(collection.report_index[np.concatenate(list(collection.splits.values()))].tolist())
    lost = [report.id for i, report in enumerate(collection.reports) if i not in kept]
    collection.split_ids = {split: [rid for rid in ids if rid not in lost]
                            for split, ids in collection.split_ids.items()}
    empty = [split for split in SPLITS if not len(collection.splits[split])]
    if empty:
        raise DataError(f"no decodable image is left in the {' and '.join(empty)} split under {collection.root}; "
                        f"{len(bad)} image(s) cannot be decoded, e.g. {collection.image_paths[bad[0]]}")
    summary = collection.summary
    summary["skipped"]["bad_image"] = len(bad)
    summary["skipped_ids"]["bad_image"] = [str(collection.image_paths[i]) for i in bad]
    if lost:
        summary["skipped"]["no_decodable_image"] = len(lost)
        summary["skipped_ids"]["no_decodable_image"] = lost
    summary.pop("ignored_uncertain", None)                # recounted: it may have been only in dropped reports
    summary.update(count_used(collection))


# ------------------------------------------------------------------------------------------------ entry

def openi_collection(root, reports_source, images_root, split_seed, strict=False):
    """OpenI-format reports and PNGs -> Collection, labels from the MeSH majors, a seeded split by report."""
    reports, paths, read_summary = read_openi(reports_source, images_root, strict)
    labels = np.stack([labels_from_mesh(r.majors) for r in reports]) if reports else np.zeros((0, len(LABELS)))
    collection = assemble(root, reports, labels, paths, read_summary, split_reports(list(paths), split_seed))
    collection.summary["sources"] = {"reports": str(reports_source), "images": str(images_root)}
    return collection


def prepare(data="demo", data_dir="data", split_seed=0, demo_reports=1500, demo_seed=0, openi_url=OPENI_URL,
            strict=False, uncertain="zeros", mimic_labels="chexpert", views="frontal", csv=None,
            csv_image_column="image", csv_text_column="text", csv_labels=None, csv_patient_column="patient_id"):
    """Read a collection (drawing the demo or downloading OpenI first if needed) -> Collection.
    Images are not decoded here."""
    if data in ("demo", "openi"):
        if data == "demo":
            root = make_demo(Path(data_dir) / f"demo-{demo_reports}-seed{demo_seed}", demo_reports, demo_seed)
            reports_source, images_root = root / "ecgen-radiology", root / "NLMCXR_png"
        else:
            from download import fetch_openi    # imported here: download.py itself imports DataError from here
            root, reports_source, images_root = fetch_openi(data_dir, openi_url)
        return openi_collection(root, reports_source, images_root, split_seed, strict)
    from tables import read_csv, read_mimic       # imported here: tables.py imports from this file
    if data == "mimic":
        reports, labels, paths, read_summary, split_ids = read_mimic(data_dir, mimic_labels, uncertain, views, strict)
        return assemble(data_dir, reports, labels, paths, read_summary, split_ids)
    if data == "csv":
        if not csv:
            raise DataError("--data csv needs --csv FILE")
        names = [name.strip() for name in csv_labels.split(",")] if csv_labels else None
        reports, labels, paths, read_summary, split_ids, names = read_csv(
            csv, csv_image_column, csv_text_column, names, uncertain, strict, csv_patient_column)
        if split_ids is None:
            by_patient = reports and all(report.patient_id for report in reports)
            split_ids = split_by_patient(reports, split_seed) if by_patient else split_reports(list(paths), split_seed)
        return assemble(Path(csv).parent, reports, labels, paths, read_summary, split_ids, names)
    raise DataError(f"unknown --data {data!r}: choose demo, openi, mimic or csv")


DATA_OPTIONS = ("data", "data_dir", "split_seed", "demo_reports", "demo_seed", "openi_url", "strict", "uncertain",
                "mimic_labels", "views", "csv", "csv_image_column", "csv_text_column", "csv_labels",
                "csv_patient_column")


def prepare_from(options):
    """prepare() from a dict holding (some of) DATA_OPTIONS, e.g. vars(args) or a checkpoint's config."""
    return prepare(**{name: options[name] for name in DATA_OPTIONS if name in options})


def print_summary(summary, label_names=LABELS):
    print(f"reports found {summary['reports']}, used {summary['reports_used']}, images {summary['images_used']}")
    print("skipped: " + (", ".join(f"{reason} {n}" for reason, n in summary["skipped"].items()) or "none"))
    if "sources" in summary:
        print(f"reports from {summary['sources']['reports']}, images from {summary['sources']['images']}")
    width = max(28, *(len(name) + 2 for name in label_names))
    print(f"{'label':{width}s}" + "".join(f"{s:>7s}" for s in SPLITS) + f"{'all':>7s}")
    for name in label_names:
        counts = [summary["labels_per_split"][s][name] for s in SPLITS]
        print(f"{name:{width}s}" + "".join(f"{n:7d}" for n in counts) + f"{summary['labels'][name]:7d}")
    print(f"{'reports':{width}s}" + "".join(f"{summary['splits'][s]:7d}" for s in SPLITS) + f"{summary['reports_used']:7d}")
    print(f"reports without any positive label: {summary['reports_without_positive_label']}")


def add_data_args(parser, inherit=False):
    """The data options shared by train.py, evaluate.py and this script. With `inherit` (evaluate.py) every
    default is None, meaning "the checkpoint's own"."""
    def add(flag, default=None, help="", **kwargs):
        shown = "the checkpoint's" if inherit else "off" if default is False else "none" if default is None else default
        parser.add_argument(flag, default=None if inherit else default, help=f"{help} (default: {shown})", **kwargs)
    add("--data", "demo", choices=["demo", "openi", "mimic", "csv"], help="collection")
    add("--data-dir", "data", help="where collections and caches live; for mimic, the MIMIC-CXR-JPG folder")
    add("--split-seed", 0, type=int, help="seed of the split by report (by patient for a csv with a patient "
                                          "column); mimic uses its official split")
    add("--demo-reports", 1500, type=int, help="reports in the demo")
    add("--demo-seed", 0, type=int, help="seed that draws the demo")
    add("--openi-url", OPENI_URL, help="where the OpenI archives are")
    add("--uncertain", "zeros", choices=UNCERTAIN_POLICIES,
        help="uncertain (-1) labels of mimic/csv become 0, 1, or are left out of loss and AUROC")
    add("--mimic-labels", "chexpert", choices=["chexpert", "negbio"], help="mimic label table")
    add("--views", "frontal", choices=["frontal", "all"], help="mimic views: PA/AP only, or all")
    add("--csv", None, help="--data csv: the CSV file, one row per image")
    add("--csv-image-column", "image", help="--data csv: image path column")
    add("--csv-text-column", "text", help="--data csv: report text column")
    add("--csv-labels", None, help="--data csv: comma-separated label columns; none: every other column")
    add("--csv-patient-column", "patient_id", help="--data csv: optional patient column; when present, the seeded "
                                                   "split and the bootstrap are by patient")
    add("--strict", False, action="store_true", help="stop on a bad sample instead of skipping and counting it")
    if not inherit:
        add("--image-size", 128, type=int, help="cached image side in px")


JSON_SUMMARY_KEYS = ("reports", "reports_used", "images_used", "skipped", "labels", "splits",
                     "reports_without_positive_label", "ignored_uncertain", "sources")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object (default: off)")
    args = parser.parse_args()
    try:
        collection = prepare_from(vars(args))
        image_cache(collection, args.image_size, args.strict)
    except DataError as error:
        sys.exit(f"error: {error}")
    summary = {k: collection.summary[k] for k in JSON_SUMMARY_KEYS if k in collection.summary}
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(collection.summary, collection.label_names)


if __name__ == "__main__":
    main()
