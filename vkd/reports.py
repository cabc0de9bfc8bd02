"""Reports: what every reader of a collection shares, whatever the collection.

The 14 CheXpert label names, the policies for an uncertain label, the Report a reader returns,
DataError, the exception that says what is wrong with the user's data, and label_index, a label
looked up by name. openi.py, tables.py, download.py, data.py and evaluate.py's side files import
from here; this file imports nothing of the project, so that imports run one way.
"""
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]
# --uncertain: what a -1 label of mimic/csv becomes
UNCERTAIN_POLICIES = ("zeros", "ones", "ignore")


class DataError(Exception):
    """A problem with the user's data that makes the run meaningless; the message says what to
    do."""


@dataclass
class Report:
    id: str                 # e.g. "CXR1"
    findings: str
    impression: str
    majors: list            # MeSH major terms as written (stripped)
    image_ids: list         # parentImage ids, e.g. "CXR1_1_IM-0001-3001"
    # where the collection names the patient (MIMIC's subject_id, a CSV's patient column)
    patient_id: str = None

    @property
    def text(self):
        """The model's t: FINDINGS and IMPRESSION, the parts of the report written after reading the
        image."""
        return " ".join(part for part in (self.findings, self.impression) if part)


def label_index(label_names, name):
    """Index of a label given by name, case-insensitively; a clear error listing the names
    otherwise."""
    lowered = [n.lower() for n in label_names]
    if name.lower() not in lowered:
        raise DataError(f"unknown label {name!r}; this checkpoint's labels: "
                        f"{', '.join(label_names)}")
    return lowered.index(name.lower())


def write_error(path, error):
    """The DataError of a write that failed (a full disk, a folder that is not writable): the
    path, why, and the space that was free there."""
    why = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    why = (why.strip().splitlines() or ["write failed"])[-1]
    if "unexpected pos" in why:           # how torch.save says that the disk is full
        why += " (the disk is probably full)"
    return DataError(f"cannot write {path}: {why} ({free_space(Path(path).parent)} free there); "
                     f"what was saved before is kept: free some space, or make the folder "
                     f"writable, and run the command again (a run that saved last.pt: with "
                     f"--resume)")


def free_space(folder):
    """'1.2 GB' free on the disk of `folder`, or 'unknown'."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "an unknown amount"
    return f"{free / 1e9:.1f} GB" if free >= 1e8 else f"{free / 1e6:.1f} MB"


def save_atomically(path, write, errors=(OSError,)):
    """write(temporary path) beside `path`, then a rename: a crash or a full disk never leaves a
    half-written file, and the one written before stays whole. A failed write (one of `errors`)
    removes the temporary file and is a DataError naming the path and the free space."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as error:        # a Ctrl-C mid-write too: no temporary file stays
        tmp.unlink(missing_ok=True)
        if isinstance(error, errors):
            raise write_error(path, error) from error
        raise
    return path
