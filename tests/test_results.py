"""vkd/results.py: --quick trains its runs, evaluates them and writes a document whose numbers are
the runs' own (metrics.json); --report-only writes the same document again without training; the
OpenI part is left out with a line when there is no --openi-dir; the grey placeholders are written
once and never over a folder that exists."""
import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from vkd import results


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    argv = ["--quick", "--out", str(root / "runs"), "--data-dir", str(root / "data")]
    results.main(argv)
    return root, argv


def cell(metrics, key):
    low, high = metrics[f"{key}_ci95"]
    return f"{metrics[key]:.3f} [{low:.3f}, {high:.3f}]"


def test_the_document_holds_every_part_with_the_runs_numbers(quick):
    root, _ = quick
    out = root / "runs"
    document = (out / "RESULTS.md").read_text()
    for heading in ("## Results on the demo", "## The teacher on the real OpenI reports",
                    "## Does OpenI's encoder change VKD on the demo?"):
        assert heading in document
    assert "Not measured here: `python -m vkd.results` was given no `--openi-dir`" in document
    lines = document.splitlines()
    for method in results.METHODS:
        run = out / "demo" / f"demo-{method}-seed0"
        metrics = json.loads((run / "metrics.json").read_text())
        row = next(line for line in lines if line.startswith(f"| {run / 'best.pt'} |"))
        five = (cell(metrics, "chexpert5_auroc") if metrics["chexpert5_auroc"] is not None
                else "n/a (not all five defined)")
        assert (f"| {cell(metrics, 'macro_auroc')} | {five} | {cell(metrics, 'macro_auprc')} |"
                in row and f"| {metrics['best_epoch']} |" in row)
    # one seed: the seed mean and its interval are the run's own
    metrics = json.loads((out / "tiny" / "openi-sentences" / "vkd-seed0" / "metrics.json")
                         .read_text())
    row = next(line for line in lines if line.startswith("| all of OpenI's encoder settings |"))
    assert f"| {cell(metrics, 'macro_auroc')} |" in row
    assert "python evaluate.py --compare" in document and "do\n    python train.py" in document
    assert "--out" in document and "--sentence-attention" in document


def test_the_pictures_are_written_and_only_those_the_document_shows(quick):
    root, _ = quick
    out = root / "runs"
    assert sorted(p.name for p in (out / "demo-seed0").iterdir()) == ["pr.png", "roc.png"]
    assert (sorted(p.name for p in (out / "demo-vkd-seed0").iterdir())
            == sorted(results.RUN_PICTURES))
    assert all(p.stat().st_size > 0 for p in (out / "demo-vkd-seed0").iterdir())
    assert "](demo-vkd-seed0/cam-cardiomegaly.png)" in (out / "RESULTS.md").read_text()


def test_report_only_writes_the_same_document_without_training(quick, capsys):
    root, argv = quick
    out = root / "runs"
    document = (out / "RESULTS.md").read_text()
    before = {path: path.stat().st_mtime for path in out.rglob("*.pt")}
    logs = {path: path.stat().st_size for path in out.rglob("train.log")}
    (out / "RESULTS.md").unlink()
    capsys.readouterr()
    results.main(argv + ["--report-only"])
    assert "running 0" in capsys.readouterr().out
    assert (out / "RESULTS.md").read_text() == document
    assert before == {path: path.stat().st_mtime for path in out.rglob("*.pt")}
    assert logs == {path: path.stat().st_size for path in out.rglob("train.log")}


def test_a_run_trained_with_other_options_than_planned_stops_the_script(quick, tmp_path):
    root, _ = quick
    name = "demo/demo-vkd-seed0"
    shutil.copytree(root / "runs" / name, tmp_path / name)
    record = json.loads((tmp_path / name / "run.json").read_text())
    record["config"]["beta"] = 1.0                        # as if trained with --beta 1
    (tmp_path / name / "run.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="demo-vkd-seed0 was trained with other options.*beta"):
        results.main(["--quick", "--report-only", "--out", str(tmp_path),
                      "--data-dir", str(root / "data")])


def test_placeholders_are_grey_one_per_image_and_never_overwrite(quick, tmp_path):
    """The demo's reports are in the OpenI format: packed as NLMCXR_reports.tgz they stand in for
    the real archive."""
    root, _ = quick
    reports = next((root / "data").glob("demo-*")) / "ecgen-radiology"
    xml = sorted(reports.glob("*.xml"))[:5]
    with tarfile.open(tmp_path / "NLMCXR_reports.tgz", "w:gz") as archive:
        for path in xml:
            archive.add(path, arcname=f"ecgen-radiology/{path.name}")
    ids = [i for path in xml
           for i in results.parse_report(path.read_bytes(), str(path)).image_ids]
    folder = results.write_placeholders(tmp_path)
    assert sorted(p.stem for p in folder.iterdir()) == sorted(ids) and ids
    image = np.asarray(Image.open(folder / f"{ids[0]}.png"))
    assert image.shape == (8, 8) and (image == 128).all()
    with pytest.raises(FileExistsError):
        results.write_placeholders(tmp_path)
