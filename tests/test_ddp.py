"""DistributedDataParallel on CPU: 2 processes (gloo on 127.0.0.1) train exactly as one process does over the
same global batches, and `torchrun train.py` runs end to end with rank 0 alone writing."""
import json
import os
import socket
import subprocess
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import train
from model import VKD, VKDConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH, EPOCHS, SEED = 16, 2, 0
STEP_ARGS = SimpleNamespace(prior_weight=1.0, latent_samples=1, clip_grad=1.0)
LOOPBACK = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def problem():
    """Model (same initial weights in every process), optimizer and a small cached dataset (N=50, 16 px).
    `image` method: its loss has no random draw besides augmentation, whose draws every process shares."""
    torch.manual_seed(SEED)
    model = VKD(VKDConfig(method="image", cnn_width=4, latent_dim=8, num_labels=5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (50, 16, 16), dtype=torch.uint8, generator=generator)     # (N, S, S)
    tokens = torch.zeros(50, 4, dtype=torch.long)
    labels = (torch.rand(50, 5, generator=generator) > 0.5).float()
    return model, optimizer, images, tokens, labels, np.arange(50)


def ddp_worker(rank, world_size, port, out_path):
    os.environ.update(LOOPBACK, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    rank, world_size, device = train.setup_distributed("cpu")
    model, optimizer, images, tokens, labels, train_idx = problem()
    forward = DistributedDataParallel(model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for epoch in range(EPOCHS):
        order = train.epoch_order(train_idx, SEED, epoch, GLOBAL_BATCH, rank, world_size)
        augment_rng = torch.Generator().manual_seed(epoch)
        for x, t, y in train.batches(images, tokens, labels, order, GLOBAL_BATCH // world_size):
            x = train.model_input(x, 0.5, 0.25, augment_rng, rank, world_size)
            train.train_step(model, forward, optimizer, scaler, nullcontext(), x, t, y, 0.0, STEP_ARGS)
    if rank == 0:
        torch.save(model.state_dict(), out_path)
    train.finish_distributed(world_size)
    torch.distributed.destroy_process_group()


def test_two_processes_match_one_process_over_the_same_global_batches(tmp_path):
    world_size = 2
    mp.spawn(ddp_worker, args=(world_size, free_port(), str(tmp_path / "ddp.pt")), nprocs=world_size, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)

    # Reference in one process: the same global batches and augmentations; each process's half goes through
    # BatchNorm on its own (DDP without SyncBatchNorm normalises per process) and the gradients are averaged.
    model, optimizer, images, tokens, labels, train_idx = problem()
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    steps = 0
    for epoch in range(EPOCHS):
        order = train.epoch_order(train_idx, SEED, epoch, GLOBAL_BATCH)
        augment_rng = torch.Generator().manual_seed(epoch)
        for x, t, y in train.batches(images, tokens, labels, order, GLOBAL_BATCH):
            x = train.model_input(x, 0.5, 0.25, augment_rng)
            optimizer.zero_grad(set_to_none=True)
            for part in torch.arange(GLOBAL_BATCH).chunk(world_size):
                (model(x[part], t[part], y[part])["loss"] / world_size).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), STEP_ARGS.clip_grad)
            optimizer.step()
            steps += 1
    assert steps == EPOCHS * (50 // GLOBAL_BATCH)
    for name, parameter in model.named_parameters():           # (BatchNorm's running statistics are rank 0's)
        torch.testing.assert_close(ddp[name], parameter.detach(), rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(ddp["classifier.weight"], initial["classifier.weight"])
    assert not torch.equal(ddp["image_encoder.stem.0.weight"], initial["image_encoder.stem.0.weight"])


def test_rank_slices_cover_the_global_batches_once():
    train_idx = np.arange(100, 150)
    whole = train.epoch_order(train_idx, 3, 1, 8)
    parts = [train.epoch_order(train_idx, 3, 1, 8, rank, 4) for rank in range(4)]
    assert len(whole) == 48 and all(len(p) == 12 for p in parts)
    interleaved = torch.stack([p.view(6, 2) for p in parts], 1).reshape(-1)   # batch by batch, rank by rank
    assert torch.equal(interleaved, whole)
    assert len(set(whole.tolist())) == 48 and set(whole.tolist()) <= set(train_idx.tolist())


def test_torchrun_two_processes_end_to_end(tmp_path):
    tiny = ["--demo-reports", "60", "--image-size", "32", "--batch-size", "16", "--cnn-width", "4", "--latent-dim",
            "8", "--text-dim", "16", "--max-len", "32", "--vocab-size", "200", "--bootstrap", "20", "--warmup-steps",
            "2", "--beta-warmup-epochs", "1", "--epochs", "2", "--device", "cpu", "--allow-missing-labels"]
    out = tmp_path / "run"
    env = os.environ | LOOPBACK | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "train.py", *tiny, "--data-dir", str(tmp_path / "data"), "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]                       # written by rank 0 only, once per epoch
    assert result.stdout.count("epoch   1 step") == 1 and result.stdout.count("test AUROC of") == 1
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    checkpoint = torch.load(out / "best.pt", weights_only=True)
    assert not any(name.startswith(("module.", "_orig_mod.")) for name in checkpoint["model"])
    assert 0 <= json.loads((out / "metrics.json").read_text())["macro_auroc"] <= 1
