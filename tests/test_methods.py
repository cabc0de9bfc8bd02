"""The other ways to use a report that exists only in training, in the same harness: distill (a
text teacher's soft targets) and contrastive (image and report features aligned), and the controls
that separate the report's information from the architecture (--report-control)."""
import json
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import train
from model import VKD, VKDConfig, bce
from vkd import runtime
from vkd.download import file_sha256

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(latent_dim=8, cnn_width=4, vocab_size=50, max_len=12, text_dim=16, text_heads=2,
             text_layers=1)
TINY = ["--demo-reports", "60", "--image-size", "32", "--batch-size", "8", "--cnn-width", "4",
        "--latent-dim", "8", "--text-dim", "16", "--max-len", "32", "--vocab-size", "200",
        "--bootstrap", "20", "--warmup-steps", "2", "--beta-warmup-epochs", "1", "--epochs", "2",
        "--allow-missing-labels"]


def batch(B=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, size, size, generator=g)
    t = torch.randint(2, 50, (B, 12), generator=g)
    t[:, 8:] = 0                                                  # padding
    y = (torch.rand(B, 14, generator=g) < 0.3).float()
    return x, t, y


def refuse(*args, **kwargs):
    raise AssertionError("the text encoder ran at inference")


@pytest.mark.parametrize("method", ["distill", "contrastive"])
def test_the_other_methods_predict_from_the_image_alone(method):
    model = VKD(VKDConfig(method=method, **SMALL)).eval()
    x, t, y = batch()
    if method == "contrastive":
        model.text_encoder.forward = refuse
        with pytest.raises(AssertionError, match="text encoder ran"):
            model(x, t, y)                                      # while training it must run
    else:
        assert model.text_encoder is None
    p, std = model.predict(x)
    assert p.shape == (6, 14) and torch.all(std == 0)


def test_distill_loss_is_the_weighted_sum_of_labels_and_soft_targets():
    torch.manual_seed(0)
    model = VKD(VKDConfig(method="distill", distill_alpha=0.3, distill_temperature=2.0,
                          **SMALL)).eval()
    x, _, y = batch()
    s = torch.randn(6, 14)                                          # the teacher's logits
    parts = model(x, s, y)
    logits = model.classify(model.encode_prior(x)[1], None)
    soft = F.binary_cross_entropy_with_logits(logits / 2, torch.sigmoid(s / 2),
                                              reduction="sum") / 6
    torch.testing.assert_close(parts["distill"], soft)
    torch.testing.assert_close(parts["loss"], 0.7 * bce(logits, y) + 0.3 * 4 * soft)
    assert set(parts) == {"loss", "bce_prior", "distill"}


def test_contrastive_loss_is_symmetric_infonce_without_negatives_from_one_report():
    torch.manual_seed(0)
    model = VKD(VKDConfig(method="contrastive", contrastive_weight=0.5,
                          contrastive_temperature=0.1, **SMALL)).eval()
    x, t, y = batch()
    t[1] = t[0]                                                     # two images of one report
    parts = model(x, t, y)
    h_x = model.encode_prior(x)[0]
    a = F.normalize(model.image_projection(h_x), dim=-1)
    b = F.normalize(model.text_projection(model.text_encoder(t)), dim=-1)
    similarity = a @ b.T / 0.1
    similarity[0, 1] = similarity[1, 0] = float("-inf")            # not each other's negatives
    pair = torch.arange(6)
    nce = (F.cross_entropy(similarity, pair) + F.cross_entropy(similarity.T, pair)) / 2
    torch.testing.assert_close(parts["contrastive"], nce)
    torch.testing.assert_close(parts["loss"], parts["bce_prior"] + 0.5 * nce)


def steps_of(method, **config):
    """Predictions of a small model after 5 optimisation steps on fixed batches."""
    torch.manual_seed(0)
    model = VKD(VKDConfig(method=method, **SMALL, **config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    args = Namespace(prior_weight=1.0, latent_samples=1, clip_grad=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(5):
        x, t, y = batch(seed=step)
        reports = torch.randn(6, 14) if method == "distill" else t
        train.train_step(model, model, optimizer, scaler, torch.autocast("cpu", enabled=False),
                         x, reports, y, 0.0, args)
    return model.eval().predict(batch(seed=99)[0])[0]


def test_alpha_zero_and_gamma_zero_reduce_to_the_image_baseline():
    image = steps_of("image")
    assert torch.equal(steps_of("distill", distill_alpha=0.0), image)
    # the text encoder's zero gradients join the clipped norm: equal up to rounding
    torch.testing.assert_close(steps_of("contrastive", contrastive_weight=0.0), image,
                               rtol=0, atol=1e-6)
    assert not torch.allclose(steps_of("distill", distill_alpha=0.5), image, atol=1e-3)


# ------------------------------------------------------------------------------------ controls

def demo(tmp_path):
    return data.prepare(data="demo", data_dir=str(tmp_path), demo_reports=60)


def test_shuffled_gives_every_training_report_another_training_reports_text(tmp_path):
    collection = demo(tmp_path)
    texts = collection.texts()
    shuffled = data.controlled_texts(collection, "shuffled", seed=0)
    train_reports = np.unique(collection.report_index[collection.splits["train"]])
    others = [i for i in range(len(texts)) if i not in set(train_reports)]
    assert sorted(shuffled[i] for i in train_reports) == sorted(texts[i] for i in train_reports)
    assert all(shuffled[i] != texts[i] for i in train_reports if texts.count(texts[i]) == 1)
    assert [shuffled[i] for i in others] == [texts[i] for i in others]       # val, test as they are
    assert data.controlled_texts(collection, "shuffled", seed=0) == shuffled  # fixed by the seed
    assert data.controlled_texts(collection, "none") == texts


def test_blank_empties_the_training_reports_only_and_an_empty_text_is_one_unk(tmp_path):
    collection = demo(tmp_path)
    blank = data.controlled_texts(collection, "blank")
    train_reports = set(np.unique(collection.report_index[collection.splits["train"]]).tolist())
    assert all((blank[i] == "") == (i in train_reports) for i in range(len(blank)))
    tokenizer = data.train_tokenizer(collection.texts(), 100)
    assert data.encode_texts(tokenizer, ["", "no effusion"], 4)[0].tolist() == [1, 0, 0, 0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A text teacher, then distill from it and contrastive, each a short demo run."""
    tmp = tmp_path_factory.mktemp("methods")
    common = TINY + ["--data-dir", str(tmp / "data")]
    for method, extra in (("text", []), ("distill", ["--teacher", str(tmp / "text/best.pt")]),
                          ("contrastive", []), ("vkd", ["--report-control", "blank"]),
                          ("text-blank", ["--report-control", "blank"])):
        method, name = method.split("-")[0], method
        train.train(train.get_args(common + ["--method", method, "--out", str(tmp / name),
                                             *extra]))
    return tmp, common


def test_distill_and_contrastive_train_end_to_end_and_log_their_parts(runs):
    tmp, _ = runs
    for method, part in (("distill", "distill"), ("contrastive", "contrastive")):
        log = [json.loads(line) for line in (tmp / method / "log.jsonl").read_text().splitlines()]
        assert len(log) == 2 and all(part in line and "bce_prior" in line for line in log)
        assert "kl" not in log[0] and json.loads((tmp / method / "metrics.json").read_text())


def test_a_control_run_saves_it_and_evaluation_reads_the_real_reports(runs):
    tmp, _ = runs
    checkpoint = torch.load(tmp / "vkd" / "best.pt", weights_only=True)
    assert checkpoint["config"]["report_control"] == "blank"


def test_a_teacher_that_is_not_a_text_run_or_of_another_split_is_refused(runs):
    tmp, common = runs
    with pytest.raises(runtime.DataError, match="is a vkd run; distill needs a text run"):
        train.train(train.get_args(common + ["--method", "distill", "--out", str(tmp / "d1"),
                                             "--teacher", str(tmp / "vkd/best.pt")]))
    other = common + ["--split-seed", "1", "--method", "distill", "--out", str(tmp / "d2"),
                      "--teacher", str(tmp / "text/best.pt")]
    teacher = torch.load(tmp / "text/best.pt", weights_only=True)["split_sha256"]
    with pytest.raises(runtime.DataError, match=rf"another split \(sha256 {teacher}\) than this "
                                                r"run \(sha256 [0-9a-f]{64}\)"):
        train.train(train.get_args(other))
    with pytest.raises(runtime.DataError, match="needs --teacher"):
        train.train(train.get_args(common + ["--method", "distill", "--out", str(tmp / "d3")]))


def test_a_student_takes_its_teachers_control_and_a_control_names_its_folder(runs):
    tmp, common = runs
    args = train.get_args(common + ["--method", "distill", "--out", str(tmp / "d-blank"),
                                    "--teacher", str(tmp / "text-blank/best.pt")])
    train.train(args)
    saved = torch.load(tmp / "d-blank" / "best.pt", weights_only=True)["config"]
    assert saved["report_control"] == "blank"
    assert train.get_args(["--report-control", "shuffled"]).out == "runs/demo-vkd-shuffled-seed0"
    assert train.get_args(["--method", "image", "--report-control", "shuffled"]).out == \
        "runs/demo-image-seed0"


def test_a_resumed_student_refuses_a_teacher_replaced_since_it_started(runs):
    tmp, common = runs
    teacher = tmp / "teacher-copy" / "best.pt"
    teacher.parent.mkdir()
    shutil.copy(tmp / "text" / "best.pt", teacher)
    shutil.copy(tmp / "text" / "tokenizer.json", teacher.parent / "tokenizer.json")
    student = common + ["--method", "distill", "--out", str(tmp / "d-resume")]
    train.train(train.get_args(student + ["--teacher", str(teacher), "--stop-after", "1"]))
    saved = torch.load(tmp / "d-resume" / "last.pt", weights_only=True)["config"]
    assert saved["teacher_sha256"] == file_sha256(teacher)
    shutil.copy(tmp / "text-blank" / "best.pt", teacher)                 # another teacher
    with pytest.raises(runtime.DataError, match="is not the teacher this run started with"):
        train.train(train.get_args(["--out", str(tmp / "d-resume"), "--resume"]))


@pytest.mark.parametrize("method", ["distill", "contrastive"])
def test_evaluate_draws_the_pictures_of_the_other_methods(runs, method):
    pytest.importorskip("matplotlib")
    tmp, _ = runs
    command = [sys.executable, "evaluate.py", "--ckpt", str(tmp / method / "best.pt"), "--plots",
               "--bootstrap", "20", "--out", str(tmp / f"pictures-{method}")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp / f"pictures-{method}" / "training.png").exists()
