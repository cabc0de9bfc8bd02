"""Interrupted runs: killed at any point, a run resumed with --resume ends with the same weights and metrics as
one that was never interrupted (on CPU, bit for bit)."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--demo-reports", "60", "--image-size", "32", "--batch-size", "8", "--cnn-width", "4", "--latent-dim", "8",
        "--text-dim", "16", "--max-len", "32", "--vocab-size", "200", "--bootstrap", "20", "--warmup-steps", "2",
        "--beta-warmup-epochs", "1", "--epochs", "3"]


def run_train(args, **kwargs):
    return subprocess.Popen([sys.executable, "train.py"] + args, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def wait_for_epochs(log, count, process, timeout=240):
    """Block until `log` (log.jsonl) has `count` lines, i.e. that many epochs are finished and checkpointed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= count:
            return
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.05)
    pytest.fail(f"{log} did not reach {count} epochs in {timeout}s")


def assert_same_run(a, b):
    for name in ("last.pt", "best.pt"):
        state_a, state_b = (torch.load(run / name, weights_only=True) for run in (a, b))
        assert state_a["epoch"] == state_b["epoch"] and state_a["step"] == state_b["step"]
        for key in state_a["model"]:
            assert torch.equal(state_a["model"][key], state_b["model"][key]), f"{name}: {key} differs"
    metrics_a, metrics_b = (json.loads((run / "metrics.json").read_text()) for run in (a, b))
    assert metrics_a["per_label"] == metrics_b["per_label"] and metrics_a["macro_auroc"] == metrics_b["macro_auroc"]
    log_a, log_b = ([json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for run in (a, b))
    for line_a, line_b in zip(log_a, log_b, strict=True):
        for key in ("epoch", "step", "loss", "kl", "beta", "lr", "val_macro_auroc"):
            assert line_a[key] == line_b[key], key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    data_dir = tmp / "data"
    process = run_train(TINY + ["--data-dir", str(data_dir), "--out", str(tmp / "whole")])
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    return tmp, data_dir


def test_sigkill_in_the_middle_of_an_epoch_then_resume_gives_the_same_run(uninterrupted):
    tmp, data_dir = uninterrupted
    out = tmp / "killed"
    process = run_train(TINY + ["--data-dir", str(data_dir), "--out", str(out)])
    wait_for_epochs(out / "log.jsonl", 1, process)
    time.sleep(0.3)                                                   # into epoch 2
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    resumed = run_train(["--out", str(out), "--resume"])
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert_same_run(tmp / "whole", out)


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    train.save_checkpoint(path, {"epoch": 1, "weights": torch.arange(4.0)})

    def crash_half_way(obj, file):
        with open(file, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(train.torch, "save", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(path, {"epoch": 2, "weights": torch.zeros(4)})
    monkeypatch.undo()
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["epoch"] == 1 and torch.equal(checkpoint["weights"], torch.arange(4.0))
