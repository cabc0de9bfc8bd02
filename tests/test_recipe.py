"""End to end on a tiny demo: train.py --method all --seeds, evaluate.py --compare on identical
checkpoints, single-image prediction on PNG/JPEG of every kind, Grad-CAM overlays and the
pictures."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
from vkd import metrics
import train
from model import VKD, VKDConfig
from vkd import analysis, gradcam, image_cache
from vkd.recipe import METHODS_OF_ALL, run_recipe, train_in_parallel

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--demo-reports", "60", "--image-size", "32", "--batch-size", "16", "--cnn-width", "4",
        "--latent-dim", "8", "--text-dim", "16", "--max-len", "32", "--vocab-size", "200",
        "--bootstrap", "50", "--warmup-steps", "2", "--beta-warmup-epochs", "1", "--epochs", "1",
        "--allow-missing-labels"]


def run_evaluate(*arguments, check=True):
    return subprocess.run([sys.executable, "evaluate.py", *map(str, arguments)], cwd=ROOT,
                          capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipe")
    args = train.get_args(TINY + ["--method", "all", "--seeds", "0,1",
                                  "--data-dir", str(tmp / "data"), "--out", str(tmp / "runs")])
    return tmp / "runs", run_recipe(args, train.train)


def test_method_all_trains_every_method_and_seed_on_one_split_and_compares_them(recipe):
    runs, result = recipe
    for method in METHODS_OF_ALL:
        for seed in (0, 1):
            run_json = json.loads((runs / f"demo-{method}-seed{seed}" / "run.json").read_text())
            assert run_json["config"]["method"] == method and run_json["config"]["seed"] == seed
    hashes = {torch.load(path, weights_only=True)["split_sha256"]
              for path in runs.glob("*/best.pt")}
    assert len(hashes) == 1                                     # one split for all ten runs
    assert json.loads((runs / "demo-comparison.json").read_text()) == json.loads(json.dumps(result))
    assert [m["name"] for m in result["methods"]] == list(METHODS_OF_ALL)
    teacher = runs / "demo-text-seed1" / "best.pt"            # distill learns from its seed's text
    assert json.loads((runs / "demo-distill-seed1" / "run.json").read_text())["config"][
        "teacher"] == str(teacher)
    for method in result["methods"]:
        assert method["seeds"] == [0, 1] and method["macro_auroc"]["std"] is not None
        macros = [result["runs"][i]["macro_auroc"] for i in method["runs"]]
        assert method["macro_auroc"]["mean"] == pytest.approx(np.mean(macros))
    assert result["methods"][1]["difference"]["vs"] == "image"
    assert 0 <= result["methods"][1]["difference"]["macro_auroc"]["p"] <= 1
    for i, run in enumerate(result["runs"]):                   # each run's own metrics.json agrees
        metrics = json.loads((Path(run["checkpoint"]).parent / "metrics.json").read_text())
        assert run["macro_auroc"] == pytest.approx(metrics["macro_auroc"], abs=1e-12), i


def test_comparing_a_checkpoint_with_itself_gives_exactly_zero(recipe):
    runs, _ = recipe
    vkd = runs / "demo-vkd-seed0" / "best.pt"
    result = json.loads(run_evaluate("--compare", vkd, vkd, "--bootstrap", 50, "--json").stdout)
    defined = [key for key in metrics.SUMMARY_KEYS if result["runs"][0][key] is not None]
    assert "macro_auroc" in defined and "micro_auroc" in defined
    for key in metrics.SUMMARY_KEYS:       # a summary undefined for the run has no difference
        expected = ({"value": 0.0, "ci95": [0.0, 0.0], "p": 1.0} if key in defined
                    else {"value": None, "ci95": None, "p": None})
        assert result["methods"][1]["difference"][key] == expected, key


def write_inputs(folder, size=32):
    """The same drawing as 8-bit gray, RGB, 16-bit PNG and gray/RGB JPEG, at several sizes."""
    yy, xx = np.mgrid[0:90, 0:70]
    # (90, 70), not square
    pixels = (127 + 100 * np.sin(xx / 9.0) * np.cos(yy / 13.0)).astype(np.uint8)
    paths = {"gray.png": Image.fromarray(pixels),
             "rgb.png": Image.fromarray(np.stack([pixels] * 3, -1)),
             "gray16.png": Image.fromarray(pixels.astype(np.uint16) * 257),
             "gray.jpg": Image.fromarray(pixels),
             "rgb.jpeg": Image.fromarray(np.stack([pixels] * 3, -1)).resize((350, 450))}
    for name, image in paths.items():
        (image.save(folder / name, quality=95) if name.endswith(("jpg", "jpeg"))
         else image.save(folder / name))
    assert Image.open(folder / "gray16.png").mode.startswith("I")          # really stored as 16-bit
    return [folder / name for name in paths]


def test_single_images_of_any_kind_get_probabilities_and_an_overlay(recipe, tmp_path):
    runs, _ = recipe
    checkpoint_path = runs / "demo-vkd-seed0" / "best.pt"
    paths = write_inputs(tmp_path)
    result = json.loads(run_evaluate("--ckpt", checkpoint_path, "--image", *paths,
                                     "--cam", "no finding", "--out", tmp_path / "cam",
                                     "--json").stdout)
    model, checkpoint = evaluate.load_checkpoint(checkpoint_path)
    config = checkpoint["config"]
    for path in paths:
        probabilities = result[str(path)]
        assert [name for name in probabilities if name != "cam"] == data.LABELS
        assert all(0 <= probabilities[n]["p"] <= 1 and probabilities[n]["std"] > 0
                   for n in data.LABELS)
        with Image.open(probabilities["cam"]) as overlay:
            # twice the checkpoint's 32 px
            assert overlay.size == (64, 64) and overlay.mode == "RGB"
        x = data.normalise(torch.from_numpy(image_cache.load_image(path, 32))[None],
                           config["pixel_mean"], config["pixel_std"])
        expected = model.predict(x)[0][0]                       # the checkpoint's own preprocessing
        assert [probabilities[n]["p"] for n in data.LABELS] == pytest.approx(expected.tolist(),
                                                                             abs=1e-5)
    png = [result[str(paths[0])][n]["p"] for n in data.LABELS]
    for other in paths[1:3]:                                # RGB and 16-bit PNG of the same drawing
        assert [result[str(other)][n]["p"] for n in data.LABELS] == pytest.approx(png, abs=0.02)
    image_model, image_checkpoint = evaluate.load_checkpoint(runs / "demo-image-seed0" / "best.pt")
    _, p, mean, std = analysis.predict_files(image_model, image_checkpoint, paths[:1], "cpu")
    # no trained prior variance: no uncertainty
    assert p.shape == (1, 14) and mean is None and std is None
    text = run_evaluate("--ckpt", runs / "demo-text-seed0" / "best.pt", "--image", paths[0],
                        check=False)
    assert (text.returncode != 0 and "reads the report" in text.stderr
            and "Traceback" not in text.stderr)
    wrong = run_evaluate("--ckpt", checkpoint_path, "--image", paths[0], "--cam", "Nothing",
                         check=False)
    assert "unknown label 'Nothing'" in wrong.stderr and "Traceback" not in wrong.stderr
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    broken = run_evaluate("--ckpt", checkpoint_path, "--image", paths[0], tmp_path / "broken.png",
                          tmp_path / "absent.jpg", check=False)
    assert broken.returncode != 0 and "Traceback" not in broken.stderr
    assert "broken.png" in broken.stderr and "absent.jpg" in broken.stderr


def test_grad_cam_looks_at_the_image_only_path():
    torch.manual_seed(0)
    model = VKD(VKDConfig(cnn_width=4, latent_dim=8, text_dim=16, max_len=8, vocab_size=50)).eval()
    model.text_encoder.forward = None                         # calling the text encoder would raise
    x = torch.randn(2, 1, 32, 32)
    cam = gradcam.grad_cam(model, x, 3)
    assert cam.shape == (2, 32, 32) and cam.min() >= 0
    # 0: nothing for it
    assert all(peak in (0.0, pytest.approx(1.0)) for peak in cam.amax(dim=(1, 2)).tolist())
    assert all(p.grad is None for p in model.parameters())  # no gradient left behind on the weights


def test_every_picture_is_written(recipe, tmp_path):
    pytest.importorskip("matplotlib")
    runs, _ = recipe
    vkd = runs / "demo-vkd-seed0" / "best.pt"
    result = json.loads(run_evaluate("--ckpt", vkd, "--plots", "--temperature",
                                     "--cam", "No Finding", "--out", tmp_path, "--json",
                                     "--bootstrap", 20).stdout)
    names = ["roc.png", "pr.png", "reliability.png", "training.png", "latents.png",
             "cam-no-finding.png"]
    assert [Path(p).name for p in result["pictures"]] == names
    for name in names:
        with Image.open(tmp_path / name) as picture:
            assert picture.format == "PNG" and min(picture.size) >= 64
    assert result["calibration"]["temperature"] > 0 and result["uncertainty"]["samples"] == 100
    compared = json.loads(run_evaluate("--compare", runs / "demo-image-seed0" / "best.pt", vkd,
                                       "--plots", "--out", tmp_path / "compare", "--json",
                                       "--bootstrap", 20).stdout)
    assert sorted(Path(p).name for p in compared["pictures"]) == ["pr.png", "roc.png"]
    assert (tmp_path / "compare" / "roc.png").stat().st_size > 0


def test_parallel_runs_report_a_failure_and_never_start_a_student_without_its_teacher(tmp_path):
    """train_in_parallel (study.py, vkd/results.py): a run that train.py refuses is reported
    failed with its log, and a distill run whose teacher failed is not started at all."""
    runs = {"teacher": ["--method", "text", "--epochs", "many"],          # train.py refuses this
            "student": ["--method", "distill", "--train-fraction", "0.5",
                        "--teacher", str(tmp_path / "teacher" / "best.pt")]}
    failed = train_in_parallel(runs, tmp_path, jobs=2, threads=1, desc="test")
    assert sorted(failed) == ["student", "teacher"]
    assert "--epochs" in (tmp_path / "teacher" / "train.log").read_text()
    assert not (tmp_path / "student").exists()
