"""Interrupted runs: killed at any point, a run resumed with --resume ends with the same weights and
metrics as one that was never interrupted (on CPU, bit for bit). The signals land at a known step
(VKD_TEST_SIGNAL_AT_STEP, read by train.py), never after a sleep that races the run, so a busy
machine cannot change what is tested."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from vkd import batching, runtime

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--demo-reports", "60", "--image-size", "32", "--batch-size", "8", "--cnn-width", "4",
        "--latent-dim", "8", "--text-dim", "16", "--max-len", "32", "--vocab-size", "200",
        "--bootstrap", "20", "--warmup-steps", "2", "--beta-warmup-epochs", "1", "--epochs", "3",
        "--allow-missing-labels"]


def run_train(args, signal_at_step=None):
    """train.py in a subprocess; signal_at_step="N:NAME" makes it send itself that signal after step
    N."""
    env = os.environ | ({"VKD_TEST_SIGNAL_AT_STEP": signal_at_step} if signal_at_step else {})
    return subprocess.Popen([sys.executable, "train.py"] + args, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def steps_per_epoch(run):
    return json.loads((run / "log.jsonl").read_text().splitlines()[0])["step"]


def assert_same_run(a, b):
    for name in ("last.pt", "best.pt"):
        state_a, state_b = (torch.load(run / name, weights_only=True) for run in (a, b))
        assert state_a["epoch"] == state_b["epoch"] and state_a["step"] == state_b["step"]
        for key in state_a["model"]:
            assert torch.equal(state_a["model"][key],
                               state_b["model"][key]), f"{name}: {key} differs"
    metrics_a, metrics_b = (json.loads((run / "metrics.json").read_text()) for run in (a, b))
    assert (metrics_a["per_label"] == metrics_b["per_label"]
            and metrics_a["macro_auroc"] == metrics_b["macro_auroc"])
    log_a, log_b = ([json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
                    for run in (a, b))
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
    steps = steps_per_epoch(tmp / "whole")
    process = run_train(TINY + ["--data-dir", str(data_dir), "--out", str(out)],
                        f"{steps + 3}:SIGKILL")
    process.communicate(timeout=600)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    # epoch 1's, nothing of epoch 2
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 0
    resumed = run_train(["--out", str(out), "--resume"])
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert_same_run(tmp / "whole", out)


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    runtime.save_checkpoint(path, {"epoch": 1, "weights": torch.arange(4.0)})

    def crash_half_way(obj, file):
        with open(file, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(train.torch, "save", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        runtime.save_checkpoint(path, {"epoch": 2, "weights": torch.zeros(4)})
    monkeypatch.undo()
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["epoch"] == 1 and torch.equal(checkpoint["weights"], torch.arange(4.0))


def test_ctrl_c_saves_the_exact_step_and_resume_gives_the_same_run(uninterrupted):
    tmp, data_dir = uninterrupted
    out = tmp / "ctrl-c"
    steps = steps_per_epoch(tmp / "whole")
    process = run_train(TINY + ["--data-dir", str(data_dir), "--out", str(out)],
                        f"{steps + 3}:SIGINT")
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 130, output[-3000:]
    assert "Continue with: python train.py --out" in output and "Traceback" not in output
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["step"] == steps + 3
    assert checkpoint["interrupted"]["steps_done"] == 3
    resumed = run_train(["--out", str(out), "--resume"])
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert_same_run(tmp / "whole", out)


def test_ctrl_c_at_the_last_step_of_an_epoch_resumes_bit_identically_in_process(uninterrupted,
                                                                                  monkeypatch):
    """Ctrl-C after the last step of epoch 2, before its validation: the resumed run takes no step
    in epoch 2, validates and logs it, and goes on."""
    tmp, data_dir = uninterrupted
    out = tmp / "in-process"
    steps = steps_per_epoch(tmp / "whole")
    monkeypatch.setenv("VKD_TEST_SIGNAL_AT_STEP", f"{2 * steps}:SIGINT")
    with pytest.raises(KeyboardInterrupt):
        train.train(train.get_args(TINY + ["--data-dir", str(data_dir), "--out", str(out)]))
    monkeypatch.delenv("VKD_TEST_SIGNAL_AT_STEP")
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["step"] == 2 * steps
    assert checkpoint["interrupted"]["steps_done"] == steps
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    train.train(train.get_args(["--out", str(out), "--resume"]))
    assert_same_run(tmp / "whole", out)


def test_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(uninterrupted,
                                                                          monkeypatch):
    tmp, data_dir = uninterrupted
    out = tmp / "nan"
    real_step, calls, steps = train.train_step, [], steps_per_epoch(tmp / "whole")

    def nan_from_epoch_two(model, forward, optimizer, scaler, autocast, x, t, y, beta, args):
        calls.append(1)
        if len(calls) > steps:
            x = x * float("nan")                                      # a corrupt input batch
        return real_step(model, forward, optimizer, scaler, autocast, x, t, y, beta, args)

    monkeypatch.setattr(train, "train_step", nan_from_epoch_two)
    with pytest.raises(runtime.TrainingStopped,
                       match=rf"non-finite loss or gradients in {steps} of {steps} steps of "
                             r"epoch 2; stopped without saving them \(.*last.pt keeps epoch 1\)"):
        train.train(train.get_args(TINY + ["--data-dir", str(data_dir), "--out", str(out)]))
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 0
    assert all(torch.isfinite(v).all()
               for v in checkpoint["model"].values() if v.is_floating_point())


def test_out_of_memory_gives_a_message_not_a_traceback(monkeypatch, capsys):
    def out_of_memory(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "train", out_of_memory)
    monkeypatch.setattr(sys, "argv", ["train.py", "--batch-size", "64"])
    with pytest.raises(SystemExit,
                       match=r"ran out of memory at --batch-size 64; try --batch-size 32"):
        train.main()


def test_a_label_without_training_positives_stops_unless_allowed(uninterrupted):
    tmp, data_dir = uninterrupted
    args = [a for a in TINY if a != "--allow-missing-labels"] + ["--data-dir", str(data_dir),
                                                                 "--out", str(tmp / "x")]
    with pytest.raises(train.data.DataError,
                       match=r"no positive training image for Enlarged Cardiomediastinum, "
                             r"Consolidation: .*--allow-missing-labels"):
        train.train(train.get_args(args))


def test_resume_from_a_damaged_last_checkpoint_says_so(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 not a whole checkpoint")
    with pytest.raises(train.data.DataError, match=r"last.pt was refused: not a whole checkpoint"):
        train.train(train.get_args(["--out", str(tmp_path), "--resume"]))


def test_grouped_batches_with_word_dropout_resume_bit_identically(uninterrupted, tmp_path,
                                                                  monkeypatch):
    """OpenI's defaults: batches grouped by report length and rare labels drawn more often (the
    order and the draws come from the epoch's seeded generator), word dropout and sentence shuffling
    (they draw from the saved RNG state), attention within sentences and no transformer dropout
    still give an exact resume after a Ctrl-C mid-epoch."""
    _, data_dir = uninterrupted
    options = TINY + ["--data-dir", str(data_dir), "--epochs", "2", "--group-by-length",
                      "--word-dropout", "0.2", "--sentence-shuffle", "--sentence-attention",
                      "--oversample", "--dropout", "0", "--method", "text"]
    cut = batching.batch_tokens
    grouped = []                                 # whether each batch came with its reports' lengths
    monkeypatch.setattr(batching, "batch_tokens", lambda tokens, idx, batch_lengths=None:
                        (grouped.append(batch_lengths is not None)
                         or cut(tokens, idx, batch_lengths)))
    train.train(train.get_args(options + ["--out", str(tmp_path / "whole")]))
    assert grouped and all(grouped)                  # train.py passes the lengths on to every batch
    config = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["model_config"]
    dot = train.data.load_tokenizer(tmp_path / "whole" / "tokenizer.json").token_to_id(".")
    assert dot > 1 and config["sentence_end"] == dot                  # train.py gives the id of "."
    assert config["sentence_shuffle"] and config["sentence_attention"] and config["dropout"] == 0
    steps = steps_per_epoch(tmp_path / "whole")
    monkeypatch.setenv("VKD_TEST_SIGNAL_AT_STEP", f"{steps + 3}:SIGINT")
    with pytest.raises(KeyboardInterrupt):
        train.train(train.get_args(options + ["--out", str(tmp_path / "stopped")]))
    monkeypatch.delenv("VKD_TEST_SIGNAL_AT_STEP")
    train.train(train.get_args(["--out", str(tmp_path / "stopped"), "--resume"]))
    assert_same_run(tmp_path / "whole", tmp_path / "stopped")
