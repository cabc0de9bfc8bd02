"""Data: a collection of chest X-ray reports and images, its 14 labels, its split and its tokens.

    python data.py --data demo            # prepare the demo collection and print a summary
    python data.py --data demo --json     # the same summary as one JSON object
    python data.py --data openi --data-dir DIR

prepare() reads a collection into a Collection, one sample per image, with a seeded split by report (or patient):
OpenI-format reports (the demo of demo.py, or the real OpenI fetched by download.py), MIMIC-CXR or a CSV (tables.py).
Then the report tokenizer, the image cache (image_cache.py), and normalise(): the one definition of a model's input.
"""
import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from demo import make_demo
from download import fetch_openi
from image_cache import cached_images
from openi import OPENI_URL, labels_from_mesh, read_openi
from reports import LABELS, UNCERTAIN_POLICIES, DataError
from tables import read_csv, read_mimic

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


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


# ------------------------------------------------------------------------------------------------ splits

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


# -------------------------------------------------------------------------------------------- collection

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
            root, reports_source, images_root = fetch_openi(data_dir, openi_url)
        return openi_collection(root, reports_source, images_root, split_seed, strict)
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
    """prepare() from a dict holding DATA_OPTIONS (vars(args), a checkpoint's config), then --train-fraction."""
    collection = prepare(**{name: options[name] for name in DATA_OPTIONS if name in options})
    return keep_train_fraction(collection, options.get("train_fraction", 1.0), options.get("split_seed", 0))


def keep_train_fraction(collection, fraction, seed):
    """Train on the first round(F n) of a seeded permutation of the n training reports: the same reports for every
    method and seed, a smaller F a subset of a larger one (a learning curve); validation and test unchanged."""
    if not 0 < fraction <= 1:
        raise DataError(f"--train-fraction {fraction}: give a fraction in (0, 1]")
    if fraction == 1:
        return collection                         # all of them: nothing to draw or recount at start-up
    ids, train = collection.split_ids["train"], collection.splits["train"]
    order = np.random.default_rng([seed, 1]).permutation(len(ids))
    keep = {ids[i] for i in order[:max(1, round(fraction * len(ids)))]}
    collection.split_ids["train"] = [report_id for report_id in ids if report_id in keep]
    collection.splits["train"] = train[[collection.reports[i].id in keep for i in collection.report_index[train]]]
    collection.summary.update(count_used(collection))
    return collection


# ------------------------------------------------------------------------------------------------ images

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
    def reports_in_splits():
        return set(collection.report_index[np.concatenate(list(collection.splits.values()))].tolist())
    before = reports_in_splits()                  # not the training reports that --train-fraction left out
    collection.splits = {split: np.setdiff1d(idx, bad) for split, idx in collection.splits.items()}
    lost = [collection.reports[i].id for i in sorted(before - reports_in_splits())]
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


def normalise(images, pixel_mean, pixel_std, augment=None):
    """uint8 images (B, S, S) -> the model's input x (B, 1, S, S) = (images / 255 - mean) / std, with the
    training split's pixel mean and std; `augment` (training only) acts on x in [0, 1] before normalising.
    Training, evaluation and single-image prediction all call this, so they cannot disagree on it."""
    x = images.float().div(255).unsqueeze(1)                                   # (B, 1, S, S) in [0, 1]
    if augment is not None:
        x = augment(x)
    return (x - pixel_mean) / pixel_std


# --------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts, vocab_size):
    """Byte-pair-encoding tokenizer trained on the given (training split) texts. [PAD] is id 0. BPE, as the
    WordPiece trainer breaks ties between equally frequent merges differently from run to run (unrepeatable)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]"], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def length_limit(tokenizer, texts, coverage=0.99, multiple=16, cap=256):
    """The report length (tokens) that covers `coverage` of the given (training) reports, rounded up to a
    multiple of 16 and at most `cap`: long enough for nearly every report, short enough for attention's T^2."""
    lengths = [len(encoding.ids) for encoding in tokenizer.encode_batch(texts)]
    return int(min(cap, multiple * np.ceil(np.percentile(lengths, 100 * coverage) / multiple)))


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


# ------------------------------------------------------------------------------------------------ entry

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
        add("--train-fraction", 1.0, type=float, help="train on this seeded fraction of the training reports, the "
                                                      "same for every method and seed; validation and test unchanged")


# --------------------------------------------------------------------------------------------- a run's data

def load_for_run(args, out, checkpoint, main_process=True):
    """Collection, tokenizer (trained on the training split's reports only) and the image cache; sets
    args.max_len from those reports when it is None.
    Only the main process writes splits.json and the tokenizer; under torchrun the others run this after it."""
    collection = prepare_from(vars(args))
    cache = image_cache(collection, args.image_size, args.strict)    # drops reports left without an image
    split_sha256 = split_hash(collection.split_ids)
    if checkpoint is not None and checkpoint["split_sha256"] != split_sha256:
        raise DataError(f"the data under {args.data_dir} now give a different split than {out}/last.pt "
                             f"was trained on; resume with the original data or start a new --out")
    if main_process:
        (out / "splits.json").write_text(json.dumps({"split_seed": args.split_seed} | collection.split_ids))
    tokenizer_path = out / "tokenizer.json"
    train_texts = [collection.reports[i].text for i in np.unique(collection.report_index[collection.splits["train"]])]
    if checkpoint is None and main_process:
        train_tokenizer(train_texts, args.vocab_size).save(str(tokenizer_path))
    tokenizer = load_tokenizer(tokenizer_path)
    if args.max_len is None:                     # --max-len not given: from the training reports (then saved)
        args.max_len = length_limit(tokenizer, train_texts)
        if main_process:
            print(f"--max-len {args.max_len}: covers 99% of the training reports' tokens (cap 256)")
    return collection, split_sha256, tokenizer, cache


def usage(collection):
    """'562 of 600 reports used (skipped: no_text 8, ...); 781 train / 121 val images', for the start of a run."""
    summary = collection.summary
    skipped = ", ".join(f"{reason} {n}" for reason, n in summary["skipped"].items() if n)
    return (f"{summary['reports_used']} of {summary['reports']} reports used (skipped: {skipped or 'none'}); "
            f"{len(collection.splits['train'])} train / {len(collection.splits['val'])} val images")


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
