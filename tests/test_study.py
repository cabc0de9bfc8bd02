"""study.py: the grid runs once, a second call reuses it, an interrupted run is resumed, and the
document holds the learning curve, the ablations and the diagnostics; --train-fraction gives every
method and seed the same reports."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import study

REPO = Path(__file__).resolve().parent.parent

TINY = {"fractions": (0.25, 1.0), "seeds": (0,),
        "ablations": ("q(z|t)", "f([z; h_x])", study.CONTROL),
        "settings": ["--data", "demo", "--demo-reports", "120", "--image-size", "32",
                     "--epochs", "2", "--batch-size", "16"]}


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    patch = pytest.MonkeyPatch()
    patch.setattr(study, "QUICK", TINY)
    argv = ["--quick", "--out", str(root / "runs"), "--data-dir", str(root / "data"),
            "--bootstrap", "200"]
    study.main(argv)
    yield root, argv
    patch.undo()


def test_study_writes_the_learning_curve_the_ablations_and_the_diagnostics(finished_study):
    root, _ = finished_study
    document = (root / "runs" / "STUDY.md").read_text()
    for heading in ("## What it found", "## The learning curve: test macro AUROC",
                    "## The learning curve: test macro AUPRC",
                    "## Ablations at training fraction 0.25", "## Diagnostics"):
        assert heading in document
    curve = document.split("## The learning curve: test macro AUROC")[1].split("##")[0]
    assert "\n| 0.25 |" in curve and "\n| 1.0 |" in curve
    ablations = document.split("## Ablations")[1].split("##")[0]
    assert ("\n| vkd (defaults) | `(defaults)` |" in ablations
            and "\n| q(z\\|t) | `--posterior-input report` |" in ablations)
    assert ("\n| f0.25-image" not in document
            and "`--method image --classifier-input z+image`" in ablations)
    assert ("Against the image baseline with the same classifier" in ablations
            and "\n| f([z; h_x]) | " in ablations)
    assert ("| vkd, fraction 0.25 |" in document and " of 64 |" in document
            and "Not finished" not in document)
    assert (root / "runs" / "study" / "learning-curve.png").stat().st_size > 0


def test_every_method_and_seed_trains_on_the_same_fraction_of_the_reports(finished_study):
    root, _ = finished_study
    train = {name: json.loads((root / "runs" / name / "splits.json").read_text())
             for name in ("f0.25-image-seed0", "f0.25-vkd-seed0", "f0.25-text-seed0",
                          "f0.25-vkd-q-z-t-seed0", "f1.0-image-seed0")}
    quarter = train["f0.25-image-seed0"]
    assert (train["f0.25-vkd-seed0"] == quarter == train["f0.25-text-seed0"]
            == train["f0.25-vkd-q-z-t-seed0"])
    full = train["f1.0-image-seed0"]
    assert (set(quarter["train"]) < set(full["train"])
            and len(quarter["train"]) == round(len(full["train"]) / 4))
    assert quarter["val"] == full["val"] and quarter["test"] == full["test"]
    config = json.loads(
        (root / "runs" / "f0.25-vkd-q-z-t-seed0" / "run.json").read_text())["config"]
    assert config["posterior_input"] == "report" and config["train_fraction"] == 0.25


def test_a_second_call_reuses_finished_runs_and_resumes_an_interrupted_one_exactly(finished_study,
                                                                                   capsys):
    """One run is replaced by the same run stopped after its first epoch: the study resumes it and
    ends with the weights of the uninterrupted run; the finished runs are not touched."""
    root, argv = finished_study
    name = "f1.0-vkd-seed0"
    run = root / "runs" / name
    uninterrupted = torch.load(run / "best.pt", weights_only=True)["model"]
    before = {other: (root / "runs" / other / "best.pt").read_bytes()
              for other in ("f0.25-image-seed0", "f1.0-text-seed0")}
    shutil.rmtree(run)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(study, "QUICK", TINY)
        flags = study.grid(quick=True)[0][name]
        subprocess.run([sys.executable, str(REPO / "train.py"), *flags,
                        "--data-dir", str(root / "data"), "--out", str(run), "--stop-after", "1"],
                       check=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True)
        assert (run / "last.pt").exists() and not (run / "metrics.json").exists()
        capsys.readouterr()
        study.main(argv)
    assert "8 of 9 runs finished before; training 1" in capsys.readouterr().out
    assert "resuming" in (run / "train.log").read_text() and (run / "metrics.json").exists()
    resumed = torch.load(run / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in uninterrupted)
    assert before == {other: (root / "runs" / other / "best.pt").read_bytes() for other in before}


def test_a_run_trained_with_other_options_than_the_plan_stops_the_study(finished_study, tmp_path):
    root, argv = finished_study
    out = tmp_path / "runs"
    shutil.copytree(root / "runs" / "f0.25-vkd-q-z-t-seed0", out / "f0.25-vkd-q-z-t-seed0")
    record = json.loads((out / "f0.25-vkd-q-z-t-seed0" / "run.json").read_text())
    record["config"]["posterior_input"] = "image+report"   # as if trained before the switch was set
    (out / "f0.25-vkd-q-z-t-seed0" / "run.json").write_text(json.dumps(record))
    with pytest.MonkeyPatch.context() as patch, pytest.raises(
            SystemExit, match="f0.25-vkd-q-z-t-seed0 was trained with other options"
                              ".*posterior_input"):
        patch.setattr(study, "QUICK", TINY)
        study.main(["--quick", "--out", str(out), "--data-dir", str(root / "data")])
    (out / "f0.25-vkd-q-z-t-seed0" / "run.json").write_text('{"config": {"beta"')     # cut short
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit,
                                                              match="run.json cannot be read"):
        patch.setattr(study, "QUICK", TINY)
        study.main(["--quick", "--out", str(out), "--data-dir", str(root / "data")])


def test_a_damaged_checkpoint_in_a_study_folder_is_an_error_line_not_a_traceback(tmp_path):
    runs, _, _ = study.grid(quick=True)
    name = next(iter(runs))
    (tmp_path / name).mkdir()
    (tmp_path / name / "metrics.json").write_text("{}")
    (tmp_path / name / "best.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match=rf"error: .*{name}/best.pt was refused: the file is "
                                         r"empty"):
        study.main(["--quick", "--report-only", "--out", str(tmp_path),
                    "--doc", str(tmp_path / "STUDY.md")])
