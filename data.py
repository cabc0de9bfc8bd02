"""Data: a collection of chest X-ray reports and images, its 14 labels, its split and its tokens.

    python data.py --data demo            # prepare the demo collection and print a summary
    python data.py --data demo --json     # the same summary as one JSON object
    python data.py --data openi --data-dir DIR

prepare() reads a collection into a Collection, one sample per image, with a seeded split by report
(or by patient). The readers sit beside it in vkd/: OpenI-format reports (the demo of demo.py, or
the real OpenI fetched by download.py), MIMIC-CXR-JPG or your own CSV (tables.py). Then the image
cache (image_cache.py), normalise(): the one definition of a model's input, and the tokenizer.
"""
import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vkd.demo import make_demo
from vkd.download import fetch_openi
from vkd.image_cache import cached_images
from vkd.openi import labels_from_mesh, read_openi
from vkd.options import add_data_args
from vkd.reports import LABELS, DataError
from vkd.runtime import write_text
from vkd.summary import count_used, drop_undecodable, labelling, show_summary
from vkd.tables import read_csv, read_mimic
from vkd.text_tuning import UNK

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


@dataclass
class Collection:
    """A prepared collection: one row per image (a sample), with its report's labels and text."""
    root: Path
    reports: list             # used reports, in reading order
    image_paths: list         # (N,) one PNG per sample
    report_index: np.ndarray  # (N,) index into `reports`
    labels: np.ndarray        # (N, K) float32: 1, 0, or NaN (not observed)
    splits: dict              # split -> sorted sample indices
    split_ids: dict           # split -> report ids (what splits.json holds)
    summary: dict             # counts of what was read and what is used (vkd/summary.py)
    label_names: list = field(default_factory=lambda: list(LABELS))   # the columns of `labels`
    bootstrap_unit: str = "reports"           # what evaluation resamples: reports or patients
    bootstrap_groups: np.ndarray = None       # (N,) each sample's report, or its patient

    def texts(self):
        return [report.text for report in self.reports]


# ------------------------------------------------------------------------------------------ splits

def split_reports(report_ids, seed, fractions=SPLIT_FRACTIONS):
    """Deterministic split by report: a seeded permutation of the sorted ids, cut at `fractions`."""
    ids = sorted(report_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    cuts = np.round(np.cumsum(fractions)[:-1] * len(ids)).astype(int)
    parts = np.split(order, cuts)
    return {split: sorted(ids[i] for i in part) for split, part in zip(SPLITS, parts)}


def split_by_patient(reports, seed, fractions=SPLIT_FRACTIONS):
    """A seeded split of the patients (as split_reports does for reports); every report goes where
    its patient is, so that no patient is in two splits."""
    patients = split_reports({report.patient_id for report in reports}, seed, fractions)
    split_of = {patient: split for split, ids in patients.items() for patient in ids}
    return {split: sorted(r.id for r in reports if split_of[r.patient_id] == split)
            for split in SPLITS}


def bootstrap_groups(reports, report_index):
    """(N,) bootstrap group of each sample, and its unit. The images of a report share its labels,
    and the studies of one patient are correlated, so resampling single images (or single reports
    when patients are known) would make intervals too narrow: the bootstrap draws whole patients
    when every report names one (MIMIC-CXR, a CSV with a patient column), else whole reports."""
    patients = [report.patient_id for report in reports]
    if all(patients):
        _, patient_index = np.unique(patients, return_inverse=True)
        return patient_index[report_index], "patients"
    return report_index, "reports"


def split_hash(split_ids):
    return hashlib.sha256(json.dumps(split_ids, sort_keys=True).encode()).hexdigest()


# -------------------------------------------------------------------------------------- collection

def assemble(root, reports, report_labels, paths, read_summary, split_ids, label_names=LABELS):
    """Used reports, their labels (R, K) and image paths -> Collection, one sample per image."""
    if not reports:
        raise DataError(f"no usable report under {root}: skipped {read_summary['skipped']}")
    empty = [split for split in SPLITS if not split_ids.get(split)]
    if empty:
        raise DataError(f"no usable report under {root} falls in the {' and '.join(empty)} "
                        f"split; {len(reports)} reports are too few or the split column leaves "
                        f"it empty")
    report_index = np.array([i for i, report in enumerate(reports) for _ in paths[report.id]])
    image_paths = [path for report in reports for path in paths[report.id]]
    split_of_report = {rid: split for split, ids in split_ids.items() for rid in ids}
    sample_split = np.array([split_of_report[r.id] for r in reports])[report_index]     # (N,)
    summary = {key: read_summary[key] for key in ("reports", "skipped", "skipped_ids")}
    collection = Collection(
        root=Path(root), reports=reports, image_paths=image_paths, report_index=report_index,
        labels=report_labels[report_index].astype(np.float32),
        splits={s: np.flatnonzero(sample_split == s) for s in SPLITS},
        split_ids={split: split_ids[split] for split in SPLITS}, summary=summary,
        label_names=list(label_names))
    summary.update(count_used(collection))
    groups, unit = bootstrap_groups(reports, report_index)
    collection.bootstrap_groups, collection.bootstrap_unit = groups, unit
    return collection


def openi_collection(root, reports_source, images_root, split_seed, strict=False):
    """OpenI-format reports and PNGs -> Collection: labels from the MeSH majors, split by report."""
    reports, paths, read_summary = read_openi(reports_source, images_root, strict)
    labels = np.zeros((0, len(LABELS)))
    if reports:
        labels = np.stack([labels_from_mesh(r.majors) for r in reports])       # (R, 14)
    split_ids = split_reports(list(paths), split_seed)
    collection = assemble(root, reports, labels, paths, read_summary, split_ids)
    collection.summary["sources"] = {"reports": str(reports_source), "images": str(images_root)}
    return collection


def prepare(data="demo", data_dir="data", split_seed=0, demo_reports=1500, demo_seed=0,
            openi_url=None, strict=False, uncertain="zeros", mimic_labels="chexpert",
            views="frontal", csv=None, csv_image_column="image", csv_text_column="text",
            csv_labels=None, csv_patient_column="patient_id"):
    """Read a collection (drawing the demo or downloading OpenI first if needed; openi_url None:
    the official address) -> Collection. Images are not decoded here."""
    if data == "demo":
        folder = Path(data_dir) / f"demo-{demo_reports}-seed{demo_seed}"
        root = make_demo(folder, demo_reports, demo_seed)
        return openi_collection(root, root / "ecgen-radiology", root / "NLMCXR_png", split_seed,
                                strict)
    if data == "openi":
        root, reports_source, images_root = fetch_openi(data_dir, openi_url)
        return openi_collection(root, reports_source, images_root, split_seed, strict)
    if data == "mimic":
        reports, labels, paths, read_summary, split_ids = read_mimic(data_dir, mimic_labels,
                                                                     uncertain, views, strict)
        return assemble(data_dir, reports, labels, paths, read_summary, split_ids)
    if data != "csv":
        raise DataError(f"unknown --data {data!r}: choose demo, openi, mimic or csv")
    if not csv:
        raise DataError("--data csv needs --csv FILE")
    names = [name.strip() for name in csv_labels.split(",")] if csv_labels else None
    reports, labels, paths, read_summary, split_ids, names = read_csv(
        csv, csv_image_column, csv_text_column, names, uncertain, strict, csv_patient_column)
    if split_ids is None:                    # no split column: seeded, by patient when known
        by_patient = reports and all(report.patient_id for report in reports)
        if by_patient:
            split_ids = split_by_patient(reports, split_seed)
        else:
            split_ids = split_reports(list(paths), split_seed)
    return assemble(Path(csv).parent, reports, labels, paths, read_summary, split_ids, names)


DATA_OPTIONS = ("data", "data_dir", "split_seed", "demo_reports", "demo_seed", "openi_url",
                "strict", "uncertain", "mimic_labels", "views", "csv", "csv_image_column",
                "csv_text_column", "csv_labels", "csv_patient_column")


def prepare_from(options):
    """prepare() from a dict holding DATA_OPTIONS (vars(args), a checkpoint's config), then
    --train-fraction."""
    collection = prepare(**{name: options[name] for name in DATA_OPTIONS if name in options})
    collection.summary["labels_from"] = labelling(options)
    fraction, seed = options.get("train_fraction", 1.0), options.get("split_seed", 0)
    return keep_train_fraction(collection, fraction, seed)


def keep_train_fraction(collection, fraction, seed):
    """Train on the first round(F n) of a seeded permutation of the n training reports: the same
    reports for every method and seed, a smaller F a subset of a larger one (a learning curve);
    validation and test unchanged."""
    if not 0 < fraction <= 1:
        raise DataError(f"--train-fraction {fraction}: give a fraction in (0, 1]")
    if fraction == 1:
        return collection                         # all of them: nothing to draw or recount
    ids, train = collection.split_ids["train"], collection.splits["train"]
    order = np.random.default_rng([seed, 1]).permutation(len(ids))
    keep = {ids[i] for i in order[:max(1, round(fraction * len(ids)))]}
    collection.split_ids["train"] = [report_id for report_id in ids if report_id in keep]
    kept = [collection.reports[i].id in keep for i in collection.report_index[train]]
    collection.splits["train"] = train[kept]
    collection.summary.update(count_used(collection))
    return collection


# ------------------------------------------------------------------------------------------ images

def image_cache(collection, size, strict=False, workers=None):
    """The collection's uint8 image cache (N, size, size); images that cannot be decoded leave the
    splits and are counted (drop_undecodable), or stop the run with --strict."""
    workers = workers or min(8, os.cpu_count() or 1)
    images, bad = cached_images(collection.image_paths, size, collection.root / "cache", workers)
    if bad:
        drop_undecodable(collection, bad, strict)
    return images


def normalise(images, pixel_mean, pixel_std, augment=None):
    """uint8 images (B, S, S) -> the model's input x (B, 1, S, S) = (images / 255 - mean) / std,
    with the training split's pixel mean and std; `augment` (training only) acts on x in [0, 1]
    before normalising. Training, evaluation and single-image prediction all call this, so they
    cannot disagree on it."""
    x = images.float().div(255).unsqueeze(1)                         # (B, 1, S, S) in [0, 1]
    if augment is not None:
        x = augment(x)
    return (x - pixel_mean) / pixel_std


# --------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts, vocab_size):
    """Byte-pair-encoding tokenizer trained on the given (training split) texts; [PAD] is id 0.
    BPE, as the WordPiece trainer breaks ties between equally frequent merges differently from run
    to run (unrepeatable)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]"],
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def length_limit(tokenizer, texts, coverage=0.99, multiple=16, cap=256):
    """The report length (tokens) that covers `coverage` of the given (training) reports, rounded
    up to a multiple of 16 and at most `cap`: long enough for nearly every report, short enough for
    attention's T^2."""
    lengths = [len(encoding.ids) for encoding in tokenizer.encode_batch(texts)]
    return int(min(cap, multiple * np.ceil(np.percentile(lengths, 100 * coverage) / multiple)))


def load_tokenizer(path):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(path))


def encode_texts(tokenizer, texts, max_len):
    """(N, max_len) int64 token ids, truncated and right-padded with [PAD] = 0. An empty text
    (--report-control blank) is one [UNK]: attention needs a token to attend to."""
    tokens = np.zeros((len(texts), max_len), dtype=np.int64)
    for i, encoding in enumerate(tokenizer.encode_batch(texts)):
        ids = encoding.ids[:max_len] or [UNK]
        tokens[i, :len(ids)] = ids
    return tokens


def sample_tokens(collection, tokenizer, max_len, control="none", seed=0):
    """(N, max_len) token ids of each sample's report (each report is tokenised once), the
    training reports' texts under --report-control `control` (controlled_texts)."""
    texts = controlled_texts(collection, control, seed)
    return encode_texts(tokenizer, texts, max_len)[collection.report_index]


def controlled_texts(collection, control="none", seed=0):
    """The reports' texts; with a control, the training reports' only: `shuffled` gives each the
    text of another training report (a seeded cycle through a permutation of them: nobody keeps
    its own; the same for every method and training seed), `blank` an empty text. Under shuffled
    a teacher keeps the statistics of real reports and loses their information; under blank it
    loses both. Validation and test reports keep theirs."""
    texts = collection.texts()
    if control == "none":
        return texts
    train = np.unique(collection.report_index[collection.splits["train"]])   # report indices
    if control == "blank":
        for i in train:
            texts[i] = ""
        return texts
    cycle = train[np.random.default_rng([seed, 2]).permutation(len(train))]
    originals = {i: texts[i] for i in train}
    for i, j in zip(cycle, np.roll(cycle, -1)):          # report i reads report j's text
        texts[i] = originals[j]
    return texts


# ------------------------------------------------------------------------------------ a run's data

def load_for_run(args, out, checkpoint, main_process=True):
    """Collection, tokenizer (trained on the training split's reports only) and image cache; sets
    args.max_len from those reports when it is None. Only the main process writes splits.json and
    the tokenizer; under torchrun the others run this after it."""
    collection = prepare_from(vars(args))
    cache = image_cache(collection, args.image_size, args.strict)   # may drop undecodable images
    split_sha256 = split_hash(collection.split_ids)
    if checkpoint is not None and checkpoint["split_sha256"] != split_sha256:
        raise DataError(f"the data under {args.data_dir} now give a different split than "
                        f"{out}/last.pt was trained on; resume with the original data or start a "
                        f"new --out")
    if main_process:
        splits = {"split_seed": args.split_seed} | collection.split_ids
        write_text(out / "splits.json", json.dumps(splits))
    tokenizer_path = out / "tokenizer.json"
    train_reports = np.unique(collection.report_index[collection.splits["train"]])
    train_texts = [collection.reports[i].text for i in train_reports]
    if checkpoint is None and main_process:
        tokenizer_json = train_tokenizer(train_texts, args.vocab_size).to_str(pretty=True)
        write_text(tokenizer_path, tokenizer_json)              # as Tokenizer.save writes it
    tokenizer = load_tokenizer(tokenizer_path)
    if args.max_len is None:                    # not given: from the training reports, then saved
        args.max_len = length_limit(tokenizer, train_texts)
        if main_process:
            print(f"--max-len {args.max_len}: covers 99% of the training reports' tokens (cap 256)")
    return collection, split_sha256, tokenizer, cache


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(parser)
    parser.add_argument("--json", action="store_true",
                        help="print the summary as one JSON object (default: off)")
    args = parser.parse_args()
    try:
        collection = prepare_from(vars(args))
        image_cache(collection, args.image_size, args.strict)
    except DataError as error:
        sys.exit(f"error: {error}")
    show_summary(collection, args.json)      # a table, or one JSON object


if __name__ == "__main__":
    main()
