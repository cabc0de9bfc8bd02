"""MIMIC-CXR-JPG and a user's own CSV: generated fixtures in exactly the real layout, read by
data.prepare."""
import csv
import gzip
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from vkd import metrics
from data import LABELS, SPLITS
from vkd import image_cache, tables

REPO = Path(__file__).resolve().parents[1]
# the real files list labels A-Z
CHEXPERT_COLUMNS = ["subject_id", "study_id"] + sorted(LABELS)
METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                    "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                    "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                    "PatientOrientationCodeSequence_CodeMeaning"]

FULL_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 \n INDICATION:  ___F with cough and fever.
 \n TECHNIQUE:  Chest PA and lateral
 \n COMPARISON:  ___
 \n FINDINGS:
 \n There is no focal consolidation, pleural effusion or pneumothorax.  The
 cardiomediastinal silhouette is {heart}.
 \n IMPRESSION:
 \n No acute cardiopulmonary process.
"""
IMPRESSION_ONLY = """                                 FINAL REPORT
 HISTORY:  ___-year-old man with chest pain.
 \n IMPRESSION:  Possible small left pleural effusion.  No pneumothorax.
"""
NO_SECTIONS = """                                 FINAL REPORT
 CHEST RADIOGRAPH PERFORMED ON ___
 \n COMPARISON:  Prior radiograph from ___.
 \n Portable AP view of the chest.  Right internal jugular line ends in the
 mid SVC.  Lungs are clear.
"""


def write_table(path, columns, rows, gz):
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    path = Path(f"{path}.gz") if gz else Path(path)
    path.write_bytes(gzip.compress(text.getvalue().encode()) if gz else text.getvalue().encode())


def write_jpg(path, seed, size=(40, 48), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3) if mode == "RGB" else size,
                                                  dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path, quality=95)
    return path


def make_mimic(root, num_subjects=12, gz=True, reports="zip", seed=0):
    """A small MIMIC-CXR-JPG 2.x folder: files/p1X/p<subject>/s<study>/<dicom>.jpg, the four tables,
    and the reports (mimic-cxr-reports.zip or s<study>.txt in the files/ tree). Returns what was
    written, per study."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    split_rows, metadata_rows, label_rows, studies = [], [], [], {}
    report_files = {}
    for s in range(num_subjects):
        subject = str(10_000_032 + 1_000_017 * s)                          # p10 ... p2X, 8 digits
        split = ["train", "train", "train", "train", "validate", "test"][s % 6]
        for k in range(2):
            study = str(50_000_000 + 37 * (2 * s + k))
            views = ["PA", "LATERAL"] if k == 0 else ["AP"]
            if s == 3 and k == 1:
                # a blank ViewPosition is not frontal
                views = ["AP", "", "PA"]
            dicoms = [f"{seed:02x}{s:06x}-{k:08x}-{v:08x}-3cf57f3c-3f0c1b3a"
                      for v in range(len(views))]
            folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
            for v, (dicom, view) in enumerate(zip(dicoms, views)):
                write_jpg(folder / f"{dicom}.jpg", seed=hash((s, k, v)) % 2**32)
                split_rows.append([dicom, study, subject, split])
                metadata_rows.append([dicom, subject, study, "CHEST (PA AND LAT)", view, 3056, 2544,
                                      21800506, 213014.531, "CHEST (PA AND LAT)",
                                      "postero-anterior", "Erect"])
            values = {name: str(rng.choice(["1.0", "0.0", "-1.0", ""], p=[0.3, 0.2, 0.1, 0.4]))
                      for name in LABELS}
            label_rows.append([subject, study] + [values[name] for name in sorted(LABELS)])
            text = [FULL_REPORT.format(heart="enlarged" if s % 2 else "normal"), IMPRESSION_ONLY,
                    NO_SECTIONS][(2 * s + k) % 3]
            report_files[f"files/p{subject[:2]}/p{subject}/s{study}.txt"] = text
            studies[study] = {"subject": subject, "split": split, "dicoms": dicoms, "views": views,
                              "labels": values}
    write_table(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"],
                split_rows, gz)
    write_table(root / "mimic-cxr-2.0.0-metadata.csv", METADATA_COLUMNS, metadata_rows, gz)
    write_table(root / "mimic-cxr-2.0.0-chexpert.csv", CHEXPERT_COLUMNS, label_rows, gz)
    negbio_rows = [row[:2] + ["1.0" if v == "-1.0" else v for v in row[2:]] for row in label_rows]
    write_table(root / "mimic-cxr-2.0.0-negbio.csv", CHEXPERT_COLUMNS, negbio_rows, gz)
    if reports == "zip":
        with zipfile.ZipFile(root / "mimic-cxr-reports.zip", "w") as z:
            for name, text in report_files.items():
                z.writestr(name, text)
    else:
        for name, text in report_files.items():
            (root / name).write_text(text)
    return studies


@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic") / "mimic-cxr-jpg"
    return root, make_mimic(root)


# --------------------------------------------------------------------------------- report sections

def test_report_sections_findings_and_impression():
    findings, impression = tables.report_sections(FULL_REPORT.format(heart="normal"))
    assert findings == ("There is no focal consolidation, pleural effusion or pneumothorax. "
                        "The cardiomediastinal silhouette is normal.")
    assert impression == "No acute cardiopulmonary process."


def test_report_sections_impression_only_and_the_last_paragraph_fallback():
    assert tables.report_sections(IMPRESSION_ONLY) == (
        "", "Possible small left pleural effusion. No pneumothorax.")
    assert tables.report_sections(NO_SECTIONS) == (
        "", "Portable AP view of the chest. Right internal jugular line ends in the mid SVC. "
            "Lungs are clear.")
    assert tables.report_sections("") == ("", "")


@pytest.mark.parametrize("text, expected", [("1.0", 1.0), ("0.0", 0.0), ("", 0.0), (" 1 ", 1.0),
                                            ("0", 0.0)])
def test_label_values(text, expected):
    assert tables.label_value(text, "zeros", "here") == expected


def test_uncertain_policies_and_bad_values():
    assert tables.label_value("-1.0", "zeros", "x") == 0.0
    assert tables.label_value("-1.0", "ones", "x") == 1.0
    assert np.isnan(tables.label_value("-1.0", "ignore", "x"))
    for bad in ("yes", "2.0", "0.5"):
        with pytest.raises(ValueError, match=f"line 7, Edema: '{bad}' is not 1, 0, -1 or blank"):
            tables.label_value(bad, "zeros", "line 7, Edema")


# ------------------------------------------------------------------------------------------- MIMIC

def expected_labels(values, policy):
    return np.array([tables.label_value(values[name], policy, "") for name in LABELS],
                    dtype=np.float32)


@pytest.mark.parametrize("policy", ["zeros", "ones", "ignore"])
def test_mimic_reads_the_official_split_frontal_views_and_labels(mimic, policy):
    root, studies = mimic
    collection = data.prepare("mimic", root, uncertain=policy)
    assert collection.summary["reports"] == len(studies) == 24
    assert collection.summary["reports_used"] == 24
    # 12 LATERAL + 1 blank ViewPosition
    assert collection.summary["skipped"] == {"not_frontal": 13}
    # one study has two frontal images
    assert len(collection.image_paths) == 24 + 1
    official = {"train": "train", "validate": "val", "test": "test"}
    for split in SPLITS:
        assert collection.split_ids[split] == sorted(f"s{k}" for k, v in studies.items()
                                                     if official[v["split"]] == split)
    for i, path in enumerate(collection.image_paths):
        study = collection.reports[collection.report_index[i]].id[1:]
        info = studies[study]
        assert path.parent.name == f"s{study}" and path.parent.parent.name == f"p{info['subject']}"
        assert info["views"][info["dicoms"].index(path.stem)] in ("PA", "AP")
        np.testing.assert_array_equal(collection.labels[i], expected_labels(info["labels"], policy))
    subjects = {split: {studies[r[1:]]["subject"] for r in ids}
                for split, ids in collection.split_ids.items()}
    # patient-disjoint
    assert not (subjects["train"] & subjects["val"] or subjects["train"] & subjects["test"])
    assert ("ignored_uncertain" in collection.summary) == (policy == "ignore")


def test_mimic_text_is_findings_and_impression(mimic):
    root, studies = mimic
    collection = data.prepare("mimic", root)
    texts = {r.id: r.text for r in collection.reports}
    first = sorted(studies)[0]
    assert texts[f"s{first}"] == ("There is no focal consolidation, pleural effusion or "
                                  "pneumothorax. The cardiomediastinal silhouette is normal. "
                                  "No acute cardiopulmonary process.")
    assert all("INDICATION" not in t and "FINAL REPORT" not in t for t in texts.values())


def test_mimic_plain_csv_txt_reports_negbio_and_all_views(tmp_path):
    root = tmp_path / "mimic"
    studies = make_mimic(root, num_subjects=6, gz=False, reports="txt", seed=1)
    collection = data.prepare("mimic", root, views="all", mimic_labels="negbio", uncertain="ignore")
    assert collection.summary["skipped"] == {}
    assert len(collection.image_paths) == sum(len(s["dicoms"]) for s in studies.values())
    # negbio fixture has no -1
    assert not np.isnan(collection.labels).any()
    texts = {r.id[1:]: r.text for r in collection.reports}
    assert all(texts[k] for k in studies)


def test_mimic_missing_image_report_and_label_row_are_counted_or_stop_with_strict(tmp_path):
    root = tmp_path / "mimic"
    studies = make_mimic(root, num_subjects=6)
    first, second = sorted(studies)[:2]
    info = studies[first]
    missing = (root / "files" / f"p{info['subject'][:2]}" / f"p{info['subject']}" / f"s{first}"
               / f"{info['dicoms'][0]}.jpg")
    missing.unlink()
    collection = data.prepare("mimic", root)
    assert collection.summary["skipped"]["missing_image"] == 1
    assert collection.summary["skipped_ids"]["missing_image"] == [str(missing)]
    # its only frontal image is gone
    assert f"s{first}" not in {r.id for r in collection.reports}
    assert collection.summary["skipped"]["no_image"] == 1
    with pytest.raises(data.DataError,
                       match=f"{info['dicoms'][0]}.jpg is listed in the split table but missing"):
        data.prepare("mimic", root, strict=True)


def test_mimic_bad_label_value_is_skipped_or_stops_with_strict(tmp_path):
    root = tmp_path / "mimic"
    make_mimic(root, num_subjects=6, gz=False)
    table = root / "mimic-cxr-2.0.0-chexpert.csv"
    lines = table.read_text().splitlines()
    lines[3] = lines[3].replace("1.0", "positive", 1) if "1.0" in lines[3] else lines[3] + "x"
    table.write_text("\n".join(lines) + "\n")
    collection = data.prepare("mimic", root)
    assert collection.summary["skipped"]["bad_label"] == 1
    assert collection.summary["reports_used"] == 11
    with pytest.raises(data.DataError, match="chexpert.csv line 4, "):
        data.prepare("mimic", root, strict=True)


def test_mimic_missing_files_and_columns_name_what_to_do(tmp_path):
    with pytest.raises(data.DataError,
                       match="no mimic-cxr-2.0.0-split.csv.*physionet.org/content/mimic-cxr-jpg"):
        data.prepare("mimic", tmp_path)
    root = tmp_path / "mimic"
    make_mimic(root, num_subjects=6, gz=False)
    (root / "mimic-cxr-2.0.0-metadata.csv").unlink()
    with pytest.raises(data.DataError, match="mimic-cxr-2.0.0-metadata.csv.*not found"):
        data.prepare("mimic", root)
    write_table(root / "mimic-cxr-2.0.0-metadata.csv", ["dicom_id", "View"], [], gz=False)
    with pytest.raises(data.DataError, match="metadata.csv has no column 'ViewPosition'"):
        data.prepare("mimic", root)


def test_data_py_json_summary_on_the_mimic_fixture(mimic, tmp_path):
    root, _ = mimic
    result = subprocess.run([sys.executable, "data.py", "--data", "mimic", "--data-dir", str(root),
                             "--json", "--uncertain", "ignore", "--image-size", "32"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["reports_used"] == 24 and summary["splits"] == {"train": 16, "val": 4, "test": 4}
    assert sum(summary["ignored_uncertain"].values()) > 0
    assert np.load(root / "cache" / "images-32.npy", mmap_mode="r").shape == (25, 32, 32)


# ------------------------------------------------------------------------------------ your own CSV

def write_csv(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def own_csv(folder, num_rows=30, extra_rows=()):
    """A CSV in a user's own format: relative and absolute image paths, labels with any names, RGB
    and gray."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_rows):
        image = write_jpg(folder / "img" / f"{i}.jpg", seed=i, mode="RGB" if i % 3 == 0 else "L")
        path = str(image) if i % 2 else f"img/{i}.jpg"
        rows.append([path, f"Report number {i}. {'Mass seen.' if i % 4 == 0 else 'Clear.'}",
                     1 if i % 4 == 0 else 0, ["1", "0", "-1", ""][i % 4]])
    return write_csv(folder / "labels.csv", ["image", "text", "mass", "tube"],
                     rows + list(extra_rows))


def test_own_csv_any_label_names_relative_paths_and_a_seeded_split(tmp_path):
    path = own_csv(tmp_path)
    collection = data.prepare("csv", csv=str(path), uncertain="ignore", split_seed=1)
    assert collection.label_names == ["mass", "tube"]
    assert collection.summary["reports_used"] == 30 and len(collection.image_paths) == 30
    assert collection.image_paths[0] == tmp_path / "img" / "0.jpg"
    np.testing.assert_array_equal(collection.labels[:4, 1], [1, 0, np.nan, 0])
    assert collection.summary["labels"] == {"mass": 8, "tube": 8}
    assert sum(collection.summary["splits"].values()) == 30
    assert collection.split_ids == data.split_reports([f"line{i}" for i in range(2, 32)], 1)
    images = data.image_cache(collection, 16)
    assert np.array_equal(images[3], image_cache.load_image(tmp_path / "img" / "3.jpg", 16))


def test_own_csv_split_and_report_id_columns(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(10):
        for k in range(2):                                                   # two images per report
            write_jpg(tmp_path / "img" / f"{i}_{k}.png", seed=i)
            rows.append([f"img/{i}_{k}.png", f"Text {i}.", i % 2, f"r{i}",
                         ["train", "train", "val", "test", "train"][i % 5]])
    path = write_csv(tmp_path / "own.csv", ["file", "report", "Effusion", "report_id", "split"],
                     rows)
    collection = data.prepare("csv", csv=str(path), csv_image_column="file",
                              csv_text_column="report")
    assert collection.label_names == ["Effusion"]
    assert collection.split_ids == {"train": ["r0", "r1", "r4", "r5", "r6", "r9"],
                                    "val": ["r2", "r7"], "test": ["r3", "r8"]}
    assert len(collection.image_paths) == 20 and collection.summary["reports_used"] == 10


def test_own_csv_bad_rows_are_counted_by_line_or_stop_with_strict(tmp_path):
    write_jpg(tmp_path / "img" / "ok.jpg", seed=1)
    path = own_csv(tmp_path, extra_rows=[["img/missing.jpg", "Text.", 1, 0],       # line 32
                                         ["img/ok.jpg", "Text.", "yes", 0],          # line 33
                                         ["img/ok.jpg", "   ", 1, 0]])               # line 34
    collection = data.prepare("csv", csv=str(path))
    skipped = collection.summary["skipped"]
    assert skipped == {"missing_image": 1, "bad_label": 1, "no_text": 1}
    assert collection.summary["skipped_ids"]["missing_image"] == ["line 32"]
    assert collection.summary["skipped_ids"]["bad_label"] == ["line 33"]
    with pytest.raises(data.DataError,
                       match=r"labels.csv line 32: image '.*img/missing.jpg' not found"):
        data.prepare("csv", csv=str(path), strict=True)
    lines = path.read_text().splitlines()
    del lines[31]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError,
                       match=r"labels.csv line 32, column 'mass': 'yes' is not 1, 0, -1 or blank"):
        data.prepare("csv", csv=str(path), strict=True)


def test_own_csv_missing_column_or_file_stops_with_a_message(tmp_path):
    path = own_csv(tmp_path, num_rows=12)
    with pytest.raises(data.DataError, match="labels.csv has no column 'report'"):
        data.prepare("csv", csv=str(path), csv_text_column="report")
    with pytest.raises(data.DataError, match="labels.csv has no column 'effusion'"):
        data.prepare("csv", csv=str(path), csv_labels="mass,effusion")
    with pytest.raises(data.DataError, match="nothing.csv: no such file"):
        data.prepare("csv", csv=str(tmp_path / "nothing.csv"))
    with pytest.raises(data.DataError, match="needs --csv FILE"):
        data.prepare("csv")


def test_own_csv_an_undecodable_image_is_skipped_and_counted(tmp_path):
    path = own_csv(tmp_path, num_rows=12)
    (tmp_path / "img" / "5.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    collection = data.prepare("csv", csv=str(path))
    data.image_cache(collection, 16)
    assert collection.summary["skipped"]["bad_image"] == 1
    assert collection.summary["skipped_ids"]["bad_image"] == [str(tmp_path / "img" / "5.jpg")]
    kept = np.concatenate(list(collection.splits.values()))
    assert 5 not in kept and len(kept) == 11                                  # sample 5 is 5.jpg
    with pytest.raises(data.DataError, match="cannot decode image .*5.jpg.*--strict"):
        data.image_cache(data.prepare("csv", csv=str(path)), 16, strict=True)


def test_mimic_studies_carry_their_patient_and_the_bootstrap_draws_whole_patients(mimic):
    root, studies = mimic
    collection = data.prepare("mimic", root)
    assert collection.bootstrap_unit == "patients"
    subject = np.array([studies[r.id[1:]]["subject"]
                        for r in collection.reports])[collection.report_index]  # (N,)
    same_patient = subject[:, None] == subject[None, :]
    assert np.array_equal(same_patient, collection.bootstrap_groups[:, None]
                          == collection.bootstrap_groups[None, :])
    assert len(np.unique(collection.report_index)) == 24 \
        and len(np.unique(collection.bootstrap_groups)) == 12
    for idx in metrics.bootstrap_indices(collection.bootstrap_groups, 20, seed=0):
        # every image of a patient drawn equally often
        counts = np.bincount(idx, minlength=len(subject))
        assert all(len(set(counts[subject == s])) == 1 for s in set(subject))


def test_own_csv_patient_column_splits_and_resamples_by_patient(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    # 40 reports of 10 patients, 2 images each
    for i in range(40):
        for k in range(2):
            write_jpg(tmp_path / "img" / f"{i}_{k}.png", seed=i)
            rows.append([f"img/{i}_{k}.png", f"Text {i}.", i % 2, f"r{i}", f"patient{i % 10}"])
    path = write_csv(tmp_path / "own.csv", ["image", "text", "Effusion", "report_id", "subject"],
                     rows)
    collection = data.prepare("csv", csv=str(path), csv_patient_column="subject", split_seed=2)
    assert collection.label_names == ["Effusion"] and collection.bootstrap_unit == "patients"
    patient_of = {f"r{i}": f"patient{i % 10}" for i in range(40)}
    patients = {split: {patient_of[rid] for rid in ids}
                for split, ids in collection.split_ids.items()}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])                 # no patient in two splits
    assert len(np.unique(collection.bootstrap_groups)) == 10
    plain = data.prepare("csv", csv=str(path), csv_patient_column="no such column",
                         csv_labels="Effusion")
    assert plain.bootstrap_unit == "reports" \
        and np.array_equal(plain.bootstrap_groups, plain.report_index)
    rows[5][4] = " "
    write_csv(tmp_path / "own.csv", ["image", "text", "Effusion", "report_id", "subject"], rows)
    with pytest.raises(data.DataError,
                       match=r"own.csv line 7: the patient column 'subject' is empty"):
        data.prepare("csv", csv=str(path), csv_patient_column="subject")


# ----------------------------------------------------------------------------- training end to end

TINY = ["--image-size", "32", "--batch-size", "8", "--cnn-width", "4", "--latent-dim", "8",
        "--text-dim", "16", "--max-len", "32", "--vocab-size", "200", "--bootstrap", "20",
        "--warmup-steps", "1", "--epochs", "2"]


def train_tiny(args, out):
    import train
    return train.train(train.get_args(args + TINY + ["--uncertain", "ignore", "--out", str(out)]))


def evaluate_json(*args):
    result = subprocess.run([sys.executable, "evaluate.py", "--json", "--bootstrap", "20",
                             *map(str, args)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout), result.stderr


@pytest.fixture(scope="module")
def mimic_run(mimic, tmp_path_factory):
    run = tmp_path_factory.mktemp("mimic-run") / "run"
    return run, train_tiny(["--data", "mimic", "--data-dir", str(mimic[0])], run)


def test_training_on_mimic_with_ignored_uncertain_labels(mimic_run):
    run, metrics = mimic_run
    assert list(metrics["per_label"]) == LABELS
    assert all(np.isfinite(json.loads(line)["loss"])
               for line in (run / "log.jsonl").read_text().splitlines())
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    assert checkpoint["label_names"] == LABELS and checkpoint["config"]["uncertain"] == "ignore"
    result, _ = evaluate_json("--ckpt", run / "best.pt")
    assert result["macro_auroc"] == pytest.approx(metrics["macro_auroc"])
    # 4 studies, 2 patients
    assert result["bootstrap_unit"] == "patients" and result["num_bootstrap_units"] == 2
    # train.py's own test
    assert metrics["bootstrap_unit"] == "patients" and metrics["num_bootstrap_units"] == 2
    compared, _ = evaluate_json("--compare", run / "best.pt", run / "best.pt")
    assert compared["bootstrap_unit"] == "patients" and compared["num_bootstrap_units"] == 2


def test_training_on_an_own_csv_with_its_own_label_names(tmp_path):
    run = tmp_path / "run"
    metrics = train_tiny(["--data", "csv", "--csv", str(own_csv(tmp_path / "own", num_rows=40))],
                         run)
    assert list(metrics["per_label"]) == ["mass", "tube"]
    assert torch.load(run / "best.pt", weights_only=True)["label_names"] == ["mass", "tube"]
    result, _ = evaluate_json("--ckpt", run / "best.pt")
    assert result["macro_auroc"] == pytest.approx(metrics["macro_auroc"])


def test_cross_dataset_evaluation_scores_the_shared_labels_only(mimic_run, tmp_path):
    """A MIMIC-trained checkpoint on another collection (a CSV with two of its labels and one it
    lacks)."""
    import evaluate
    run, _ = mimic_run
    (tmp_path / "img").mkdir()
    rows = [[f"img/{i}.jpg", f"Report {i}.", i % 2, (i // 2) % 2, i % 3 == 0] for i in range(40)]
    for i in range(40):
        write_jpg(tmp_path / "img" / f"{i}.jpg", seed=100 + i)
    path = write_csv(tmp_path / "other.csv",
                     ["image", "text", "Edema", "Pneumothorax", "Tuberculosis"],
                     [row[:4] + [int(row[4])] for row in rows])
    result, stderr = evaluate_json("--ckpt", run / "best.pt", "--data", "csv", "--csv", path)
    assert "2 shared labels; not in this collection, left out: No Finding" in stderr
    scored = {name for name, m in result["per_label"].items() if m["auroc"] is not None}
    assert scored == {"Edema", "Pneumothorax"}
    # the same numbers by hand: the model's Edema column against the CSV's Edema labels
    # on its test split
    collection = data.prepare("csv", csv=str(path))
    test = collection.splits["test"]
    model, checkpoint = evaluate.load_checkpoint(run / "best.pt")
    p, _ = evaluate.predict(model, data.image_cache(collection, 32), None, test,
                            checkpoint["config"], "cpu")
    k = LABELS.index("Edema")
    expected = metrics.auroc(collection.labels[test, collection.label_names.index("Edema")],
                             p[:, k])
    assert result["per_label"]["Edema"]["auroc"] == pytest.approx(expected)
    assert result["macro_auroc"] == pytest.approx(np.mean([result["per_label"][n]["auroc"]
                                                           for n in scored]))


def test_evaluate_json_is_one_object_on_stdout_when_an_image_cannot_be_decoded(mimic_run, tmp_path):
    run, _ = mimic_run
    (tmp_path / "img").mkdir()
    for i in range(30):
        write_jpg(tmp_path / "img" / f"{i}.jpg", seed=200 + i)
    (tmp_path / "img" / "7.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    path = write_csv(tmp_path / "other.csv", ["image", "text", "Edema"],
                     [[f"img/{i}.jpg", f"Report {i}.", i % 2] for i in range(30)])
    # json.loads(stdout)
    result, stderr = evaluate_json("--ckpt", run / "best.pt", "--data", "csv", "--csv", path)
    assert result["per_label"]["Edema"]["auroc"] is not None
    assert "warning: skipped 1 image(s) that cannot be decoded" in stderr and "7.jpg" in stderr


def test_cross_dataset_evaluation_without_shared_labels_says_so(mimic_run, tmp_path):
    run, _ = mimic_run
    path = own_csv(tmp_path, num_rows=12)
    result = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(run / "best.pt"),
                             "--data", "csv", "--csv", str(path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "the csv collection has none of these labels (['mass', 'tube'])" in result.stderr


@pytest.mark.parametrize("gz", [False, True])
def test_own_csv_saved_by_a_spreadsheet_with_a_byte_order_mark_reads_as_without(tmp_path, gz):
    """Spreadsheet programs save "CSV UTF-8" with a byte-order mark before the first column."""
    plain = data.prepare(data="csv", csv=str(own_csv(tmp_path / "plain")))
    path = own_csv(tmp_path / "bom")
    text = "\ufeff" + path.read_text(encoding="utf-8")
    if gz:
        path.unlink()
        path = path.with_name("labels.csv.gz")
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    marked = data.prepare(data="csv", csv=str(path))
    assert marked.label_names == plain.label_names == ["mass", "tube"]
    assert np.array_equal(marked.labels, plain.labels)
    assert marked.texts() == plain.texts()


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_own_csv_in_another_encoding_is_refused_naming_the_file(tmp_path, encoding):
    path = own_csv(tmp_path)
    path.write_bytes(path.read_text(encoding="utf-8").replace("Clear", "Cléar").encode(encoding))
    with pytest.raises(data.DataError,
                       match=rf"{path} is not UTF-8 text .*save the table as UTF-8"):
        data.prepare(data="csv", csv=str(path))


def test_the_study_runs_on_mimic_with_its_options_and_writes_into_its_folder(mimic, tmp_path):
    """study.py --data mimic, narrowed to one fraction and seed: the five methods and the
    controls train on the MIMIC layout with --uncertain ignore, and the document states the
    labeller, the uncertain policy, the views and the patients it resamples."""
    import study
    out = tmp_path / "study"
    plan = {"fractions": (1.0,), "seeds": (0,), "jobs": 2, "threads": 1, "demo_reports": 0,
            "settings": TINY[:-4] + ["--epochs", "2"]}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(study.PLANS, "demo", plan)
        study.main(["--data", "mimic", "--data-dir", str(mimic[0]), "--uncertain", "ignore",
                    "--out", str(out), "--bootstrap", "50"])
    document = (out / "STUDY.md").read_text()
    assert (f"Written by `python study.py --data mimic --data-dir {mimic[0]} --uncertain ignore "
            f"--out {out} --bootstrap 50`") in document
    assert ("labels: the CheXpert labeller (mimic-cxr-2.0.0-chexpert.csv); uncertain: left out "
            "of loss and metrics (--uncertain ignore); views: frontal (PA, AP); bootstrap unit: "
            "patients") in document
    assert "Not finished" not in document and "## The controls" in document
    assert "## Ablations" not in document                 # they need the fraction 0.25
    config = json.loads((out / "f1.0-distill-seed0" / "run.json").read_text())["config"]
    assert config["data"] == "mimic" and config["uncertain"] == "ignore"
