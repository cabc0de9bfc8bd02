"""Interrupted runs: killed at any point, a run resumed with --resume ends with the same weights and
metrics as one that was never interrupted (on CPU, bit for bit). The signals land at a known step
(VKD_TEST_SIGNAL_AT_STEP, read by train.py), never after a sleep that races the run, so a busy
machine cannot change what is tested."""
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


@pytest.mark.parametrize("name, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_stop_signal_saves_the_exact_step_and_resume_gives_the_same_run(uninterrupted, name,
                                                                          status):
    """Ctrl-C (SIGINT) or SIGTERM, what a scheduler sends before it stops a job."""
    tmp, data_dir = uninterrupted
    out = tmp / f"stopped-{name}"
    steps = steps_per_epoch(tmp / "whole")
    process = run_train(TINY + ["--data-dir", str(data_dir), "--out", str(out)],
                        f"{steps + 3}:{name}")
    output = process.communicate(timeout=600)[0]
    assert process.returncode == status, output[-3000:]
    assert "Continue with: python train.py --out" in output and "Traceback" not in output
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["step"] == steps + 3
    assert checkpoint["interrupted"]["steps_done"] == 3
    resumed = run_train(["--out", str(out), "--resume"])
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert_same_run(tmp / "whole", out)


def test_ctrl_c_at_the_last_step_of_an_epoch_resumes_bit_identically_in_process(
        uninterrupted, monkeypatch):
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
    second = json.loads((out / "log.jsonl").read_text().splitlines()[1])
    assert second["images_per_s"] is None           # the resumed epoch 2 took no step


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


def test_fewer_training_images_than_a_batch_stop_with_the_numbers(uninterrupted):
    """Every epoch drops its incomplete last batch: a batch larger than the training split would
    train nothing."""
    tmp, data_dir = uninterrupted
    args = TINY + ["--data-dir", str(data_dir), "--out", str(tmp / "big-batch"),
                   "--batch-size", "4096"]
    with pytest.raises(train.data.DataError,
                       match=r"^\d+ training images < --batch-size 4096; lower it$"):
        train.train(train.get_args(args))


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


# ------------------------------------------------------------------------------- a full disk

def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_resume_finishes(uninterrupted,
                                                                            monkeypatch):
    """torch.save on a full disk raises a RuntimeError ("unexpected pos"): the run ends with a
    DataError naming the file and the free space, the checkpoints before stay whole, no temporary
    file is left, and --resume, once there is space, ends exactly as the uninterrupted run."""
    tmp, data_dir = uninterrupted
    out, real_save, saves = tmp / "full-disk", torch.save, []

    def full_at_the_third_save(obj, file):
        saves.append(file)
        if len(saves) == 3:                                  # epoch 2's first checkpoint
            with open(file, "wb") as handle:
                handle.write(b"PK\x03\x04 half")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")
        real_save(obj, file)

    monkeypatch.setattr(runtime.torch, "save", full_at_the_third_save)
    with pytest.raises(runtime.DataError, match=r"cannot write .*\.pt: .*unexpected pos 64 "
                                                r"\(.* GB free there\)"):
        train.train(train.get_args(TINY + ["--data-dir", str(data_dir), "--out", str(out)]))
    monkeypatch.undo()
    assert not list(out.glob("*.tmp"))
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 0
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 0
    train.train(train.get_args(["--out", str(out), "--resume"]))
    assert_same_run(tmp / "whole", out)


def test_a_full_disk_at_any_text_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path,
                                                                                  monkeypatch):
    path = tmp_path / "run.json"
    runtime.write_text(path, "old")
    monkeypatch.setattr(Path, "write_text", enospc)
    with pytest.raises(runtime.DataError, match=r"cannot write .*run.json: No space left on "
                                                r"device \(.* free there\)"):
        runtime.write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]


def test_a_log_line_that_cannot_be_written_is_an_error_naming_the_log(tmp_path):
    log = runtime.EpochLog(tmp_path / "log.jsonl", 0)
    with log:
        log.write({"epoch": 1})
        log.file = SimpleNamespace(write=enospc, close=lambda: None)
        with pytest.raises(runtime.DataError, match=r"cannot write .*log.jsonl"):
            log.write({"epoch": 2})
    assert (tmp_path / "log.jsonl").read_text() == '{"epoch": 1}\n'


def test_an_image_cache_too_big_for_the_disk_is_refused_before_it_is_filled(tmp_path,
                                                                            monkeypatch):
    """A memory map over a sparse file would die with SIGBUS when the disk fills; the cache's file
    is allocated first, and a failure is an error that leaves no file."""
    from vkd import image_cache
    from PIL import Image
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("L", (8, 8), 40 * i).save(paths[-1])
    monkeypatch.setattr(image_cache.os, "posix_fallocate", enospc, raising=False)
    with pytest.raises(runtime.DataError, match=r"cannot write .*images-8.partial.npy"):
        image_cache.cached_images(paths, 8, tmp_path / "cache")
    assert not (tmp_path / "cache" / "images-8.partial.npy").exists()


# ---------------------------------------------------------------------------- one run per folder

def hold_lock(out, holder="process 4242 on elsewhere"):
    """The lock of a run in progress, held the way train.py holds it."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "a+")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write(holder)
    handle.flush()
    return handle


def test_a_second_run_or_resume_of_a_folder_in_use_refuses_at_once(uninterrupted):
    tmp, data_dir = uninterrupted
    out = tmp / "in-use"
    holder = hold_lock(out)
    try:
        with pytest.raises(runtime.DataError, match=r"in-use is in use by another run "
                                                    r"\(process 4242 on elsewhere\)"):
            train.train(train.get_args(TINY + ["--data-dir", str(data_dir), "--out", str(out)]))
        assert sorted(path.name for path in out.iterdir()) == [".lock"]      # nothing written
        with pytest.raises(runtime.DataError, match="in use by another run"):
            train.train(train.get_args(["--out", str(tmp / "in-use"), "--resume"]))
    finally:
        holder.close()


def test_a_lock_left_by_a_process_that_ended_does_not_block(uninterrupted):
    tmp, data_dir = uninterrupted
    out = tmp / "stale-lock"
    out.mkdir()
    (out / ".lock").write_text("process 4242 on a machine that rebooted")     # nobody holds it
    args = train.get_args(TINY + ["--data-dir", str(data_dir), "--out", str(out), "--epochs", "1"])
    assert train.train(args)["macro_auroc"] is not None
    assert "process" in (out / ".lock").read_text()          # this run's, released at its end
    holder = hold_lock(out)                                  # the lock is free again
    holder.close()


def test_a_second_train_py_on_a_folder_in_use_prints_an_error_not_a_traceback(uninterrupted):
    tmp, data_dir = uninterrupted
    out = tmp / "in-use-cli"
    holder = hold_lock(out)
    try:
        process = run_train(TINY + ["--data-dir", str(data_dir), "--out", str(out)])
        output = process.communicate(timeout=600)[0]
    finally:
        holder.close()
    assert process.returncode == 1 and "Traceback" not in output
    assert f"error: {out} is in use by another run (process 4242 on elsewhere)" in output


def test_a_resumed_copy_of_a_run_folder_trains_where_it_is_not_where_it_was(uninterrupted):
    tmp, data_dir = uninterrupted
    first, copy = tmp / "first", tmp / "copy"
    train.train(train.get_args(TINY + ["--data-dir", str(data_dir), "--out", str(first),
                                       "--stop-after", "1"]))
    shutil.copytree(first, copy)
    train.train(train.get_args(["--out", str(copy), "--resume"]))
    assert (copy / "metrics.json").exists() and not (first / "metrics.json").exists()
    assert json.loads((copy / "run.json").read_text())["config"]["out"] == str(copy)


def test_a_folder_that_cannot_be_locked_or_written_is_a_warning_or_an_error(tmp_path, monkeypatch,
                                                                            capsys):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(runtime.DataError, match=r"cannot write .*file/run/.lock"):
        with runtime.FolderLock(tmp_path / "file" / "run"):
            pass

    def no_locks(handle, operation):                     # NFS without a lock daemon
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runtime.fcntl, "flock", no_locks)
    with runtime.FolderLock(tmp_path / "run"):
        pass
    assert "cannot be locked (No locks available)" in capsys.readouterr().err


def test_a_repeated_sigterm_is_ignored_while_the_step_finishes():
    """torchrun passes on a SIGTERM that its whole process group got: the second must not kill."""
    run = SimpleNamespace(procs=runtime.Processes(0, 1, torch.device("cpu")),
                          args=SimpleNamespace(log_every=0), interrupted=None)
    with runtime.StopRequest(run) as stop:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)               # would end the process by default
        assert stop.signum == signal.SIGTERM and stop.agreed(1, 10, 1)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
