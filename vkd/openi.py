"""OpenI: read the Indiana University chest X-ray collection (and the demo, written in its layout).

One XML file per report (ecgen-radiology/*.xml) names its images (parentImage ids, PNGs in
NLMCXR_png) and carries FINDINGS, IMPRESSION and the MeSH major terms the indexers assigned; the 14
CheXpert labels are derived from those terms by the table MESH_RULES below. data.py calls
read_openi and labels_from_mesh for `--data demo` and `--data openi`; download.py fetches the
archives from OPENI_URL.
"""
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from vkd.reports import LABELS, DataError, Report

# the one place it is written; download.py reads it
OPENI_URL = "https://openi.nlm.nih.gov/imgs/collections"

# MeSH major term -> CheXpert label. A term reads "Head/qualifier/qualifier/..."; a rule matches
# when the head equals `head` and, if `qualifiers` is given, at least one of them is among the
# term's qualifiers. "No Finding" is not a rule: it is positive exactly when the only major term is
# "normal" (see labels_from_mesh).
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


def normalise_term(term):
    return " ".join(term.split()).lower()


def labels_from_mesh(majors):
    """14-dim 0/1 vector from MeSH major terms, by MESH_RULES.

    No Finding follows OpenI's own reading: positive only when the sole major term is `normal` (the
    indexers' word for a normal study; it never co-occurs with another major). This is not
    CheXpert's rule, which MIMIC-CXR's labels follow: there No Finding is positive when none of the
    12 findings (Enlarged Cardiomediastinum ... Fracture) is positive, support devices ignored. The
    two differ on
      - a report whose majors name nothing among the 14 (e.g. `Granuloma`, `Spine/degenerative`):
        CheXpert would call it No Finding, here it is negative for every label (counted in the
        summary as reports_without_positive_label);
      - a report whose only finding is a support device: CheXpert No Finding, here Support Devices
        alone.
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
        majors=[node.text.strip() for node in root.iterfind("MeSH/major")
                if node.text and node.text.strip()],
        image_ids=[node.get("id") for node in root.iterfind("parentImage") if node.get("id")],
    )


def iter_report_files(source):
    """Yield (name, bytes) for every ecgen-radiology/*.xml in a folder or read straight from a
    .tgz."""
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
        raise DataError(f"{source} is not a readable .tgz ({error}); "
                        "delete it and download it again") from None
    for name, xml_bytes in sorted(files, key=lambda f: (len(Path(f[0]).stem), Path(f[0]).stem)):
        # same order as a folder: 1, 2, ..., 10, ...
        yield f"{source}:{name}", xml_bytes


def find_images(root):
    """{image id: path} for every PNG below `root`, searched recursively."""
    return {path.stem: path for path in sorted(Path(root).rglob("*.png"))}


def read_openi(reports_source, images_root, strict=False):
    """Read reports and pair them with images. Returns (used reports, {report id: [paths]}, summary
    parts).

    malformed_xml and duplicate_id are problems (--strict stops on them); no_indexing, no_text and
    no_image are reports the real collection has by design, always skipped and counted."""
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
            report_id, problem = report.id, (f"{name}: report id {report.id} was already read "
                                             "from another file")
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
            raise DataError(f"{problem} (--strict; "
                            "without it this report would be skipped and counted)")
        if reason:
            skipped[reason] += 1
            skipped_ids[reason].append(report_id)
    return used, paths, {"reports": found, "skipped": skipped, "skipped_ids": skipped_ids}
