"""Collections whose labels come in CSV tables: MIMIC-CXR-JPG 2.x and a user's own CSV.

Both are read into the same Collection as OpenI (data.py), so training, the tokenizer and the image
cache do not know which collection they see. Label values follow the CheXpert labeller's encoding
in both:

    1 positive    0 negative    -1 uncertain (--uncertain zeros | ones | ignore)
    blank: not mentioned = 0

Under `ignore` an uncertain label becomes NaN: model.bce leaves it out of the loss and metrics.py
out of AUROC.
"""
import csv
import gzip
import io
import re
import zipfile
from pathlib import Path

import numpy as np

from vkd.reports import LABELS, DataError, Report

MIMIC_PREFIX = "mimic-cxr-2.0.0"
MIMIC_URL = "https://physionet.org/content/mimic-cxr-jpg/"
FRONTAL_VIEWS = {"PA", "AP"}
MIMIC_SPLITS = {"train": "train", "validate": "val", "test": "test"}
# a section header of a MIMIC report: a line that starts with capitals and a colon,
# e.g. " FINDINGS:"
SECTION_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z ()/&,-]*[A-Z)]):", re.MULTILINE)


def label_value(text, policy, where):
    """One cell of a label column -> 1.0, 0.0 or NaN (uncertain under `ignore`). Raises ValueError
    naming `where`."""
    text = text.strip()
    if text == "":
        return 0.0                                  # not mentioned in the report
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not 1, 0, -1 or blank") from None
    if value == -1:
        return {"zeros": 0.0, "ones": 1.0, "ignore": float("nan")}[policy]
    if value not in (0, 1):
        raise ValueError(f"{where}: {text!r} is not 1, 0, -1 or blank")
    return value


def open_table(folder, name):
    """Rows of `name` or `name.gz` in `folder` as dicts (Rows), and the path that was opened."""
    for path in (Path(folder) / name, Path(folder) / f"{name}.gz"):
        if path.exists():
            raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
            # utf-8-sig: the byte-order mark that spreadsheet programs write ("CSV UTF-8") is
            # skipped; without one it reads plain UTF-8
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
            return Rows(csv.DictReader(text), path), path
    raise DataError(f"{Path(folder) / name}(.gz) not found")


class Rows:
    """A csv.DictReader whose file turns out not to be UTF-8 (e.g. saved as Latin-1 or UTF-16):
    a DataError naming the file and its first byte that is not UTF-8, and saying to save it as
    UTF-8, instead of a UnicodeDecodeError."""

    def __init__(self, reader, path):
        self.reader, self.path = reader, path

    def error(self, error):
        bad = error.object[error.start:error.start + 1]
        return DataError(f"{self.path} is not UTF-8 text (a byte {bad!r}: {error.reason}); "
                         f"save the table as UTF-8 (in a spreadsheet program: CSV UTF-8)")

    @property
    def fieldnames(self):
        try:
            return self.reader.fieldnames
        except UnicodeDecodeError as error:
            raise self.error(error) from None

    def __iter__(self):
        try:
            yield from self.reader
        except UnicodeDecodeError as error:
            raise self.error(error) from None


def require_columns(rows, path, columns):
    missing = [c for c in columns if c not in (rows.fieldnames or [])]
    if missing:
        raise DataError(f"{path} has no column {', '.join(map(repr, missing))} "
                        f"(it has: {rows.fieldnames})")


def count(summary, reason, item_id=None):
    """Count a skipped item under `reason`, keeping its id (for run.json) when it has one."""
    summary["skipped"][reason] = summary["skipped"].get(reason, 0) + 1
    if item_id is not None:
        summary["skipped_ids"].setdefault(reason, []).append(item_id)


def skip(summary, reason, item_id, strict, message):
    """A problem with one item: counted like `count`, or with --strict, stop with `message`."""
    if strict:
        raise DataError(f"{message} (--strict; without it this {reason} item would be skipped "
                        "and counted)")
    count(summary, reason, item_id)


# ---------------------------------------------------------------------------------------- MIMIC-CXR

def report_sections(text):
    """A MIMIC free-text report -> (findings, impression), the model's t. When both sections are
    missing, the last paragraph stands in as the impression (many reports are one impression-like
    paragraph)."""
    headers = list(SECTION_HEADER.finditer(text))
    sections = {}
    for header, following in zip(headers, headers[1:] + [None]):
        end = following.start() if following else len(text)
        sections[header.group(1).strip()] = " ".join(text[header.end():end].split())
    findings, impression = sections.get("FINDINGS", ""), sections.get("IMPRESSION", "")
    if findings or impression:
        return findings, impression
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    return "", paragraphs[-1] if paragraphs else ""


def read_reports(root, study_ids):
    """{study id: raw text} for the wanted studies, from mimic-cxr-reports.zip or the files/ tree's
    s*.txt."""
    archive = root / "mimic-cxr-reports.zip"
    texts = {}
    if archive.exists():
        try:
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():                    # members are read, never extracted
                    match = re.search(r"(?:^|/)s(\d+)\.txt$", name)
                    if match and match.group(1) in study_ids:
                        texts[match.group(1)] = z.read(name).decode("utf-8", errors="replace")
        except zipfile.BadZipFile as error:
            raise DataError(f"{archive} is not a readable zip ({error}); "
                            "download it again") from None
        return texts
    for study_id, path in study_ids.items():
        if path.exists():
            texts[study_id] = path.read_text(encoding="utf-8", errors="replace")
    return texts


def read_mimic(root, labeler="chexpert", uncertain="zeros", views="frontal", strict=False):
    """MIMIC-CXR-JPG folder -> (reports, report labels (R, 14), {report id: [jpg paths]}, summary,
    split ids).

    One report per study (id "s<study_id>") carrying its patient (subject_id); the official split is
    used as it is (patient-disjoint), and evaluation resamples patients."""
    root = Path(root)
    if not any((root / f"{MIMIC_PREFIX}-split.csv{gz}").exists() for gz in ("", ".gz")):
        raise DataError(f"no {MIMIC_PREFIX}-split.csv(.gz) in {root}: --data-dir must be the "
                        f"MIMIC-CXR-JPG folder holding files/ and the {MIMIC_PREFIX}-*.csv.gz "
                        f"tables ({MIMIC_URL}, credentialed access; reports: "
                        f"mimic-cxr-reports.zip from the MIMIC-CXR project, put next to them)")
    summary = {"skipped": {}, "skipped_ids": {}}

    rows, path = open_table(root, f"{MIMIC_PREFIX}-metadata.csv")
    require_columns(rows, path, ["dicom_id", "ViewPosition"])
    view_of = {row["dicom_id"]: row["ViewPosition"].strip() for row in rows}

    rows, path = open_table(root, f"{MIMIC_PREFIX}-{labeler}.csv")
    require_columns(rows, path, ["subject_id", "study_id"] + LABELS)
    labels_of = {}
    for line, row in enumerate(rows, start=2):
        try:
            labels_of[row["study_id"]] = [label_value(row[name], uncertain,
                                                      f"{path} line {line}, {name}")
                                          for name in LABELS]
        except ValueError as error:
            skip(summary, "bad_label", f"s{row['study_id']}", strict, str(error))
            labels_of[row["study_id"]] = None               # counted once, as bad_label

    rows, path = open_table(root, f"{MIMIC_PREFIX}-split.csv")
    require_columns(rows, path, ["dicom_id", "study_id", "subject_id", "split"])
    # study id -> (subject id, split, [dicom ids]) in file order
    studies = {}
    for line, row in enumerate(rows, start=2):
        if row["split"] not in MIMIC_SPLITS:
            raise DataError(f"{path} line {line}: split {row['split']!r} "
                            "is not train, validate or test")
        study = studies.setdefault(row["study_id"],
                                   (row["subject_id"], MIMIC_SPLITS[row["split"]], []))
        if study[1] != MIMIC_SPLITS[row["split"]]:
            raise DataError(f"{path} line {line}: study {row['study_id']} is in two splits")
        view = view_of.get(row["dicom_id"], "")
        if views == "all" or view in FRONTAL_VIEWS:
            study[2].append(row["dicom_id"])
        else:
            count(summary, "not_frontal")                    # an image, not a problem: no id kept

    def study_folder(subject_id, study_id):
        return root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}"

    texts = read_reports(root, {study_id: study_folder(subject, study_id).with_suffix(".txt")
                                for study_id, (subject, _, _) in studies.items()})
    reports, report_labels, paths, split_ids = (
        [], [], {}, {split: [] for split in MIMIC_SPLITS.values()})
    for study_id, (subject_id, split, dicom_ids) in studies.items():
        report_id = f"s{study_id}"
        jpgs = [study_folder(subject_id, study_id) / f"{d}.jpg" for d in dicom_ids]
        for jpg in jpgs:
            if not jpg.exists():
                skip(summary, "missing_image", str(jpg), strict,
                     f"{jpg} is listed in the split table but missing")
        jpgs = [jpg for jpg in jpgs if jpg.exists()]
        findings, impression = report_sections(texts[study_id]) if study_id in texts else ("", "")
        if labels_of.get(study_id, 0) is None:
            continue
        reason = ("no_labels" if study_id not in labels_of
                  else "no_report" if study_id not in texts
                  else "no_text" if not (findings or impression)
                  else "no_image" if not jpgs else None)
        if reason:
            count(summary, reason, report_id)
            continue
        reports.append(Report(id=report_id, findings=findings, impression=impression, majors=[],
                              image_ids=dicom_ids, patient_id=subject_id))
        report_labels.append(labels_of[study_id])
        paths[report_id] = jpgs
        split_ids[split].append(report_id)
    summary["reports"] = len(studies)
    labels = np.array(report_labels, dtype=np.float32).reshape(-1, len(LABELS))
    return reports, labels, paths, summary, {split: sorted(ids) for split, ids in split_ids.items()}


# ------------------------------------------------------------------------------------- your own CSV

CSV_SPLITS = {"train": "train", "val": "val", "validate": "val", "test": "test"}


def read_csv(csv_path, image_column="image", text_column="text", label_columns=None,
             uncertain="zeros", strict=False, patient_column="patient_id"):
    """A user's CSV -> (reports, report labels (R, K), {report id: [paths]}, summary, split ids or
    None, names).

    One row per image: `image_column` (a path, relative ones resolve against the CSV's folder),
    `text_column` (the report), one column per label (every other column unless `label_columns`
    names them). Optional columns: `report_id` (rows sharing it are the images of one report;
    default: each row is its own report), `patient_column` (the patient of the report: the seeded
    split and the bootstrap are then by patient) and `split` (train/val/test; default: a seeded
    70/10/20 split by report, or by patient)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"--csv {csv_path}: no such file")
    rows, _ = open_table(csv_path.parent, csv_path.name)
    optional = {"report_id", "split", patient_column}
    if label_columns is None:
        label_columns = [c for c in rows.fieldnames or []
                         if c not in {image_column, text_column} | optional]
    require_columns(rows, csv_path, [image_column, text_column] + list(label_columns))
    if not label_columns:
        raise DataError(f"{csv_path} has no label column besides {image_column!r} and "
                        f"{text_column!r}")
    has_split, has_patient = "split" in rows.fieldnames, patient_column in rows.fieldnames
    summary = {"skipped": {}, "skipped_ids": {}}
    reports, report_labels, paths, split_of, found = {}, {}, {}, {}, set()
    for line, row in enumerate(rows, start=2):
        where = f"{csv_path} line {line}"
        report_id = (row.get("report_id") or "").strip() or f"line{line}"
        found.add(report_id)
        patient_id = (row[patient_column] or "").strip() if has_patient else None
        if has_patient and not patient_id:
            raise DataError(f"{where}: the patient column {patient_column!r} is empty "
                            f"(give every row its patient, or remove the column)")
        try:
            y = [label_value(row[name] or "", uncertain, f"{where}, column {name!r}")
                 for name in label_columns]
        except ValueError as error:
            skip(summary, "bad_label", f"line {line}", strict, str(error))
            continue
        name = (row[image_column] or "").strip()
        image = Path(name) if Path(name).is_absolute() else csv_path.parent / name
        if not name or not image.is_file():
            skip(summary, "missing_image", f"line {line}", strict,
                 f"{where}: image {str(image)!r} not found")
            continue
        text = " ".join((row[text_column] or "").split())
        if not text:
            count(summary, "no_text", f"line {line}")
            continue
        split = None
        if has_split:
            split = CSV_SPLITS.get(row["split"].strip().lower())
            if split is None:
                raise DataError(f"{where}: split {row['split']!r} is not train, val or test")
        if report_id in reports:
            same = (reports[report_id].text == text and split_of[report_id] == split
                    and reports[report_id].patient_id == patient_id
                    and np.array_equal(report_labels[report_id], y, equal_nan=True))
            if not same:
                skip(summary, "conflicting_row", f"line {line}", strict,
                     f"{where}: report {report_id!r} has another text, split, patient or labels "
                     "on an earlier line")
                continue
            paths[report_id].append(image)
            continue
        reports[report_id] = Report(id=report_id, findings=text, impression="", majors=[],
                                    image_ids=[image.stem], patient_id=patient_id)
        report_labels[report_id], paths[report_id], split_of[report_id] = y, [image], split
    summary["reports"] = len(found)
    labels = (np.array(list(report_labels.values()), dtype=np.float32)
              .reshape(-1, len(label_columns)))
    split_ids = None
    if has_split:
        split_ids = {s: sorted(rid for rid, split in split_of.items() if split == s)
                     for s in ("train", "val", "test")}
    return list(reports.values()), labels, paths, summary, split_ids, list(label_columns)
