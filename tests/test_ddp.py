"""DistributedDataParallel on CPU: 2 processes (gloo on 127.0.0.1) train exactly as one process does
over the same global batches; `torchrun train.py` runs every method end to end with rank 0 alone
writing, and a run stopped (--stop-after, or Ctrl-C in one process) and resumed under torchrun
equals the uninterrupted one."""
import json
import os
import socket
import subprocess
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import train
from model import VKD, VKDConfig
from vkd import batching, runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH, EPOCHS, SEED = 16, 2, 0
STEP_ARGS = SimpleNamespace(prior_weight=1.0, latent_samples=1, clip_grad=1.0)
LOOPBACK = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def problem():
    """Model (same initial weights in every process), optimizer and a small cached dataset (N=50,
    16 px). `image` method: its loss has no random draw besides augmentation, whose draws every
    process shares."""
    torch.manual_seed(SEED)
    model = VKD(VKDConfig(method="image", cnn_width=4, latent_dim=8, num_labels=5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(1)
    # (N, S, S)
    images = torch.randint(0, 256, (50, 16, 16), dtype=torch.uint8, generator=generator)
    tokens = torch.zeros(50, 4, dtype=torch.long)
    labels = (torch.rand(50, 5, generator=generator) > 0.5).float()
    return model, optimizer, images, tokens, labels, np.arange(50)


def ddp_worker(rank, world_size, port, out_path):
    os.environ.update(LOOPBACK, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    procs = runtime.Processes(*runtime.setup_distributed("cpu"))
    model, optimizer, images, tokens, labels, train_idx = problem()
    forward = DistributedDataParallel(model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    # the batches as train.train_epoch gets them: this process's part, normalised and augmented
    args = SimpleNamespace(batch_size=GLOBAL_BATCH, seed=SEED, no_augment=False, pixel_mean=0.5,
                           pixel_std=0.25, channels_last=False)
    run = SimpleNamespace(args=args, procs=procs, images=images, tokens=tokens, labels=labels,
                          collection=SimpleNamespace(splits={"train": train_idx}), lengths=None,
                          weights=None)
    for epoch in range(EPOCHS):
        batches, _ = batching.epoch_batches(run, epoch)
        for x, t, y in batches:
            train.train_step(model, forward, optimizer, scaler, nullcontext(), x, t, y, 0.0,
                             STEP_ARGS)
    if procs.main:
        torch.save(model.state_dict(), out_path)
    procs.finish()
    torch.distributed.destroy_process_group()


def test_two_processes_match_one_process_over_the_same_global_batches(tmp_path):
    world_size = 2
    mp.spawn(ddp_worker, args=(world_size, free_port(), str(tmp_path / "ddp.pt")),
             nprocs=world_size, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)

    # Reference in one process: the same global batches and augmentations; each process's half goes
    # through BatchNorm on its own (DDP without SyncBatchNorm normalises per process) and the
    # gradients are averaged.
    model, optimizer, images, tokens, labels, train_idx = problem()
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    steps = 0
    for epoch in range(EPOCHS):
        order = batching.epoch_order(train_idx, SEED, epoch, GLOBAL_BATCH)
        augment_rng = batching.epoch_generator(SEED, epoch, batching.AUGMENT)
        for x, t, y in batching.batches(images, tokens, labels, order, GLOBAL_BATCH):
            x = batching.model_input(x, 0.5, 0.25, augment_rng)
            optimizer.zero_grad(set_to_none=True)
            for part in torch.arange(GLOBAL_BATCH).chunk(world_size):
                (model(x[part], t[part], y[part])["loss"] / world_size).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), STEP_ARGS.clip_grad)
            optimizer.step()
            steps += 1
    assert steps == EPOCHS * (50 // GLOBAL_BATCH)
    # (BatchNorm's running statistics are rank 0's)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(ddp[name], parameter.detach(), rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(ddp["classifier.weight"], initial["classifier.weight"])
    assert not torch.equal(ddp["image_encoder.stem.0.weight"],
                           initial["image_encoder.stem.0.weight"])


def test_rank_slices_cover_the_global_batches_once():
    train_idx = np.arange(100, 150)
    whole = batching.epoch_order(train_idx, 3, 1, 8)
    parts = [batching.epoch_order(train_idx, 3, 1, 8, rank, 4) for rank in range(4)]
    assert len(whole) == 48 and all(len(p) == 12 for p in parts)
    # batch by batch, rank by rank
    interleaved = torch.stack([p.view(6, 2) for p in parts], 1).reshape(-1)
    assert torch.equal(interleaved, whole)
    assert len(set(whole.tolist())) == 48 and set(whole.tolist()) <= set(train_idx.tolist())


TINY = ["--demo-reports", "60", "--image-size", "32", "--batch-size", "8", "--cnn-width", "4",
        "--latent-dim", "8", "--text-dim", "16", "--text-layers", "1", "--max-len", "32",
        "--vocab-size", "200", "--bootstrap", "20", "--warmup-steps", "2",
        "--beta-warmup-epochs", "1", "--epochs", "2", "--log-every", "2", "--device", "cpu",
        "--allow-missing-labels"]


def torchrun(args, timeout=180, **env):
    """train.py under torchrun with 2 CPU processes. A hang (processes waiting for each other in a
    collective) fails the test; torchrun is then stopped with SIGTERM, which it passes on to its
    processes (they run in sessions of their own, so a SIGKILL of torchrun alone would leave them
    hanging)."""
    env = os.environ | LOOPBACK | {"OMP_NUM_THREADS": "1"} | env
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                "--nproc_per_node", "2", "train.py", *args],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        process.communicate(timeout=60)
        pytest.fail(f"torchrun train.py {' '.join(args)} did not finish in {timeout}s")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """vkd, 2 epochs, 2 processes: the reference run (it draws latent noise and dropout masks in
    each process)."""
    tmp = tmp_path_factory.mktemp("torchrun")
    result = torchrun([*TINY, "--data-dir", str(tmp / "data"), "--out", str(tmp / "whole")])
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, result


def assert_same_weights_and_log(a, b):
    state_a, state_b = (torch.load(run / "last.pt", weights_only=True) for run in (a, b))
    assert state_a["step"] == state_b["step"]
    for name, tensor in state_a["model"].items():
        assert torch.equal(tensor, state_b["model"][name]), name
    log_a, log_b = ([json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
                    for run in (a, b))
    for line_a, line_b in zip(log_a, log_b, strict=True):
        for key in ("epoch", "step", "loss", "kl", "beta", "lr", "val_macro_auroc"):
            assert line_a[key] == line_b[key], key


def test_torchrun_two_processes_end_to_end(uninterrupted):
    tmp, result = uninterrupted
    out = tmp / "whole"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]              # written by rank 0 only, once per epoch
    assert result.stdout.count("epoch   1 step") == 1 and result.stdout.count("test AUROC of") == 1
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    checkpoint = torch.load(out / "best.pt", weights_only=True)
    assert not any(name.startswith(("module.", "_orig_mod.")) for name in checkpoint["model"])
    assert 0 <= json.loads((out / "metrics.json").read_text())["macro_auroc"] <= 1
    assert len(checkpoint["rng"]) == 2 and not torch.equal(checkpoint["rng"][0]["torch"],
                                                           checkpoint["rng"][1]["torch"])


def test_torchrun_trains_every_method(uninterrupted):
    """`text` never uses the prior head: DDP must not wait for its gradients (it failed at the
    second step)."""
    tmp, _ = uninterrupted
    runs = tmp / "all"
    result = torchrun([*TINY, "--epochs", "1", "--method", "all", "--data-dir", str(tmp / "data"),
                       "--out", str(runs)])
    assert result.returncode == 0, result.stderr[-3000:]
    for method in ("image", "vkd", "text"):
        assert 0 <= json.loads(
            (runs / f"demo-{method}-seed0" / "metrics.json").read_text())["macro_auroc"] <= 1
    assert (runs / "demo-comparison.json").exists()
    untrained = json.loads(
        (runs / "demo-text-seed0" / "run.json").read_text())["untrained_parameters"]
    assert untrained and all(name.startswith("prior.") for name in untrained)


def test_torchrun_stop_after_then_resume_equals_the_uninterrupted_run(uninterrupted):
    """Every process gets back its own RNG states: `vkd` draws different latent noise in each."""
    tmp, _ = uninterrupted
    common = ["--data-dir", str(tmp / "data"), "--out", str(tmp / "stopped")]
    result = torchrun([*TINY, *common, "--stop-after", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "continue with: torchrun --standalone --nproc_per_node 2 train.py --out" in result.stdout
    result = torchrun([*common, "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights_and_log(tmp / "whole", tmp / "stopped")


@pytest.mark.parametrize("name, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_torchrun_a_stop_signal_in_one_process_stops_all_at_one_step_and_resumes_exactly(
        uninterrupted, name, status):
    """Ctrl-C or SIGTERM reaches only the last process, after global step 12 (epoch 2 has 9 steps
    of which 3 are done); the processes agree at the next --log-every step (4 of epoch 2), rank 0
    saves there, and all exit with the signal's status."""
    tmp, _ = uninterrupted
    out = tmp / f"stopped-{name}"
    steps = json.loads((tmp / "whole" / "log.jsonl").read_text().splitlines()[0])["step"]
    assert steps == 9
    result = torchrun([*TINY, "--data-dir", str(tmp / "data"), "--out", str(out)],
                      VKD_TEST_SIGNAL_AT_STEP=f"12:{name}")
    assert (result.returncode != 0
            and "interrupted at step 4/9 of epoch 2" in result.stdout), result.stderr[-3000:]
    # torchrun's report (with its own traceback) follows the processes' output; the first process to
    # leave exits with the signal's status (130, 143), and torchrun may then end the other one with
    # SIGTERM (last.pt was saved before either left)
    workers, launcher = result.stderr.split("failed (exitcode", 1)
    assert "Traceback" not in workers and launcher.startswith(f": {status})"), launcher[:300]
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert (checkpoint["epoch"] == 0 and checkpoint["step"] == 13
            and checkpoint["interrupted"]["steps_done"] == 4)
    assert len(checkpoint["interrupted"]["sums"]) == 2 and len(checkpoint["rng"]) == 2
    result = torchrun(["--out", str(out), "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights_and_log(tmp / "whole", out)
