"""Data: OpenI XML parsing and skip rules, MeSH -> CheXpert labels, report-level splits, image
decoding and cache, tokenizer, and the `python data.py --json` summary.

Every fixture is written under tmp_path in the real OpenI schema (modelled on the files in
NLMCXR_reports.tgz: root <eCitation>, <uId id="CXR{n}"/>, four <AbstractText Label=...> sections,
<MeSH> with <major>/<automatic>, <parentImage id=...> blocks), so the tests need neither the real
collection nor the network.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pytest
from PIL import Image

import data
from data import LABELS, SPLITS
from vkd import image_cache, openi
from vkd.openi import MESH_RULES
from vkd.reports import Report

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------- fixture writers

def report_xml(number, findings="", impression="", comparison="None.", indication="Cough",
               majors=("normal",), automatic=(), image_ids=(), uid=None):
    """One report in the OpenI schema. Empty sections are self-closing, as in the real files (e.g.
    3.xml)."""
    def section(label, text):
        return (f'<AbstractText Label="{label}">{escape(text)}</AbstractText>' if text
                else f'<AbstractText Label="{label}"/>')
    mesh = "".join(f"\n      <major>{escape(m)}</major>\n   " for m in majors)
    mesh += "".join(f"\n      <automatic>{escape(a)}</automatic>\n   " for a in automatic)
    images = "".join(f"""
   <parentImage id="{image_id}">
      <figureId>F{k + 1}</figureId>
      <caption>Xray Chest PA and Lateral</caption>
      <panel type="single">
         <url>/hadoop/storage/radiology/extract/{image_id}.jpg</url>
         <imgModality>7</imgModality>
         <region type="panel">
            <globalImageFeatures>
               <CEDD>f2p0k1352</CEDD>
            </globalImageFeatures>
         </region>
      </panel>
   </parentImage>""" for k, image_id in enumerate(image_ids))
    return f"""<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="{uid or f'CXR{number}'}"/>
   <pmcId id="{number}"/>
   <docSource>CXR</docSource>
   <IUXRId id="{number}"/>
   <licenseType>open-access</licenseType>
   <articleURL/>
   <publisher>Indiana University</publisher>
   <title>Indiana University Chest X-ray Collection</title>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <Journal>
            <JournalIssue><PubDate><Year>2013</Year><Month>08</Month><Day>01</Day></PubDate>\
</JournalIssue>
         </Journal>
         <ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>
         <Abstract>
            {section("COMPARISON", comparison)}
            {section("INDICATION", indication)}
            {section("FINDINGS", findings)}
            {section("IMPRESSION", impression)}
         </Abstract>
         <Affiliation>Indiana University</Affiliation>
      </Article>
      <IMedAuthor>Marc David Kohli MD</IMedAuthor>
   </MedlineCitation>
   <MeSH>
   {mesh}
   </MeSH>{images}
</eCitation>"""


def write_png(path, pixels):
    """Write an array with PIL: (H, W) uint8 -> L, uint16 -> I;16, (H, W, 2/3/4) -> LA/RGB/RGBA;
    .jpg -> JPEG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


def random_gray(seed, shape=(12, 10)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


NORMAL_FINDINGS = ("The cardiac silhouette and mediastinum size are within normal limits. "
                   "There is no pneumothorax.")
# file name -> report, one per case in the samples README (the file names match the real samples)
CASES = {
    "1.xml": dict(number=1, findings=NORMAL_FINDINGS, impression="Normal chest x-XXXX.",
                  majors=["normal"], image_ids=["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]),
    "3.xml": dict(number=3, comparison="", findings="", majors=["normal"],
                  impression="No displaced rib fractures, pneumothorax, or pleural effusion "
                             "identified.",
                  image_ids=["CXR3_IM-1384-1001", "CXR3_IM-1384-2001"]),
    "9.xml": dict(number=9, findings="Calcified granuloma is again seen in the right upper lobe.",
                  impression="CT chest is recommended. "
                             "Dr. XXXX<XXXX>technologist receipt of the results.",
                  majors=["Calcified Granuloma/lung/upper lobe/right",
                          "Density/cardiophrenic angle/left"],
                  automatic=["calcified granuloma"],
                  image_ids=["CXR9_IM-2407-1001", "CXR9_IM-2407-2001"]),
    "16.xml": dict(number=16, comparison="", indication="", findings="", impression="",
                   majors=["normal"], image_ids=["CXR16_IM-0389-1001", "CXR16_IM-0389-2001"]),
    "39.xml": dict(number=39, findings="Both lungs are clear and expanded.",
                   impression="No active disease.", majors=["No Indexing"],
                   image_ids=["CXR39_IM-1978-1001", "CXR39_IM-1978-2001"]),
    "64.xml": dict(number=64,
                   findings="There is a small to moderate sized right apical pneumothorax.",
                   impression="Small to moderate right apical pneumothorax.",
                   majors=["Technical Quality of Image Unsatisfactory ",
                           "Pneumothorax/apex/right/moderate"],
                   automatic=["pneumothorax", "Pneumothorax"],
                   image_ids=["CXR64_IM-2218-2001", "CXR64_IM-2218-4004"]),
    "156.xml": dict(number=156, findings="Stable left-sided ICD.",
                    impression="1. No acute process.",
                    majors=["Implanted Medical Device/left", "Spine/degenerative"], image_ids=[]),
    "846.xml": dict(number=846, findings="Heart size appears normal.",
                    impression="No evidence of active disease.", majors=["Granuloma"],
                    image_ids=[f"CXR846_IM-2368-0001-000{k}" for k in range(1, 5)]),
    "1000.xml": dict(number=1000, findings="Left lower lobe airspace disease.",
                     impression="Pneumonia.",
                     majors=["Airspace Disease/lung/lower lobe/left", "Pneumonia/lower lobe/left"],
                     image_ids=["CXR1000_IM-0003-1001", "CXR1000_IM-0003-2001",
                                "CXR1000_IM-0003-3001"]),
    "1900.xml": dict(number=1900, uid="CXR1", findings="A second report claiming id CXR1.",
                     majors=["normal"], impression="Duplicate.",
                     image_ids=["CXR1900_IM-0585-1001"]),
    "2000.xml": dict(number=2000, findings="Clear lungs.", impression="Normal.", majors=["normal"],
                     image_ids=["CXR2000_IM-0650-1001-missing"]),  # listed, but no PNG on disk
}
MALFORMED = ("<?xml version='1.0' encoding='utf-8'?>\n<eCitation>\n   <uId id=\"CXR5\"/>\n"
             "   <MeSH><major>normal")
SKIPPED_IDS = {"duplicate_id": ["CXR1"], "no_indexing": ["CXR39"], "no_text": ["CXR16"],
               "no_image": ["CXR156", "CXR2000"]}  # and malformed_xml: 5.xml, listed by its path
SKIPPED_COUNTS = {"malformed_xml": 1, "duplicate_id": 1, "no_indexing": 1, "no_text": 1,
                  "no_image": 2}
USED_IDS = ["CXR1", "CXR3", "CXR9", "CXR64", "CXR846", "CXR1000"]


def write_collection(root):
    """The edge cases above as root/ecgen-radiology/*.xml + PNGs spread over nested folders of
    root/NLMCXR_png."""
    reports_dir, images_dir = Path(root) / "ecgen-radiology", Path(root) / "NLMCXR_png"
    reports_dir.mkdir(parents=True)
    for n, (name, case) in enumerate(CASES.items()):
        (reports_dir / name).write_text(report_xml(**case), encoding="utf-8")
        for k, image_id in enumerate(case["image_ids"]):
            if not image_id.endswith("-missing"):
                write_png(images_dir / f"part{k % 2}" / f"batch{n % 3}" / f"{image_id}.png",
                          random_gray(100 * n + k))
    (reports_dir / "5.xml").write_text(MALFORMED, encoding="utf-8")
    # referenced by no report
    write_png(images_dir / "CXR99999_IM-9999-1001.png", random_gray(0))
    return reports_dir, images_dir


def make_tgz(reports_dir, tgz_path):
    """NLMCXR_reports.tgz as distributed: members ecgen-radiology/*.xml (tarfile adds them in name
    order)."""
    with tarfile.open(tgz_path, "w:gz") as archive:
        archive.add(reports_dir, arcname="ecgen-radiology")
    return tgz_path


@pytest.fixture
def collection(tmp_path):
    return write_collection(tmp_path / "openi")


# ------------------------------------------------------------------------------------ parse_report

def parse(name):
    return openi.parse_report(report_xml(**CASES[name]).encode(), name)


def test_parse_two_images_with_cxr1_1_naming():
    report = parse("1.xml")
    assert report.id == "CXR1"
    assert report.image_ids == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]
    assert report.findings == NORMAL_FINDINGS and report.impression == "Normal chest x-XXXX."
    assert report.text == f"{NORMAL_FINDINGS} Normal chest x-XXXX."
    assert report.majors == ["normal"]


def test_parse_empty_self_closing_findings_takes_text_from_impression():
    xml = report_xml(**CASES["3.xml"])
    assert '<AbstractText Label="FINDINGS"/>' in xml
    report = openi.parse_report(xml.encode(), "3.xml")
    assert report.findings == ""
    assert report.text == report.impression == CASES["3.xml"]["impression"]


def test_parse_decodes_xml_entities():
    xml = report_xml(**CASES["9.xml"])
    assert "XXXX&lt;XXXX&gt;technologist" in xml
    report = openi.parse_report(xml.encode(), "9.xml")
    assert "Dr. XXXX<XXXX>technologist" in report.impression
    assert "&lt;" not in report.text and "&gt;" not in report.text


def test_parse_keeps_only_major_terms_stripped():
    report = parse("64.xml")
    assert report.majors == ["Technical Quality of Image Unsatisfactory",
                             "Pneumothorax/apex/right/moderate"]
    # <automatic> terms are not labels
    assert "pneumothorax" not in report.majors


def test_parse_without_findings_or_impression_has_no_text():
    report = parse("16.xml")
    assert (report.findings, report.impression, report.text) == ("", "", "")


def test_parse_without_parent_image_and_with_four_images():
    assert parse("156.xml").image_ids == []
    assert parse("846.xml").image_ids == [f"CXR846_IM-2368-0001-000{k}" for k in range(1, 5)]


@pytest.mark.parametrize("xml_text", [MALFORMED, "", "<eCitation><meta type='rr'/></eCitation>"])
def test_parse_unusable_xml_raises_value_error_naming_the_source(xml_text):
    with pytest.raises(ValueError, match="reports/5.xml"):
        openi.parse_report(xml_text.encode(), "reports/5.xml")


# ------------------------------------------------------------------------------ read_openi (skips)

def test_read_openi_skip_rules_and_samples(collection):
    reports_dir, images_dir = collection
    used, paths, summary = openi.read_openi(reports_dir, images_dir)
    # folder order: 1, 3, 9, ..., 1000
    assert [r.id for r in used] == USED_IDS
    assert summary["reports"] == len(CASES) + 1
    assert summary["skipped_ids"] == {"malformed_xml": [str(reports_dir / "5.xml")], **SKIPPED_IDS}
    assert summary["skipped"] == SKIPPED_COUNTS
    assert len(used) + sum(summary["skipped"].values()) == summary["reports"]
    # the first CXR1 (1.xml) is the one kept, not the duplicate in 1900.xml
    assert used[0].text.startswith(NORMAL_FINDINGS)
    # images are found in nested folders and kept in parentImage order
    assert [p.stem for p in paths["CXR1"]] == CASES["1.xml"]["image_ids"]
    assert {p.parent.parent.parent for p in paths["CXR1000"]} == {images_dir}
    assert all(p.is_file() for ps in paths.values() for p in ps)


def test_read_openi_strict_stops_on_problems_not_on_filtered_reports(collection):
    reports_dir, images_dir = collection
    with pytest.raises(data.DataError, match=r"5.xml: malformed XML .*--strict"):
        openi.read_openi(reports_dir, images_dir, strict=True)
    (reports_dir / "5.xml").unlink()
    with pytest.raises(data.DataError,
                       match=r"1900.xml: report id CXR1 was already read from another file"):
        openi.read_openi(reports_dir, images_dir, strict=True)
    (reports_dir / "1900.xml").unlink()
    # no_indexing/no_text/no_image stay
    used, _, summary = openi.read_openi(reports_dir, images_dir, strict=True)
    assert [r.id for r in used] == USED_IDS and summary["skipped"]["no_image"] == 2


def test_non_ascii_report_text_is_read_and_tokenised(tmp_path):
    text = ("Cardiomégalie modérée – no effusion; „Pneumothorax“ ausgeschlossen. "
            "心脏增大. Ödem ≥ 2 cm.")
    xml = report_xml(number=7, findings=text, impression="Größe normal.", image_ids=["CXR7_IM-1"])
    report = openi.parse_report(xml.encode("utf-8"), "7.xml")
    assert report.text == text + " Größe normal."
    tokenizer = data.train_tokenizer([report.text] * 3 + ["plain ascii words"], vocab_size=200)
    ids = data.encode_texts(tokenizer, [report.text], max_len=256)[0]
    unk = tokenizer.token_to_id("[UNK]")
    # every character is covered
    assert (ids > 0).sum() > 10 and unk not in ids.tolist()


def test_assemble_four_images_give_four_samples_with_the_report_labels(collection):
    reports_dir, images_dir = collection
    collection = data.openi_collection(reports_dir.parent, reports_dir, images_dir, split_seed=0)
    per_report = {rid: int((collection.report_index == i).sum())
                  for i, rid in enumerate(r.id for r in collection.reports)}
    assert per_report == {"CXR1": 2, "CXR3": 2, "CXR9": 2, "CXR64": 2, "CXR846": 4, "CXR1000": 3}
    assert len(collection.image_paths) == collection.summary["images_used"] == 15
    i64 = [r.id for r in collection.reports].index("CXR64")
    pneumothorax = np.eye(len(LABELS), dtype=np.float32)[LABELS.index("Pneumothorax")]
    assert np.array_equal(collection.labels[collection.report_index == i64],
                          np.stack([pneumothorax] * 2))
    # counted per report, not per image
    assert collection.summary["labels"]["Pneumothorax"] == 1
    assert collection.summary["labels"]["No Finding"] == 2                        # CXR1 and CXR3


# ---------------------------------------------------------------------- read_openi: folder vs .tgz

def test_read_openi_from_tgz_equals_folder(collection, tmp_path):
    reports_dir, images_dir = collection
    tgz = make_tgz(reports_dir, tmp_path / "NLMCXR_reports.tgz")
    used_dir, paths_dir, summary_dir = openi.read_openi(reports_dir, images_dir)
    used_tgz, paths_tgz, summary_tgz = openi.read_openi(tgz, images_dir)
    assert sorted(used_tgz, key=lambda r: r.id) == sorted(used_dir, key=lambda r: r.id)
    assert paths_tgz == paths_dir
    assert summary_tgz["reports"] == summary_dir["reports"] \
        and summary_tgz["skipped"] == summary_dir["skipped"]
    assert summary_tgz["skipped_ids"]["malformed_xml"] == [f"{tgz}:ecgen-radiology/5.xml"]
    for reason in SKIPPED_IDS:
        assert sorted(summary_tgz["skipped_ids"][reason]) == \
            sorted(summary_dir["skipped_ids"][reason])


def test_prepare_openi_reads_the_tgz_from_data_dir(collection, tmp_path):
    reports_dir, images_dir = collection
    make_tgz(reports_dir, tmp_path / "openi" / "NLMCXR_reports.tgz")
    os.rename(reports_dir, tmp_path / "xml-elsewhere")                      # only the .tgz remains
    collection = data.prepare("openi", tmp_path, split_seed=0)
    assert sorted(r.id for r in collection.reports) == sorted(USED_IDS)
    assert collection.summary["skipped"] == SKIPPED_COUNTS


def test_prepare_openi_from_a_folder_filled_by_hand_says_which_files_it_used(collection, tmp_path):
    # tmp_path/openi: move it elsewhere
    reports_dir, images_dir = collection
    by_hand = tmp_path / "Downloads"
    by_hand.mkdir()
    make_tgz(reports_dir, by_hand / "NLMCXR_reports.tgz")
    os.rename(images_dir, by_hand / "png")
    shutil.rmtree(tmp_path / "openi")
    collection = data.prepare("openi", by_hand, split_seed=0)
    assert sorted(r.id for r in collection.reports) == sorted(USED_IDS)
    assert collection.summary["sources"] == {"reports": str(by_hand / "NLMCXR_reports.tgz"),
                                             "images": str(by_hand / "png")}


def test_prepare_openi_without_files_and_offline_says_what_to_download(tmp_path, monkeypatch):
    import socket

    from vkd import download
    monkeypatch.setattr(download, "BACKOFF_S", 0.01)
    # a port on 127.0.0.1 that nothing listens on: "offline"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(data.DataError, match="NLMCXR_reports.tgz") as error:
        data.prepare("openi", tmp_path, openi_url=url)
    assert f"{url}/NLMCXR_png.tgz" in str(error.value)
    assert not (tmp_path / "openi" / "NLMCXR_reports.tgz").exists()


def test_read_openi_tgz_keeps_the_folder_reading_order(collection, tmp_path):
    reports_dir, images_dir = collection
    tgz = make_tgz(reports_dir, tmp_path / "NLMCXR_reports.tgz")
    assert [r.id for r in openi.read_openi(tgz, images_dir)[0]] == USED_IDS


# -------------------------------------------------------------------------------- labels_from_mesh

def one_hot(*labels):
    y = np.zeros(len(LABELS), dtype=np.float32)
    for label in labels:
        y[LABELS.index(label)] = 1
    return y


# one real-looking major term per row of MESH_RULES, in the same order
RULE_CASES = [
    ("Mediastinum/enlarged", "Enlarged Cardiomediastinum"),
    ("Cardiomegaly/mild", "Cardiomegaly"),
    ("Cardiac Shadow/enlarged", "Cardiomegaly"),
    ("Opacity/lung/base/left", "Lung Opacity"),
    ("Airspace Disease/lung/middle lobe/right", "Lung Opacity"),
    ("Infiltrate/lung/upper lobe/left", "Lung Opacity"),
    ("Density/lung/base", "Lung Opacity"),
    ("Nodule/lung/upper lobe/right", "Lung Lesion"),
    ("Mass/lung/hilum/left", "Lung Lesion"),
    ("Cavitation/lung/upper lobe/right", "Lung Lesion"),
    ("Pulmonary Edema/mild", "Edema"),
    ("Pulmonary Congestion/mild", "Edema"),
    ("Heart Failure", "Edema"),
    ("Consolidation/lung/lower lobe/left", "Consolidation"),
    ("Pneumonia/lower lobe/right", "Pneumonia"),
    ("Pulmonary Atelectasis/base/left", "Atelectasis"),
    ("Pneumothorax/apex/right/small", "Pneumothorax"),
    ("Hydropneumothorax/right", "Pneumothorax"),
    ("Hemopneumothorax/left", "Pneumothorax"),
    ("Pleural Effusion/right/small", "Pleural Effusion"),
    ("Thickening/pleura/apex/left", "Pleural Other"),
    ("Pleura/left", "Pleural Other"),
    ("Fractures, Bone/ribs/left", "Fracture"),
    ("Catheters, Indwelling", "Support Devices"),
    ("Implanted Medical Device/left", "Support Devices"),
    ("Tube, Inserted", "Support Devices"),
    ("Medical Device", "Support Devices"),
    ("Stents/coronary", "Support Devices"),
    ("Surgical Instruments/mediastinum", "Support Devices"),
]


def test_rule_cases_cover_every_mesh_rule():
    assert [(label, openi.normalise_term(term.split("/")[0])) for term, label in RULE_CASES] == \
           [(label, head) for label, head, _ in MESH_RULES]


@pytest.mark.parametrize("term, label", RULE_CASES)
def test_each_mesh_rule_gives_exactly_its_label(term, label):
    assert np.array_equal(openi.labels_from_mesh([term]), one_hot(label))


@pytest.mark.parametrize("term, label", [
    ("Mediastinum/prominent", "Enlarged Cardiomediastinum"),
    ("Cardiac Shadow/enlarged/severe", "Cardiomegaly"),
    ("Density/lung/base/left", "Lung Opacity"),
    ("  pleural   EFFUSION /left", "Pleural Effusion"),                 # case and whitespace
    ("CARDIAC  SHADOW/ Enlarged ", "Cardiomegaly"),                     # ... in qualifiers too
    ("thickening/PLEURA", "Pleural Other"),
])
def test_qualifier_rules_case_and_whitespace_positive(term, label):
    assert np.array_equal(openi.labels_from_mesh([term]), one_hot(label))


@pytest.mark.parametrize("term", ["Mediastinum", "Mediastinum/normal", "Cardiac Shadow", "Density",
                                  "Density/cardiophrenic angle/left", "Thickening/spine",
                                  "Thickening", "Lung/hypoinflation", "Pleural Effusions/left"])
def test_terms_without_a_matching_rule_are_negative(term):
    assert not openi.labels_from_mesh([term]).any()


def test_normal_alone_is_no_finding_only():
    assert np.array_equal(openi.labels_from_mesh(["normal"]), one_hot("No Finding"))
    assert np.array_equal(openi.labels_from_mesh([" Normal "]), one_hot("No Finding"))
    assert np.array_equal(openi.labels_from_mesh(["normal", "Cardiomegaly/mild"]),
                          one_hot("Cardiomegaly"))


def test_distractors_only_give_all_zeros():
    distractors = ["Calcified Granuloma/lung/upper lobe/right", "Spine/degenerative/mild",
                   "Technical Quality of Image Unsatisfactory ", "Aorta/tortuous", "Granuloma"]
    y = openi.labels_from_mesh(distractors)
    assert y.shape == (14,) and y.dtype == np.float32 and not y.any()


def test_several_majors_combine_and_trailing_space_major_maps():
    assert np.array_equal(
        openi.labels_from_mesh(["Technical Quality of Image Unsatisfactory ",
                                "Pneumothorax/apex/right/moderate"]),
        one_hot("Pneumothorax"))
    assert np.array_equal(openi.labels_from_mesh(["Cardiomegaly/mild", "Pleural Effusion/bilateral",
                                                  "Stents"]),
                          one_hot("Cardiomegaly", "Pleural Effusion", "Support Devices"))


# ------------------------------------------------------------------------------------------ splits

IDS = [f"CXR{n}" for n in range(1, 201)]


def test_split_reports_deterministic_disjoint_covering_70_10_20():
    splits = data.split_reports(IDS, seed=0)
    # same seed, any input order
    assert splits == data.split_reports(list(reversed(IDS)), seed=0)
    assert splits != data.split_reports(IDS, seed=1)
    assert tuple(splits) == SPLITS
    assert {split: len(ids) for split, ids in splits.items()} == {"train": 140, "val": 20,
                                                                  "test": 40}
    every = [rid for ids in splits.values() for rid in ids]
    assert sorted(every) == sorted(IDS) and len(set(every)) == len(IDS)
    assert all(ids == sorted(ids) for ids in splits.values())


def test_assemble_keeps_all_images_of_a_report_in_one_split(tmp_path):
    rng = np.random.default_rng(0)
    reports, paths = [], {}
    for n in range(1, 61):
        majors = [str(rng.choice(["normal", "Cardiomegaly/mild", "Pleural Effusion/left",
                                  "Aorta/tortuous"]))]
        reports.append(Report(f"CXR{n}", "Findings.", "Impression.", majors, []))
        paths[f"CXR{n}"] = [tmp_path / f"CXR{n}_IM-{k}.png" for k in range(int(rng.integers(1, 5)))]
    read_summary = {"reports": 60, "skipped": {}, "skipped_ids": {}}
    labels = np.stack([openi.labels_from_mesh(r.majors) for r in reports])
    collection = data.assemble(tmp_path, reports, labels, paths, read_summary,
                               data.split_reports(list(paths), 3))
    assert collection.split_ids == data.split_reports([r.id for r in reports], 3)
    all_samples = np.concatenate([collection.splits[s] for s in SPLITS])
    # each sample in exactly one
    assert sorted(all_samples.tolist()) == list(range(len(collection.image_paths)))
    for split in SPLITS:
        sample_reports = {reports[i].id for i in collection.report_index[collection.splits[split]]}
        assert sample_reports == set(collection.split_ids[split])
    for i, path in enumerate(collection.image_paths):
        report = reports[collection.report_index[i]]
        assert path in paths[report.id]
        assert np.array_equal(collection.labels[i], openi.labels_from_mesh(report.majors))
    assert collection.summary["splits"] == {s: len(collection.split_ids[s]) for s in SPLITS}


def test_assemble_without_usable_reports_raises_data_error(tmp_path):
    with pytest.raises(data.DataError, match="no usable report"):
        data.assemble(tmp_path, [], np.zeros((0, 14)), {},
                      {"reports": 3, "skipped": {"no_text": 3}, "skipped_ids": {}},
                      {s: [] for s in SPLITS})


# ------------------------------------------------------------------------------------------ images

@pytest.mark.parametrize("name, pixels, expected", [
    ("gray.png", np.full((20, 30), 200, np.uint8), 200),
    ("gray_alpha.png", np.full((20, 30, 2), [77, 0], np.uint8), 77),
    ("rgb_gray.png", np.full((20, 30, 3), 123, np.uint8), 123),
    ("rgb_red.png", np.full((20, 30, 3), [255, 0, 0], np.uint8), 76),                # 0.299 * 255
    # 0.587 * 255, alpha dropped
    ("rgba_green.png", np.full((20, 30, 4), [0, 255, 0, 0], np.uint8), 150),
    ("gray16_white.png", np.full((20, 30), 65535, np.uint16), 255),
    ("gray16_black.png", np.zeros((20, 30), np.uint16), 0),
    ("gray16_mid.png", np.full((20, 30), 128 * 257, np.uint16), 128),
    ("gray.jpg", np.full((20, 30), 100, np.uint8), 100),
])
def test_load_image_formats(tmp_path, name, pixels, expected):
    path = write_png(tmp_path / name, pixels)
    if pixels.dtype == np.uint16:
        with Image.open(path) as written:
            assert written.mode == "I;16"                                      # really a 16-bit PNG
    image = image_cache.load_image(path, 16)
    assert image.shape == (16, 16) and image.dtype == np.uint8
    tolerance = 2 if name.endswith(".jpg") else 0
    assert np.abs(image.astype(int) - expected).max() <= tolerance


def test_load_image_at_native_size_is_exact_and_resizing_squashes(tmp_path):
    pixels = random_gray(1, (16, 16))
    path = write_png(tmp_path / "noise.png", pixels)
    assert np.array_equal(image_cache.load_image(path, 16), pixels)
    # 10 x 40, left dark, right bright
    ramp = np.tile(np.linspace(0, 255, 40).round().astype(np.uint8), (10, 1))
    small = image_cache.load_image(write_png(tmp_path / "ramp.png", ramp), 8)
    assert small.shape == (8, 8)
    assert (np.diff(small.astype(int), axis=1) > 0).all() and (small == small[0]).all()


def test_load_image_palette_png_gives_colours_not_indices(tmp_path):
    # every pixel is index 3
    palette_image = Image.new("P", (30, 20), 3)
    # index 3 -> gray 200
    palette_image.putpalette([0, 0, 0] * 3 + [200, 200, 200] + [0, 0, 0] * 252)
    palette_image.save(tmp_path / "palette.png")
    assert (image_cache.load_image(tmp_path / "palette.png", 16) == 200).all()


def write_images(folder, count=3, seed=0):
    return [write_png(folder / f"sub{i % 2}" / f"CXR{i}_IM-0001-1001.png",
                      random_gray(seed + i, (24, 20)))
            for i in range(count)]


def test_cached_images_equal_direct_decoding_and_are_reused(tmp_path, monkeypatch):
    paths, cache = write_images(tmp_path / "png"), tmp_path / "cache"
    array, bad = image_cache.cached_images(paths, 8, cache)
    assert array.shape == (3, 8, 8) and array.dtype == np.uint8 and bad == {}
    for row, path in zip(array, paths):
        assert np.array_equal(row, image_cache.load_image(path, 8))
    npy = cache / "images-8.npy"
    stamp = npy.stat().st_mtime_ns
    with monkeypatch.context() as patch:
        patch.setattr(image_cache, "load_image",
                      lambda *args: pytest.fail("decoded again instead of using the cache"))
        again, _ = image_cache.cached_images(paths, 8, cache)
    assert np.array_equal(again, array)
    assert npy.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in cache.iterdir()) == ["images-8.json", "images-8.lock",
                                                       "images-8.npy"]


def test_cached_images_rebuilt_for_another_size(tmp_path):
    paths, cache = write_images(tmp_path / "png"), tmp_path / "cache"
    image_cache.cached_images(paths, 8, cache)
    bigger, _ = image_cache.cached_images(paths, 12, cache)
    assert bigger.shape == (3, 12, 12)
    assert np.array_equal(bigger, np.stack([image_cache.load_image(p, 12) for p in paths]))


def test_cached_images_rebuilt_when_a_source_file_changes(tmp_path):
    paths, cache = write_images(tmp_path / "png"), tmp_path / "cache"
    before = np.array(image_cache.cached_images(paths, 8, cache)[0])
    new_pixels = 255 - random_gray(1, (24, 20))
    write_png(paths[1], new_pixels)
    stat = os.stat(paths[1])
    # a later modification time
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    after, _ = image_cache.cached_images(paths, 8, cache)
    expected = image_cache.load_image(paths[1], 8)
    assert not np.array_equal(expected, before[1])
    assert np.array_equal(after[1], expected)
    assert np.array_equal(after[[0, 2]], before[[0, 2]])


def test_cached_images_rebuilt_when_the_file_list_changes(tmp_path):
    paths, cache = write_images(tmp_path / "png", count=4), tmp_path / "cache"
    image_cache.cached_images(paths[:3], 8, cache)
    array, _ = image_cache.cached_images(paths[1:], 8, cache)
    assert np.array_equal(array, np.stack([image_cache.load_image(p, 8) for p in paths[1:]]))


def test_an_interrupted_cache_build_continues_where_it_stopped(tmp_path, monkeypatch):
    paths, cache = write_images(tmp_path / "png", count=7), tmp_path / "cache"
    real_load, calls = image_cache.load_image, []

    def load_then_interrupt(path, size):
        if len(calls) == 5:
            # Ctrl-C while decoding the 6th image
            raise KeyboardInterrupt
        calls.append(path)
        return real_load(path, size)

    monkeypatch.setattr(image_cache, "CACHE_CHUNK", 2)
    monkeypatch.setattr(image_cache, "load_image", load_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        image_cache.cached_images(paths, 8, cache)
    assert not (cache / "images-8.json").exists() and not (cache / "images-8.npy").exists()
    # two chunks were recorded
    assert json.loads((cache / "images-8.progress.json").read_text())["done"] == 4
    calls.clear()
    monkeypatch.setattr(image_cache, "load_image",
                        lambda path, size: calls.append(path) or real_load(path, size))
    array, bad = image_cache.cached_images(paths, 8, cache)
    # only what was not yet recorded
    assert calls == paths[4:]
    assert np.array_equal(array, np.stack([real_load(p, 8) for p in paths])) and bad == {}
    assert not (cache / "images-8.progress.json").exists() \
        and not (cache / "images-8.partial.npy").exists()


def test_a_damaged_cache_is_rebuilt_not_used(tmp_path):
    paths, cache = write_images(tmp_path / "png"), tmp_path / "cache"
    expected = np.array(image_cache.cached_images(paths, 8, cache)[0])
    npy = cache / "images-8.npy"
    # truncated after it was written
    npy.write_bytes(npy.read_bytes()[:-50])
    assert np.array_equal(image_cache.cached_images(paths, 8, cache)[0], expected)
    (cache / "images-8.json").write_text("{not json")                 # a half-written manifest
    assert np.array_equal(image_cache.cached_images(paths, 8, cache)[0], expected)


def test_parallel_cache_build_equals_the_serial_one(tmp_path):
    # more than 64: the process pool is used
    paths = write_images(tmp_path / "png", count=80)
    serial, _ = image_cache.cached_images(paths, 8, tmp_path / "serial", workers=1)
    parallel, _ = image_cache.cached_images(paths, 8, tmp_path / "parallel", workers=2)
    assert np.array_equal(serial, parallel)


def test_two_processes_building_one_cache_at_once_both_get_it_whole(tmp_path):
    paths, cache = write_images(tmp_path / "png", count=40), tmp_path / "cache"
    script = ("import sys, hashlib, numpy as np; from vkd import image_cache; "
              "from pathlib import Path; "
              "a, bad = image_cache.cached_images([Path(p) for p in sys.argv[2:]], 16, "
              "sys.argv[1]); "
              "print(hashlib.sha256(np.ascontiguousarray(a)).hexdigest(), len(bad))")
    runs = [subprocess.Popen([sys.executable, "-c", script, str(cache)] + [str(p) for p in paths],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=120)[0].split() for run in runs]
    expected = hashlib.sha256(np.stack([image_cache.load_image(p, 16) for p in paths])).hexdigest()
    assert outputs == [[expected, "0"], [expected, "0"]]
    assert not list(cache.glob("*.partial.npy")) and not list(cache.glob("*.tmp"))


def test_cache_build_checks_free_disk_space_first(tmp_path, monkeypatch):
    paths, cache = write_images(tmp_path / "png"), tmp_path / "cache"
    monkeypatch.setattr(image_cache.shutil, "disk_usage",
                        lambda folder: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(data.DataError,
                       match=r"needs 0.00 GiB in .*cache but only 0.00 GiB is free"):
        image_cache.cached_images(paths, 64, cache)
    assert not list(cache.glob("*.npy"))


def test_undecodable_images_are_recorded_not_fatal(tmp_path):
    paths = write_images(tmp_path / "png", count=4)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image at all")
    (tmp_path / "cut.png").write_bytes(paths[0].read_bytes()[:60])           # truncated PNG
    bad_paths = [tmp_path / "empty.png", tmp_path / "text.png", tmp_path / "cut.png"]
    array, bad = image_cache.cached_images(paths + bad_paths, 8, tmp_path / "cache")
    assert sorted(bad) == [4, 5, 6] and all(str(p) in bad[i] for i, p in zip((4, 5, 6), bad_paths))
    assert not array[4:].any() and np.array_equal(array[0], image_cache.load_image(paths[0], 8))
    # remembered in the manifest
    assert image_cache.cached_images(paths + bad_paths, 8, tmp_path / "cache")[1] == bad


def write_larger_collection(root, extra=20):
    """The edge cases plus `extra` one-image normal reports (CXR3001, ...), so that every split
    keeps reports when one report is lost."""
    reports_dir, images_dir = write_collection(root)
    for n in range(3001, 3001 + extra):
        case = dict(number=n, findings="Clear lungs.", impression="Normal.",
                    image_ids=[f"CXR{n}_IM-0001-1001"])
        (reports_dir / f"{n}.xml").write_text(report_xml(**case), encoding="utf-8")
        write_png(images_dir / f"CXR{n}_IM-0001-1001.png", random_gray(n))
    return reports_dir, images_dir


def test_a_report_whose_images_all_fail_to_decode_leaves_every_count_and_the_split(tmp_path):
    """CXR1000's three PNGs are all broken (the report is lost), one of CXR846's four (the report
    stays)."""
    reports_dir, images_dir = write_larger_collection(tmp_path / "openi")
    broken = [next(images_dir.rglob(f"{image_id}.png"))
              for image_id in CASES["1000.xml"]["image_ids"]]
    broken.append(next(images_dir.rglob(f"{CASES['846.xml']['image_ids'][2]}.png")))
    for path in broken:
        path.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    collection = data.openi_collection(tmp_path / "openi", reports_dir, images_dir, split_seed=0)
    before, split_ids = json.loads(json.dumps(collection.summary)), dict(collection.split_ids)
    lost_split = next(split for split, ids in split_ids.items() if "CXR1000" in ids)
    data.image_cache(collection, 8)

    summary = collection.summary
    assert summary["skipped"]["bad_image"] == 4
    assert sorted(summary["skipped_ids"]["bad_image"]) == sorted(map(str, broken))
    assert summary["skipped"]["no_decodable_image"] == 1
    assert summary["skipped_ids"]["no_decodable_image"] == ["CXR1000"]
    assert summary["images_used"] == before["images_used"] - 4 == \
        sum(map(len, collection.splits.values()))
    assert summary["reports_used"] == before["reports_used"] - 1
    # CXR1000's labels, and no other report's
    for label in ("Lung Opacity", "Pneumonia"):
        assert summary["labels"][label] == before["labels"][label] - 1 == 0
        assert summary["labels_per_split"][lost_split][label] == 0
    assert summary["splits"] == {split: len(ids) - (split == lost_split)
                                 for split, ids in split_ids.items()}
    expected_ids = {split: [rid for rid in ids if rid != "CXR1000"]
                    for split, ids in split_ids.items()}
    assert collection.split_ids == expected_ids
    assert data.split_hash(collection.split_ids) == data.split_hash(expected_ids)
    used_reports = {collection.reports[i].id for idx in collection.splits.values()
                    for i in collection.report_index[idx]}
    # splits.json = training
    assert used_reports == {rid for ids in collection.split_ids.values() for rid in ids}
    # a second call counts nothing twice
    data.image_cache(collection, 8)
    assert collection.summary == summary


def test_no_finding_follows_openi_and_reports_without_any_positive_label_are_counted(collection):
    reports_dir, images_dir = collection
    summary = data.openi_collection(reports_dir.parent, reports_dir, images_dir,
                                    split_seed=0).summary
    # CXR9 (Calcified Granuloma, Density of the cardiophrenic angle) and CXR846 (Granuloma) name
    # none of the 14 labels: CheXpert's rule would make them No Finding, OpenI's (only `normal`)
    # leaves them all negative
    assert summary["reports_without_positive_label"] == 2
    # CXR1 and CXR3: `normal` alone
    assert summary["labels"]["No Finding"] == 2


def test_data_py_json_is_one_object_on_stdout_when_an_image_cannot_be_decoded(tmp_path):
    reports_dir, images_dir = write_larger_collection(tmp_path / "openi")
    broken = next(images_dir.rglob(f"{CASES['846.xml']['image_ids'][0]}.png"))
    broken.write_bytes(b"not a png")
    result = subprocess.run([sys.executable, "data.py", "--data", "openi", "--data-dir",
                             str(tmp_path), "--json", "--image-size", "8"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)                                    # nothing else on stdout
    assert summary["skipped"]["bad_image"] == 1
    assert "warning: skipped 1 image(s) that cannot be decoded" in result.stderr \
        and str(broken) in result.stderr
    assert summary["reports_without_positive_label"] == 2


def test_normalise_is_bit_identical_to_the_training_and_evaluation_formulas():
    """data.normalise replaces the lines that train.model_input and evaluate.to_input had: the same
    bits, with and without augmentation (here any function of x in [0, 1])."""
    import torch
    images = torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, (3, 8, 8), dtype=np.uint8))  # (B, S, S)
    mean, std = 0.4567, 0.2345
    x = data.normalise(images, mean, std)
    assert x.shape == (3, 1, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x, ((images.float() / 255.0 - mean) / std).unsqueeze(1))     # evaluation's
    assert torch.equal(x, (images.float().div(255).unsqueeze(1) - mean) / std)      # training's
    flip = lambda x: x.flip(-1) * 0.9                                               # noqa: E731
    expected = (flip(images.float().div(255).unsqueeze(1)) - mean) / std
    assert torch.equal(data.normalise(images, mean, std, flip), expected)


# --------------------------------------------------------------------------------------- tokenizer

TEXTS = ["The heart is mildly enlarged.", "Small left pleural effusion.",
         "No pneumothorax. The lungs are clear.", "Moderate right apical pneumothorax.",
         "Patchy opacity in the left midlung, XXXX pneumonia."] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return data.train_tokenizer(TEXTS, vocab_size=120)


def test_tokenizer_pad_is_zero_and_short_texts_are_right_padded(tokenizer):
    assert tokenizer.token_to_id("[PAD]") == 0
    tokens = data.encode_texts(tokenizer, ["No pneumothorax.", ""], max_len=12)
    assert tokens.shape == (2, 12) and tokens.dtype == np.int64
    ids = tokenizer.encode("No pneumothorax.").ids
    assert 0 < len(ids) < 12 and 0 not in ids
    assert tokens[0].tolist() == ids + [0] * (12 - len(ids))
    # an empty text (--report-control blank) is one [UNK]: attention needs a token
    assert tokens[1].tolist() == [tokenizer.token_to_id("[UNK]")] + [0] * 11


def test_tokenizer_truncates_to_max_len(tokenizer):
    long_text = " ".join(TEXTS[:5])
    ids = tokenizer.encode(long_text).ids
    assert len(ids) > 8
    assert data.encode_texts(tokenizer, [long_text], max_len=8)[0].tolist() == ids[:8]


def test_tokenizer_json_round_trip_gives_identical_ids(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    reloaded = data.load_tokenizer(path)
    texts = TEXTS[:5] + ["Unseen words: hydropneumothorax XXXX."]
    assert np.array_equal(data.encode_texts(reloaded, texts, 16),
                          data.encode_texts(tokenizer, texts, 16))
    assert reloaded.get_vocab() == tokenizer.get_vocab()


# ------------------------------------------------------------------------------------ command line

def test_data_py_json_summary_matches_prepare(tmp_path):
    result = subprocess.run(
        [sys.executable, "data.py", "--data", "demo", "--json", "--demo-reports", "60",
         "--data-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    summary = json.loads(lines[0])
    assert set(summary) == {"reports", "reports_used", "images_used", "skipped", "labels", "splits",
                            "reports_without_positive_label", "sources", "labels_from"}
    assert summary.pop("labels_from")["label_source"] == (
        "MeSH majors of the synthetic demo reports (vkd/openi.py)")
    assert list(summary["labels"]) == LABELS and list(summary["splits"]) == list(SPLITS)
    assert summary["reports"] == 60
    assert summary["reports_used"] + sum(summary["skipped"].values()) == summary["reports"]
    assert sum(summary["splits"].values()) == summary["reports_used"]
    assert summary["images_used"] >= summary["reports_used"]

    collection = data.prepare("demo", tmp_path, split_seed=0, demo_reports=60, demo_seed=0)
    assert {key: collection.summary[key] for key in summary} == summary
    assert len(collection.image_paths) == summary["images_used"]
    # default --image-size
    cached = np.load(collection.root / "cache" / "images-128.npy", mmap_mode="r")
    assert cached.shape == (summary["images_used"], 128, 128)


def test_a_corrupt_reports_archive_gives_a_clear_error(tmp_path):
    bad_tgz = tmp_path / "NLMCXR_reports.tgz"
    bad_tgz.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(data.DataError, match="NLMCXR_reports.tgz is not a readable .tgz"):
        list(openi.iter_report_files(bad_tgz))


def test_demo_drawn_in_parallel_is_byte_identical_to_the_serial_draw(tmp_path):
    from vkd.demo import make_demo
    contents = []
    for workers in (1, 2):
        root = make_demo(tmp_path / f"workers{workers}", 40, seed=3, workers=workers)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        contents.append({str(p.relative_to(root)): p.read_bytes() for p in files})
    assert len([name for name in contents[0] if name.endswith(".png")]) > 40
    assert contents[0] == contents[1]


def test_train_fraction_keeps_a_seeded_nested_subset_of_the_training_reports(tmp_path):
    """--train-fraction F: round(F n) of the n training reports, with all their images; the same
    reports every time (no run seed is involved), a smaller F a subset of a larger one; validation
    and test unchanged."""
    options = {"data": "demo", "data_dir": tmp_path, "demo_reports": 80, "split_seed": 3}
    full = data.prepare_from(options)
    n = len(full.split_ids["train"])
    kept = {}
    for fraction in (0.1, 0.25, 0.5, 1.0):
        part = data.prepare_from(options | {"train_fraction": fraction})
        again = data.prepare_from(options | {"train_fraction": fraction})
        assert part.split_ids == again.split_ids \
            and np.array_equal(part.splits["train"], again.splits["train"])
        ids = part.split_ids["train"]
        assert len(ids) == max(1, round(fraction * n)) and set(ids) <= set(full.split_ids["train"])
        reports = {part.reports[i].id for i in part.report_index[part.splits["train"]]}
        # every image of a kept report
        assert reports == set(ids)
        assert np.array_equal(part.splits["train"],
                              [i for i in full.splits["train"]
                               if full.reports[full.report_index[i]].id in set(ids)])
        for split in ("val", "test"):
            assert part.split_ids[split] == full.split_ids[split]
            assert np.array_equal(part.splits[split], full.splits[split])
        assert part.summary["splits"]["train"] == len(ids)
        kept[fraction] = set(ids)
    assert kept[0.1] <= kept[0.25] <= kept[0.5] <= kept[1.0] == set(full.split_ids["train"])
    # old runs keep their split hash
    assert data.split_hash(data.prepare_from(options | {"train_fraction": 1.0}).split_ids) == \
        data.split_hash(full.split_ids)
    other = data.prepare_from(options | {"train_fraction": 0.25, "split_seed": 4})
    assert set(other.split_ids["train"]) != kept[0.25]
    for bad in (0.0, 1.5):
        with pytest.raises(data.DataError, match="--train-fraction"):
            data.prepare_from(options | {"train_fraction": bad})


def test_undecodable_images_with_a_train_fraction_count_only_the_reports_they_lose(tmp_path):
    """The training reports that --train-fraction leaves out are not 'lost to undecodable
    images'."""
    options = {"data": "demo", "data_dir": tmp_path, "demo_reports": 60, "split_seed": 0,
               "train_fraction": 0.25}
    collection = data.prepare_from(options)
    test_report = collection.reports[collection.report_index[collection.splits["test"][0]]]
    for i in np.flatnonzero([collection.reports[r].id == test_report.id
                             for r in collection.report_index]):
        collection.image_paths[i].write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    data.image_cache(collection, 8)
    assert collection.summary["skipped_ids"]["no_decodable_image"] == [test_report.id]
    assert test_report.id not in collection.split_ids["test"]
    assert len(collection.split_ids["train"]) == round(
        0.25 * len(data.prepare_from(options | {"train_fraction": 1.0}).split_ids["train"]))
