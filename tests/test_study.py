"""study.py: the grid runs once, a second call reuses it, an interrupted run is resumed, and the
document holds the learning curve of the five methods, the controls, the ablations and the
diagnostics; --train-fraction gives every method and seed the same reports."""
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

TINY = {"fractions": (0.25, 1.0), "seeds": (0,), "jobs": 2, "threads": 1, "demo_reports": 120,
        "ablations": ("q(z|t)", "f([z; h_x])", study.CONTROL),
        "settings": ["--image-size", "32", "--epochs", "2", "--batch-size", "16"]}


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
                    "## The learning curve: test CheXpert 5 mean AUROC",
                    "## The learning curve: test macro AUPRC", "## The controls",
                    "## Ablations at training fraction 0.25", "## Diagnostics"):
        assert heading in document
    curve = document.split("## The learning curve: test macro AUROC")[1].split("##")[0]
    assert "\n| 0.25 |" in curve and "\n| 1.0 |" in curve
    assert ("| image | vkd | text | distill | contrastive | vkd − image | distill − image | "
            "contrastive − image |") in curve
    controls = document.split("## The controls")[1].split("##")[0]
    for method in ("vkd", "text"):
        for control in ("shuffled", "blank"):
            assert f"\n| {method} | {control} | " in controls
    assert "**distill − image, CheXpert 5 mean AUROC**" in document
    assert "**vkd − vkd trained on shuffled reports, macro AUROC**" in document
    assert ("labels: MeSH majors of the synthetic demo reports (vkd/openi.py); uncertain: none"
            in document and "bootstrap unit: reports" in document)
    ablations = document.split("## Ablations")[1].split("##")[0]
    assert ("\n| vkd (defaults) | `(defaults)` |" in ablations
            and "\n| q(z\\|t) | `--posterior-input report` |" in ablations)
    assert ("\n| f0.25-image" not in document
            and "`--method image --classifier-input z+image`" in ablations)
    assert ("Against the image baseline with the same classifier" in ablations
            and "\n| f([z; h_x]) | " in ablations)
    assert ("| vkd, fraction 0.25 |" in document and " of 64 |" in document
            and "Not finished" not in document)
    for picture in ("learning-curve", "controls", "ablations"):
        assert (root / "runs" / "study" / f"{picture}.png").stat().st_size > 0


def test_each_distill_run_learns_from_the_text_run_of_its_fraction_and_seed(finished_study):
    root, _ = finished_study
    for fraction in (0.25, 1.0):
        config = json.loads(
            (root / "runs" / f"f{fraction}-distill-seed0" / "run.json").read_text())["config"]
        assert config["teacher"] == str(root / "runs" / f"f{fraction}-text-seed0" / "best.pt")
    shuffled = json.loads(
        (root / "runs" / "f0.25-vkd-shuffled-seed0" / "run.json").read_text())["config"]
    assert shuffled["report_control"] == "shuffled" and shuffled["method"] == "vkd"


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
        flags = study.grid(study.get_args(argv))[0][name]
        subprocess.run([sys.executable, str(REPO / "train.py"), *flags,
                        "--data-dir", str(root / "data"), "--out", str(run), "--stop-after", "1"],
                       check=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True)
        assert (run / "last.pt").exists() and not (run / "metrics.json").exists()
        capsys.readouterr()
        study.main(argv)
    assert "20 of 21 runs finished before; training 1" in capsys.readouterr().out
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
    runs = study.grid(study.get_args(["--quick", "--out", str(tmp_path)]))[0]
    name = next(iter(runs))
    (tmp_path / name).mkdir()
    (tmp_path / name / "metrics.json").write_text("{}")
    (tmp_path / name / "best.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match=rf"error: .*{name}/best.pt was refused: the file is "
                                         r"empty"):
        study.main(["--quick", "--report-only", "--out", str(tmp_path),
                    "--doc", str(tmp_path / "STUDY.md")])


def test_a_study_on_another_collection_runs_its_options_and_writes_into_its_folder(tmp_path):
    args = study.get_args(["--data", "csv", "--csv", "my.csv", "--csv-labels", "Edema,Other",
                           "--plan", "gpu", "--fractions", "0.5", "--seeds", "3"])
    assert args.out == Path("runs/study-csv-gpu") and args.doc == args.out / "STUDY.md"
    assert args.jobs == 1 and args.threads is None
    runs, curve, controls, ablations = study.grid(args)
    assert list(curve) == [0.5] and ablations == {}           # no ablation without fraction 0.25
    flags = runs["f0.5-vkd-seed3"]
    assert flags[:5] == ["--data", "csv", "--csv", "my.csv", "--csv-labels"]
    assert flags[flags.index("--backbone") + 1] == "densenet121"
    assert flags[flags.index("--image-size") + 1] == "224"
    assert len(runs) == 5 + 4                                 # five methods, four controls
    with pytest.raises(SystemExit):
        study.get_args(["--quick", "--plan", "gpu"])
    with pytest.raises(SystemExit):
        study.get_args(["--no-such-option"])
    with pytest.raises(SystemExit):                   # the plan sets the training options
        study.get_args(["--data", "openi", "--epochs", "3"])
    assert study.get_args(["--data", "mimic", "--uncertain", "ignore"]).data_flags == [
        "--uncertain", "ignore"]


def test_the_learning_curve_picture_draws_the_methods_then_the_ways_against_image(tmp_path,
                                                                                    monkeypatch):
    """One panel per AUROC summary with the five methods' curves, then one panel with the three
    ways of using the report minus the image baseline (never a panel mixing the two); a method
    keeps its colour from panel to panel."""
    from vkd.pictures import pyplot
    plt = pyplot()
    stats = {"mean": 0.7, "ci95": [0.6, 0.8]}
    method = {key: stats for key in study.KEYS} | {"difference": {"macro_auroc": {
        "value": 0.01, "ci95": [-0.01, 0.03]}}}
    results = {"keys": list(study.KEYS),
               "curve": {f: {"methods": [method] * len(study.METHODS)} for f in (0.1, 1.0)}}
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    study.curve_picture(plt, results, tmp_path / "curve.png")
    axes = figures[0].axes
    assert (tmp_path / "curve.png").is_file() and len(axes) == 3
    labels = [[text.get_text() for text in ax.get_legend().get_texts()] for ax in axes]
    assert labels == [list(study.METHODS), list(study.METHODS), list(study.WAYS)]
    assert [ax.get_title() for ax in axes[:2]] == ["macro AUROC", "CheXpert 5 mean AUROC"]
    colours = [{bars.get_label(): bars.lines[0].get_color() for bars in ax.containers}
               for ax in axes]
    assert all(colours[2][way] == colours[0][way] == colours[1][way] for way in study.WAYS)
