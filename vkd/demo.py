"""The embedded demo collection: procedurally drawn chest radiographs with reports in the OpenI
schema.

data.py calls make_demo() and then reads the result with the same reader as the real OpenI
collection, so the demo exercises every line of the real data path (XML parsing, MeSH mapping, skip
rules, image pairing).

Why the demo is a fair test of VKD: every finding has a visible sign in the image whose strength is
drawn per report (`severity`). Strong signs are easy to see; faint ones are nearly lost in the noise
and the anatomy's variation. The report always names the finding (with a severity word), so the text
carries information the image shows only weakly, the situation in which a text-informed posterior
can teach an image-only prior.
"""
import os
import shutil
from multiprocessing import Pool
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image
from tqdm import tqdm

from vkd.reports import write_error

PNG_SIZE = 192
# bump when the drawing or the text changes: an existing demo folder is then redrawn
VERSION = 2
FINDINGS = [  # (CheXpert name, prevalence among abnormal reports)
    ("Enlarged Cardiomediastinum", 0.07), ("Cardiomegaly", 0.22), ("Lung Opacity", 0.20),
    ("Lung Lesion", 0.12), ("Edema", 0.10), ("Consolidation", 0.08), ("Pneumonia", 0.08),
    ("Atelectasis", 0.15), ("Pneumothorax", 0.07), ("Pleural Effusion", 0.18),
    ("Pleural Other", 0.06), ("Fracture", 0.07), ("Support Devices", 0.15),
]
SIDE = {-1: "right", 1: "left"}  # image left is the patient's right (radiological convention)


def severity_word(rng, severity):
    words = ["minimal", "mild", "small"] if severity < 0.45 else (
        ["moderate", "moderate-sized"] if severity < 0.75 else ["large", "marked", "severe"])
    return str(rng.choice(words))


# Report sentences and MeSH major terms per finding. {s}: severity word, {side}: right/left.
POSITIVE = {
    "Enlarged Cardiomediastinum": ["The mediastinum is {s}ly widened.",
                                   "{S} widening of the mediastinal contour.",
                                   "The cardiomediastinal silhouette is {s}ly enlarged."],
    "Cardiomegaly": ["The heart is {s}ly enlarged.", "{S} cardiomegaly.",
                     "Cardiac silhouette is {s}ly enlarged."],
    "Lung Opacity": ["Patchy opacity in the {side} midlung.",
                     "{S} airspace disease in the {side} lung.",
                     "Ill-defined {s} opacity in the {side} lung."],
    "Lung Lesion": ["{S} nodule in the {side} lung.",
                    "A {s} rounded nodular density in the {side} lung.",
                    "{S} mass projecting over the {side} lung."],
    "Edema": ["{S} pulmonary edema.", "Perihilar haziness consistent with {s} pulmonary edema.",
              "{S} interstitial edema bilaterally."],
    "Consolidation": ["Focal consolidation in the {side} lower lobe.",
                      "{S} {side} lower lobe consolidation."],
    "Pneumonia": ["Findings consistent with {side} lower lobe pneumonia.",
                  "{S} {side} basilar pneumonia.",
                  "Patchy {side} base opacities, XXXX pneumonia."],
    "Atelectasis": ["{S} {side} basilar atelectasis.", "Linear atelectasis at the {side} base.",
                    "Plate-like atelectasis in the {side} lower lung."],
    "Pneumothorax": ["{S} {side} apical pneumothorax.", "There is a {s} {side} pneumothorax.",
                     "{S} {side}-sided pneumothorax."],
    "Pleural Effusion": ["{S} {side} pleural effusion.",
                         "Blunting of the {side} costophrenic angle, {s} effusion.",
                         "There is a {s} {side} pleural effusion."],
    "Pleural Other": ["{S} {side} pleural thickening.",
                      "Pleural thickening along the {side} chest wall."],
    "Fracture": ["Fracture of a {side} posterior rib.", "{S} displaced {side} rib fracture.",
                 "Healing fracture of the {side} XXXX rib."],
    "Support Devices": ["Central venous catheter with tip in the SVC.",
                        "{Side} chest wall pacemaker in place.",
                        "Catheter tip projects over the XXXX."],
}
NEGATIVE = {
    "Cardiomegaly": ["Heart size is normal.", "The cardiac silhouette is within normal limits."],
    "Pleural Effusion": ["No pleural effusion.", "No XXXX of a pleural effusion."],
    "Pneumothorax": ["No pneumothorax.", "There is no evidence of pneumothorax."],
    "Consolidation": ["No focal consolidation.", "No focal airspace consolidation."],
    "Edema": ["No pulmonary edema.", "No vascular congestion."],
    "Lung Lesion": ["No suspicious pulmonary nodules.", "No nodules or masses."],
}
MESH = {
    "Enlarged Cardiomediastinum": ["Mediastinum/enlarged", "Mediastinum/prominent"],
    "Cardiomegaly": ["Cardiomegaly/{s}", "Cardiac Shadow/enlarged/{s}"],
    "Lung Opacity": ["Opacity/lung/{side}", "Airspace Disease/lung/{side}", "Infiltrate/{side}",
                     "Density/lung/{side}"],
    "Lung Lesion": ["Nodule/lung/{side}", "Mass/lung/{side}"],
    "Edema": ["Pulmonary Edema/{s}", "Pulmonary Congestion/{s}"],
    "Consolidation": ["Consolidation/lung/lower lobe/{side}"],
    "Pneumonia": ["Pneumonia/lower lobe/{side}"],
    "Atelectasis": ["Pulmonary Atelectasis/base/{side}",
                    "Pulmonary Atelectasis/lower lobe/{side}/{s}"],
    "Pneumothorax": ["Pneumothorax/apex/{side}/{s}", "Hydropneumothorax/{side}"],
    "Pleural Effusion": ["Pleural Effusion/{side}/{s}"],
    "Pleural Other": ["Thickening/pleura/{side}", "Pleura/{side}"],
    "Fracture": ["Fractures, Bone/ribs/{side}"],
    "Support Devices": ["Catheters, Indwelling", "Implanted Medical Device/{side}",
                        "Medical Device"],
}
DISTRACTORS = ["Calcified Granuloma/lung/upper lobe/{side}", "Spine/degenerative/mild",
               "Technical Quality of Image Unsatisfactory ", "Aorta/tortuous"]


def draw_findings(rng):
    """{finding: (severity in (0.05, 1), side in {-1, 1})}; empty for a normal study."""
    if rng.random() < 0.4:
        return {}
    findings = {}
    while not findings:
        for name, prevalence in FINDINGS:
            if rng.random() < prevalence:
                findings[name] = (float(rng.uniform(0.05, 1.0)), int(rng.choice([-1, 1])))
    # a little of the real co-occurrence structure
    if "Edema" in findings and rng.random() < 0.5:
        findings.setdefault("Cardiomegaly", (float(rng.uniform(0.3, 1.0)), 1))
    if "Pneumonia" in findings and rng.random() < 0.5:
        findings.setdefault("Lung Opacity", (findings["Pneumonia"][0], findings["Pneumonia"][1]))
    return findings


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def _blur(a, k):
    """Separable box blur of width 2k+1 (edge-padded)."""
    for axis in (0, 1):
        padded = np.pad(a, [(k + 1, k) if ax == axis else (0, 0) for ax in (0, 1)], mode="edge")
        c = np.cumsum(padded, axis=axis)
        a = (np.take(c, range(2 * k + 1, c.shape[axis]), axis=axis)
             - np.take(c, range(0, c.shape[axis] - 2 * k - 1), axis=axis)) / (2 * k + 1)
    return a


def draw_anatomy(rng):
    """Per-patient shape parameters, shared by all images of one report."""
    return {"body": rng.uniform(0.80, 0.90), "lung_u": rng.uniform(0.36, 0.40),
            "lung_ru": rng.uniform(0.28, 0.32), "lung_rv": rng.uniform(0.58, 0.66),
            "heart_ru": rng.uniform(0.22, 0.26), "media": rng.uniform(0.08, 0.10),
            "rib_phase": rng.uniform(0, 0.1), "texture": rng.normal(size=(24, 24))}


def draw_exposure(rng, findings, size=PNG_SIZE):
    """Everything random about one radiograph (position, blob and nodule positions, mottling, noise,
    contrast), drawn in a fixed order. draw_xray is then a pure function of it, so images can be
    drawn in parallel while one random stream, in report order, decides the whole collection."""
    exposure = {"shift_u": rng.normal(0, 0.03), "shift_v": rng.normal(0, 0.03),
                "zoom": rng.uniform(0.94, 1.06)}
    if "Lung Opacity" in findings:
        exposure["blobs"] = [(rng.normal(0, 0.06), rng.uniform(-0.3, 0.2)) for _ in range(4)]
    if "Lung Lesion" in findings:
        exposure["nodule"] = (rng.normal(0, 0.05), rng.uniform(-0.4, 0.1))
    if "Pneumonia" in findings:
        exposure["mottle"] = rng.random((size, size))
    exposure["noise"] = rng.normal(0, rng.uniform(0.02, 0.05), (size, size))
    exposure["gamma"] = rng.uniform(0.8, 1.25)
    return exposure


def draw_xray(exposure, anatomy, findings, size=PNG_SIZE):
    """One radiograph as (size, size) uint8, from its exposure (draw_exposure) and the patient's
    anatomy."""
    shift_u, shift_v, zoom = exposure["shift_u"], exposure["shift_v"], exposure["zoom"]
    v, u = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    u, v = (u - shift_u) / zoom, (v - shift_v) / zoom
    px = 2.0 / size
    sev = {name: s for name, (s, _) in findings.items()}
    side = {name: d for name, (_, d) in findings.items()}

    def ellipse(cu, cv, ru, rv, edge=0.02):
        return _sigmoid((1 - np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2)) / edge)

    image = 0.08 + 0.40 * ellipse(0, 0.1, anatomy["body"], 1.05, 0.03)
    lungs, radius = {}, {}
    for d in (-1, 1):
        rv = anatomy["lung_rv"] - (0.06 * sev["Atelectasis"] if side.get("Atelectasis") == d else 0)
        lungs[d] = ellipse(d * anatomy["lung_u"], -0.08 + (anatomy["lung_rv"] - rv),
                           anatomy["lung_ru"], rv)
        radius[d] = np.sqrt(((u - d * anatomy["lung_u"]) / anatomy["lung_ru"]) ** 2
                            + ((v + 0.08) / rv) ** 2)
    lung = lungs[-1] + lungs[1]
    texture = np.kron(anatomy["texture"], np.ones((size // 24 + 1, size // 24 + 1)))[:size, :size]
    vessels = 0.05 * _blur(texture, max(1, size // 64)) * np.exp(-((np.abs(u) - 0.2) ** 2) / 0.08)
    air = np.ones_like(u)
    # collapsed lung edge: no markings beyond a pleural line
    if "Pneumothorax" in findings:
        d, s = side["Pneumothorax"], sev["Pneumothorax"]
        rim = 1 - (0.10 + 0.25 * s)
        region = lungs[d] * _sigmoid((radius[d] - rim) / 0.01) * _sigmoid((0.1 - v) / 0.05)
        air -= region
        image += (0.12 * (0.3 + s) * lungs[d] * np.exp(-((radius[d] - rim) / 0.012) ** 2)
                  * _sigmoid((0.1 - v) / 0.05))
        image -= 0.06 * region
    image -= lung * (0.28 - vessels * air)
    media = anatomy["media"] + (0.03 + 0.06 * sev["Enlarged Cardiomediastinum"]
                                if "Enlarged Cardiomediastinum" in findings else 0)
    image += (0.30 * _sigmoid((media - np.abs(u)) / 0.01) * _sigmoid((0.25 - v) / 0.03)
              * _sigmoid((v + 0.9) / 0.03))
    heart_ru = anatomy["heart_ru"] + (0.03 + 0.09 * sev["Cardiomegaly"]
                                      if "Cardiomegaly" in findings else 0)
    image += 0.22 * ellipse(0.07, 0.28, heart_ru, 0.22)
    image += 0.10 * _sigmoid((0.05 - np.abs(u)) / 0.01)                          # spine
    # ribs: arcs over each hemithorax
    for k in range(10):
        arc = v - (-0.80 + 0.15 * k + anatomy["rib_phase"] + 0.35 * (np.abs(u) - 0.35) ** 2)
        # a break: the lateral fragment is displaced downwards
        if "Fracture" in findings and k == 4:
            d, s = side["Fracture"], sev["Fracture"]
            arc = arc - (0.03 + 0.05 * s) * _sigmoid((u * d - 0.45) / 0.005)
        rib = np.exp(-(arc / 0.022) ** 2) * _sigmoid((np.abs(u) - 0.06) / 0.02) * lung
        image += 0.10 * rib
    if "Fracture" in findings:                          # healing callus around the break
        d, s = side["Fracture"], sev["Fracture"]
        rib_v = -0.80 + 0.60 + anatomy["rib_phase"] + 0.35 * (0.45 - 0.35) ** 2
        image += (0.06 + 0.12 * s) * lungs[d] * ellipse(d * 0.45, rib_v, 0.04 + 0.03 * s,
                                                        0.03 + 0.02 * s, 0.15)
    # fluid level with a meniscus at the lung base
    if "Pleural Effusion" in findings:
        d, s = side["Pleural Effusion"], sev["Pleural Effusion"]
        level = 0.50 - 0.35 * s - 0.25 * np.abs(u - d * anatomy["lung_u"]) * s
        image += 0.25 * lungs[d] * _sigmoid((v - level) / 0.02)
    if "Lung Opacity" in findings:                      # a few soft blobs in one lung
        d, s = side["Lung Opacity"], sev["Lung Opacity"]
        for du, cv in exposure["blobs"]:
            cu = d * anatomy["lung_u"] + du
            image += (0.03 + 0.09 * s) * lungs[d] * np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / 0.006)
    if "Lung Lesion" in findings:                       # one sharp-edged nodule
        d, s = side["Lung Lesion"], sev["Lung Lesion"]
        du, cv = exposure["nodule"]
        image += (0.05 + 0.10 * s) * lungs[d] * ellipse(d * anatomy["lung_u"] + du, cv,
                                                        0.025 + 0.03 * s, 0.025 + 0.03 * s, 0.1)
    if "Edema" in findings:                             # bilateral perihilar haze
        haze = np.exp(-((np.abs(u) - 0.22) ** 2 + v ** 2) / 0.05)
        image += (0.03 + 0.10 * sev["Edema"]) * lung * haze
    if "Consolidation" in findings:                     # dense lower-lobe region
        d, s = side["Consolidation"], sev["Consolidation"]
        image += (0.05 + 0.12 * s) * lungs[d] * ellipse(d * anatomy["lung_u"], 0.25, 0.16, 0.14,
                                                        0.08)
    if "Pneumonia" in findings:                         # mottled patches at one base
        d, s = side["Pneumonia"], sev["Pneumonia"]
        mottle = _blur(exposure["mottle"], max(1, size // 48))
        image += ((0.04 + 0.12 * s) * lungs[d]
                  * ellipse(d * anatomy["lung_u"], 0.30, 0.2, 0.12, 0.1) * mottle * 2)
    if "Atelectasis" in findings:                       # thin oblique plate at one base
        d, s = side["Atelectasis"], sev["Atelectasis"]
        line = np.exp(-((v - 0.25 - 0.3 * (u - d * anatomy["lung_u"])) / 0.012) ** 2)
        image += (0.04 + 0.10 * s) * lungs[d] * line
    if "Pleural Other" in findings:                     # thickened band along the lateral wall
        d, s = side["Pleural Other"], sev["Pleural Other"]
        band = (_sigmoid((radius[d] - (0.95 - 0.06 * s)) / 0.01)
                * _sigmoid((1.05 - radius[d]) / 0.01))
        image += (0.06 + 0.10 * s) * band * (u * d > anatomy["lung_u"])
    # a catheter from the neck to the heart, and a generator
    if "Support Devices" in findings:
        d = side["Support Devices"]
        t = np.linspace(0, 1, 40)[:, None, None]
        cu, cv = d * 0.25 * (1 - t) ** 2 + 0.03 * t, -1.0 + 1.1 * t
        dist = np.sqrt((u[None] - cu) ** 2 + (v[None] - cv) ** 2).min(0)
        image += 0.35 * np.exp(-(dist / (2 * px)) ** 2)
        image += 0.35 * ellipse(d * 0.55, -0.75, 0.07, 0.05, 0.05)
    image = _blur(image, 1) + exposure["noise"]
    image = np.clip(image, 0, 1) ** exposure["gamma"]
    return (image * 255).round().astype(np.uint8)


def write_report(rng, number, findings, image_ids, majors, findings_text, impression):
    """The XML of one report, in the OpenI schema (root eCitation, AbstractText sections, MeSH,
    parentImage)."""
    def section(label, text):
        return (f'<AbstractText Label="{label}">{escape(text)}</AbstractText>' if text
                else f'<AbstractText Label="{label}"/>')
    images = "".join(
        f'\n   <parentImage id="{i}">\n      <figureId>F{k + 1}</figureId>'
        f'\n      <caption>Xray Chest PA and Lateral</caption>\n      <panel type="single">'
        f'\n         <url>/hadoop/storage/radiology/extract/{i}.jpg</url>'
        f'\n      </panel>\n   </parentImage>' for k, i in enumerate(image_ids))
    mesh = "".join(f"\n      <major>{escape(m)}</major>" for m in majors)
    return f"""<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR{number}"/>
   <pmcId id="{number}"/>
   <docSource>CXR</docSource>
   <IUXRId id="{number}"/>
   <licenseType>open-access</licenseType>
   <publisher>Demo collection generated by demo.py</publisher>
   <title>Synthetic chest X-ray collection in the Indiana University schema</title>
   <MedlineCitation Owner="demo" Status="synthetic">
      <Article PubModel="Electronic">
         <Abstract>
            {section("COMPARISON", str(rng.choice(["None.", "XXXX, XXXX", ""])))}
            {section("INDICATION", str(rng.choice(["Cough", "Chest pain", "Shortness of breath",
                                                   "XXXX"])))}
            {section("FINDINGS", findings_text)}
            {section("IMPRESSION", impression)}
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>{mesh}
   </MeSH>{images}
</eCitation>
"""


def write_text(rng, findings):
    """(FINDINGS, IMPRESSION, MeSH majors) consistent with the drawn findings."""
    def fill(template, name):
        s, d = findings[name]
        word = severity_word(rng, s)
        return template.format(s=word, S=word.capitalize(), side=SIDE[d], Side=SIDE[d].capitalize())
    positives = [fill(str(rng.choice(POSITIVE[name])), name) for name in findings]
    negatives = [str(rng.choice(options)) for name, options in NEGATIVE.items()
                 if name not in findings and rng.random() < 0.5]
    if not findings:
        negatives += ["The lungs are clear."]
    sentences = positives + negatives
    rng.shuffle(sentences)
    findings_text = " ".join(sentences)
    if rng.random() < 0.3:                              # de-identification redacts words with XXXX
        words = findings_text.split()
        findings_text = " ".join("XXXX" if rng.random() < 0.04 else w for w in words)
    impression = (str(rng.choice(["No acute cardiopulmonary abnormality.", "Normal chest x-XXXX.",
                                  "No active disease."])) if not findings
                  else " ".join(positives[: max(1, len(positives) // 2)]))
    majors = ["normal"] if not findings else [fill(str(rng.choice(MESH[name])), name)
                                              for name in findings]
    if findings and rng.random() < 0.2:
        majors.append(str(rng.choice(DISTRACTORS)).format(side=SIDE[int(rng.choice([-1, 1]))]))
    return findings_text, impression, majors


def write_png(job):
    """Worker side of make_demo: draw one radiograph and save it."""
    exposure, anatomy, findings, path = job
    Image.fromarray(draw_xray(exposure, anatomy, findings)).save(path)


def make_demo(root, num_reports, seed, workers=None):
    """draw_demo, with a failed write (a full disk, a folder that is not writable) as a DataError
    naming the folder; what was drawn of it is removed, and drawn again, whole, next time."""
    try:
        return draw_demo(root, num_reports, seed, workers)
    except OSError as error:
        for folder in (Path(root) / "ecgen-radiology", Path(root) / "NLMCXR_png"):
            shutil.rmtree(folder, ignore_errors=True)
        raise write_error(root, error) from error


def draw_demo(root, num_reports, seed, workers=None):
    """Write the demo collection under `root` (once; reused when complete) and return `root`.

    Layout: root/ecgen-radiology/{n}.xml and root/NLMCXR_png/{image id}.png. About 2% of reports
    fall in each skip category (no image, no FINDINGS/IMPRESSION text, MeSH 'No Indexing') so the
    reader's rules are exercised.
    """
    root = Path(root)
    done = root / "COMPLETE"
    stamp = f"version {VERSION}, {num_reports} reports, seed {seed}, {PNG_SIZE} px\n"
    if done.exists() and done.read_text() == stamp:
        return root
    reports_dir, images_dir = root / "ecgen-radiology", root / "NLMCXR_png"
    # redraw from scratch: no file of an older draw survives
    for folder in (reports_dir, images_dir):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    workers = workers or min(8, os.cpu_count() or 1)
    pool, jobs = Pool(workers) if workers > 1 else None, []

    # in batches: queued exposures hold their noise arrays
    def draw(jobs):
        list(pool.imap_unordered(write_png, jobs, chunksize=4) if pool else map(write_png, jobs))
        jobs.clear()

    for number in tqdm(range(1, num_reports + 1), desc="drawing demo collection", unit="report"):
        findings = draw_findings(rng)
        findings_text, impression, majors = write_text(rng, findings)
        n_images = int(rng.choice([1, 2, 2, 2, 3]))
        image_ids = [f"CXR{number}_IM-{1000 + number:04d}-{k + 1}001" for k in range(n_images)]
        kind = rng.random()
        if kind < 0.02:
            findings_text, impression = "", ""                          # skipped: no text
        elif kind < 0.04:
            majors = ["No Indexing"]                                     # skipped: labels unknown
        elif kind < 0.05:
            image_ids = []                                               # skipped: no parentImage
        elif kind < 0.06:
            # skipped: PNG not in the archive
            image_ids = [image_ids[0] + "-missing"]
        elif kind < 0.10:
            findings_text = ""                                           # used: IMPRESSION only
        anatomy = draw_anatomy(rng)
        for image_id in image_ids:
            if not image_id.endswith("-missing"):
                jobs.append((draw_exposure(rng, findings), anatomy, findings,
                             images_dir / f"{image_id}.png"))
        xml = write_report(rng, number, findings, image_ids, majors, findings_text, impression)
        (reports_dir / f"{number}.xml").write_text(xml, encoding="utf-8")
        if len(jobs) >= 64:
            draw(jobs)
    draw(jobs)
    if pool:
        pool.close()
        pool.join()
    done.write_text(stamp)
    return root
