"""Training: schedules, an end-to-end tiny demo run with evaluate.py, exact resume, seeded
determinism."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import train
from model import VKD, VKDConfig
from vkd import batching, options, runtime

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--demo-reports", "60", "--image-size", "32", "--batch-size", "16", "--cnn-width", "4",
        "--latent-dim", "8", "--text-dim", "16", "--max-len", "32", "--vocab-size", "200",
        "--bootstrap", "50", "--warmup-steps", "2", "--beta-warmup-epochs", "1",
        "--allow-missing-labels"]


def test_lr_schedule():
    assert train.lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert train.lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert train.lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert train.lr_at(55, 100, 1.0, 10) == pytest.approx(0.5)
    assert train.lr_at(100, 100, 1.0, 10) == pytest.approx(0.0)


def test_beta_schedule_anneals_from_zero():
    assert train.beta_at(0, 0.5, 10) == 0.0
    assert train.beta_at(5, 0.5, 10) == pytest.approx(0.25)
    assert train.beta_at(10, 0.5, 10) == pytest.approx(0.5)
    assert train.beta_at(1000, 0.5, 10) == pytest.approx(0.5)
    assert train.beta_at(0, 0.5, 0) == 0.5


def test_cyclical_beta_restarts_the_ramp_every_cycle():
    """--beta-cycle-epochs: with cycle_steps = P > 0 the ramp restarts every P steps (the authors'
    cyclical annealing); with 0 it is the single ramp."""
    beta, warmup, period = 0.4, 10, 25
    for cycle in range(3):
        start = cycle * period
        assert train.beta_at(start, beta, warmup, cycle_steps=period) == 0.0
        assert train.beta_at(start + 5, beta, warmup, cycle_steps=period) == pytest.approx(0.2)
        assert train.beta_at(start + warmup, beta, warmup,
                             cycle_steps=period) == pytest.approx(beta)
        assert train.beta_at(start + period - 1, beta, warmup,
                             cycle_steps=period) == pytest.approx(beta)
    assert train.beta_at(1000, beta, warmup, cycle_steps=0) == pytest.approx(beta)  # off: one ramp
    args = train.get_args(["--beta", "0.4", "--beta-warmup-epochs", "1", "--beta-cycle-epochs", "2",
                           "--epochs", "6"])
    config = options.model_config(args, 14, 50)
    *_, betas = train.build_model(config, args, torch.device("cpu"), "off", steps_per_epoch=10)
    # 3 cycles of 2 epochs
    assert betas.tolist() == pytest.approx([0.4 * min(1, (s % 20) / 10) for s in range(60)])


def test_augment_keeps_shape_and_is_reproducible():
    x = torch.rand(4, 1, 16, 16)
    a = batching.augment(x, torch.Generator().manual_seed(0))
    b = batching.augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)


def test_augment_of_a_rank_slice_is_that_slice_of_the_global_batch_augmented():
    x = torch.rand(8, 1, 16, 16)
    whole = batching.augment(x, torch.Generator().manual_seed(0))
    parts = [batching.augment(x[4 * r:4 * (r + 1)], torch.Generator().manual_seed(0), r, 2)
             for r in range(2)]
    torch.testing.assert_close(torch.cat(parts), whole)
    assert not torch.equal(parts[0], parts[1])


def test_shuffling_and_augmentation_draw_from_separate_streams():
    seeds = {(seed, epoch, stream): batching.epoch_generator(seed, epoch, stream).initial_seed()
             for seed in range(3) for epoch in range(100)
             for stream in (batching.SHUFFLE, batching.AUGMENT)}
    assert len(set(seeds.values())) == len(seeds)  # no two streams, epochs or seeds coincide
    shuffle, augment = (batching.epoch_generator(0, 1, stream)
                        for stream in (batching.SHUFFLE, batching.AUGMENT))
    assert not torch.equal(torch.rand(8, generator=shuffle), torch.rand(8, generator=augment))
    train_idx = np.arange(10, 50)
    expected = torch.from_numpy(train_idx)[
        torch.randperm(40, generator=batching.epoch_generator(0, 1, batching.SHUFFLE))]
    assert torch.equal(batching.epoch_order(train_idx, 0, 1, 8), expected)


def test_group_by_length_batches_similar_reports_and_cuts_only_padding():
    rng = np.random.default_rng(0)
    lengths = torch.from_numpy(rng.integers(1, 100, 400))
    tokens = torch.zeros(400, 112, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.arange(1, n + 1)
    train_idx = np.arange(10, 400)
    plain = batching.epoch_order(train_idx, 0, 1, 16)
    grouped = batching.epoch_order(train_idx, 0, 1, 16, lengths=lengths)
    assert torch.equal(grouped.sort().values, plain.sort().values)  # the same samples, once each
    # seeded
    assert torch.equal(batching.epoch_order(train_idx, 0, 1, 16, lengths=lengths), grouped)
    assert not torch.equal(batching.epoch_order(train_idx, 0, 2, 16, lengths=lengths), grouped)

    def spread(order):
        # mean over batches of (longest - shortest report)
        per_batch = lengths[order].view(-1, 16)
        return (per_batch.max(1).values - per_batch.min(1).values).float().mean()
    assert spread(grouped) < spread(plain) / 4
    order = torch.from_numpy(train_idx[:384])  # 24 batches, windows of 2 batches
    small = batching.group_by_length(order, lengths, 16, torch.Generator().manual_seed(0), window=2)
    window_of = {int(i): k // 32 for k, i in enumerate(order)}
    assert torch.equal(small.sort().values, order.sort().values)
    # never mixed
    assert all(len({window_of[int(i)] for i in batch}) == 1 for batch in small.view(-1, 16))
    # batches shuffled
    assert not all(window_of[int(b[0])] == k // 2 for k, b in enumerate(small.view(-1, 16)))
    # two processes take the halves of the same global batches
    halves = [batching.epoch_order(train_idx, 0, 1, 16, rank, 2, lengths) for rank in range(2)]
    assert torch.equal(torch.stack([h.view(-1, 8) for h in halves], 1).reshape(-1), grouped)
    labels = torch.rand(400, 2)
    images = torch.zeros(400, 4, 4, dtype=torch.uint8)
    cut = list(batching.batches(images, tokens, labels, grouped, 16, lengths))
    full = list(batching.batches(images, tokens, labels, grouped, 16))
    # cut to the longest, rounded up to 16
    for (_, t_cut, y_cut), (_, t_full, y_full) in zip(cut, full):
        longest = int((t_full != 0).sum(1).max())
        assert t_cut.shape[1] % 16 == 0 and longest <= t_cut.shape[1] < longest + 16
        assert (torch.equal(t_full[:, :t_cut.shape[1]], t_cut)
                and (t_full[:, t_cut.shape[1]:] == 0).all())
        assert torch.equal(y_cut, y_full)
    cache = images.numpy()
    streamed = [t.clone() for _, t, _ in batching.streamed_batches(cache, tokens, labels, grouped,
                                                                   16, lengths)]
    assert all(torch.equal(a, b) for a, b in zip(streamed, [t for _, t, _ in cut]))


def test_oversampling_draws_rare_labels_more_often_the_same_in_every_process():
    labels = np.zeros((110, 3), np.float32)
    labels[10:50, 0] = 1                                    # 40 positive training images: common
    labels[50:70, 1] = 1                                    # 20: the median label
    # rare: images 70-73, and image 10 beside its common label, 5 positive training images in all
    labels[70:74, 2] = 1
    labels[10, 2] = 1
    labels[74, 2] = np.nan                                  # not observed: counts as negative
    labels[:10] = 1                                         # not training images: never counted
    train_idx = np.arange(10, 110)
    weights = batching.draw_weights(labels, train_idx)
    expected = np.ones(100)
    # median(40, 20, 5) / 5, for the rarest positive label
    expected[[0, 60, 61, 62, 63]] = 20 / 5
    np.testing.assert_allclose(weights.numpy(), expected)
    assert weights.dtype == torch.float64                   # whatever the labels' dtype
    assert torch.equal(batching.draw_weights(np.zeros((5, 2)), np.arange(5)),
                       torch.ones(5, dtype=torch.float64))
    order = batching.epoch_order(train_idx, 0, 1, 16, weights=weights)
    assert len(order) == 96 and set(order.tolist()) <= set(train_idx.tolist())
    assert torch.equal(batching.epoch_order(train_idx, 0, 1, 16, weights=weights), order)  # seeded
    halves = [batching.epoch_order(train_idx, 0, 1, 16, rank, 2, weights=weights).view(6, 8)
              for rank in (0, 1)]
    # 2 processes see one process's batches
    assert torch.equal(torch.cat(halves, 1).reshape(-1), order)
    rare = [10, 70, 71, 72, 73]
    counts = [np.isin(batching.epoch_order(train_idx, 0, epoch, 16, weights=w).numpy(), rare).sum()
              for epoch in range(50) for w in (weights, None)]
    drawn, plain = np.mean(counts[0::2]), np.mean(counts[1::2])
    assert max(counts[1::2]) <= 5 and plain > 4  # a permutation: once each, less the 4 cut
    assert abs(drawn - 96 * 20 / 115) < 2        # 5 images of weight 4 in a sum of 115


def test_parameters_no_loss_reaches_are_frozen_without_side_effects():
    """`text` never reads the prior head: under DDP its parameters would wait for gradients that
    never come."""
    t, y = torch.randint(1, 50, (2, 6)), torch.ones(2, 3)
    step_args = train.get_args(["--latent-samples", "1", "--image-size", "32"])
    for method, expected in (("vkd", []), ("image", []),
                             ("text", ["prior.net.0.weight", "prior.net.0.bias",
                                       "prior.net.2.weight", "prior.net.2.bias"])):
        torch.manual_seed(0)
        model = VKD(VKDConfig(method=method, num_labels=3, cnn_width=4, latent_dim=8, vocab_size=50,
                              text_dim=16))
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        rng = torch.get_rng_state()
        assert runtime.freeze_unreached(model, t, y, step_args) == expected, method
        assert [name for name, p in model.named_parameters() if not p.requires_grad] == expected
        # the run's draws unchanged
        assert torch.equal(torch.get_rng_state(), rng) and model.training
        # BatchNorm statistics too
        assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
        assert all(p.grad is None for p in model.parameters())


def test_each_process_gets_its_own_saved_state_back():
    states = [{"torch": torch.tensor([rank])} for rank in range(2)]
    cpu = torch.device("cpu")
    assert runtime.Processes(1, 2, cpu).own(states) is states[1]
    with pytest.raises(train.data.DataError,
                       match=r"written by 2 process\(es\): resume it with as many"):
        runtime.Processes(0, 1, cpu).own(states)


def test_streamed_batches_equal_preloaded_batches():
    # stands in for the memmap
    cache = np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8)
    tokens, labels = torch.arange(40 * 3).view(40, 3), torch.rand(40, 2)
    order = batching.epoch_order(np.arange(5, 40), 0, 0, 8)
    preloaded = list(batching.batches(batching.place_images(cache, torch.device("cpu"), "yes"),
                                      tokens, labels, order, 8))
    streamed = [tuple(part.clone() for part in batch)  # the staging buffers are reused after a step
                for batch in batching.streamed_batches(cache, tokens, labels, order, 8)]
    assert len(preloaded) == len(streamed) == 4
    for a, b in zip(preloaded, streamed):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert batching.place_images(cache, torch.device("cpu"), "no") is cache


def test_pixel_statistics_chunked_agrees_with_one_pass():
    cache = np.random.default_rng(0).integers(0, 256, (30, 16, 16), dtype=np.uint8)
    indices = np.arange(3, 30, 2)
    one_pass = batching.pixel_statistics(cache, indices)
    chunked = batching.pixel_statistics(cache, indices, chunk=4, one_pass_bytes=0)
    pixels = cache[indices].astype(np.float64) / 255
    assert one_pass == pytest.approx((pixels.mean(), pixels.std()), rel=1e-6)
    assert chunked == pytest.approx((pixels.mean(), pixels.std()), rel=1e-9)


@pytest.mark.parametrize("one_pass_bytes", [2**30, 0])
def test_pixel_statistics_of_flat_images_normalise_to_finite_values(one_pass_bytes):
    cache = np.full((6, 8, 8), 128, dtype=np.uint8)  # placeholder images: one grey, std 0
    mean, std = batching.pixel_statistics(cache, np.arange(6), chunk=4,
                                          one_pass_bytes=one_pass_bytes)
    assert mean == pytest.approx(128 / 255) and std == 1.0
    x = data.normalise(torch.from_numpy(cache[:2]), mean, std)
    assert torch.isfinite(x).all() and x.abs().max() < 1e-6


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    args = train.get_args(TINY + ["--data-dir", str(tmp / "data"), "--out", str(tmp / "run"),
                                  "--epochs", "3"])
    metrics = train.train(args)
    return tmp, metrics


def test_end_to_end_run_writes_everything_and_evaluate_agrees(uninterrupted):
    tmp, metrics = uninterrupted
    run = tmp / "run"
    for name in ("run.json", "splits.json", "tokenizer.json", "log.jsonl", "last.pt", "best.pt",
                 "metrics.json"):
        assert (run / name).exists(), name
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert all(r["kl"] > 0 and r["bce_prior"] > 0 and r["beta"] > 0 for r in log)
    assert json.loads((run / "run.json").read_text())["config"]["method"] == "vkd"
    splits = json.loads((run / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["test"])
    assert 0 <= metrics["macro_auroc"] <= 1
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    assert checkpoint["val_macro_auroc"] == max(r["val_macro_auroc"] for r in log)
    result = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(run / "best.pt"),
                             "--json", "--bootstrap", "50"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    again = json.loads(result.stdout)
    assert again["macro_auroc"] == pytest.approx(metrics["macro_auroc"], abs=1e-12)
    assert again["per_label"] == metrics["per_label"]


def test_learning_rate_follows_the_schedule_from_the_first_step(uninterrupted):
    tmp, _ = uninterrupted
    log = [json.loads(line) for line in (tmp / "run" / "log.jsonl").read_text().splitlines()]
    steps_per_epoch, total = log[0]["step"], log[-1]["step"]
    # the logged lr is the one the epoch's last step used
    for record in log:
        assert record["lr"] == pytest.approx(train.lr_at(record["step"] - 1, total, 2e-3, 2))
    assert steps_per_epoch * 3 == total


def test_resume_continues_exactly(uninterrupted):
    tmp, metrics = uninterrupted
    common = TINY + ["--data-dir", str(tmp / "data"), "--out", str(tmp / "resumed")]
    assert train.train(train.get_args(common + ["--epochs", "3", "--stop-after", "1"])) is None
    torch.manual_seed(12345)  # disturb the global RNG: resume must restore its own
    # no --epochs: the saved 3 are kept
    resumed = train.train(train.get_args(common + ["--resume"]))
    a = torch.load(tmp / "run" / "last.pt", weights_only=True)
    b = torch.load(tmp / "resumed" / "last.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert resumed["macro_auroc"] == metrics["macro_auroc"]
    assert resumed["per_label"] == metrics["per_label"]
    log = [json.loads(line) for line in (tmp / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]


def test_streaming_from_the_memmap_trains_exactly_as_preloading(uninterrupted, tmp_path):
    tmp, metrics = uninterrupted
    args = train.get_args(TINY + ["--data-dir", str(tmp / "data"),
                                  "--out", str(tmp_path / "streamed"), "--epochs", "3",
                                  "--preload", "no"])
    streamed = train.train(args)
    assert json.loads((tmp_path / "streamed" / "run.json").read_text())["preloaded"] is False
    a = torch.load(tmp / "run" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "streamed" / "last.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert streamed["per_label"] == metrics["per_label"]


def test_image_and_text_methods_train(tmp_path, uninterrupted, capsys):
    tmp, _ = uninterrupted
    for method in ("image", "text"):
        args = train.get_args(TINY + ["--data-dir", str(tmp / "data"),
                                      "--out", str(tmp_path / method),
                                      "--epochs", "1", "--method", method])
        metrics = train.train(args)
        assert metrics["method"] == method and 0 <= metrics["macro_auroc"] <= 1
        # no KL term to weigh
        assert json.loads((tmp_path / method / "log.jsonl").read_text())["beta"] is None
        assert "| beta - |" in capsys.readouterr().out
    result = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(tmp / "run" / "best.pt"),
                             "--compare", str(tmp_path / "image" / "best.pt"),
                             "--bootstrap", "50", "--json"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    compared = json.loads(result.stdout)
    a = json.loads((tmp / "run" / "metrics.json").read_text())
    b = json.loads((tmp_path / "image" / "metrics.json").read_text())
    assert compared["runs"][0]["macro_auroc"] == pytest.approx(a["macro_auroc"])
    assert compared["runs"][1]["macro_auroc"] == pytest.approx(b["macro_auroc"])
    difference = compared["methods"][1]["difference"]["macro_auroc"]
    assert difference["value"] == pytest.approx(b["macro_auroc"] - a["macro_auroc"])
    lo, hi = difference["ci95"]
    assert lo <= hi and 0 <= difference["p"] <= 1


def test_bad_options_give_clear_errors(tmp_path):
    with pytest.raises(train.data.DataError, match="does not exist"):
        train.train(train.get_args(["--out", str(tmp_path / "nothing"), "--resume"]))
    with pytest.raises(train.data.DataError, match="--amp fp16 needs a CUDA device"):
        train.train(train.get_args(TINY + ["--data-dir", str(tmp_path),
                                           "--out", str(tmp_path / "r"),
                                           "--device", "cpu", "--amp", "fp16"]))


def test_run_json_records_what_a_rerun_needs(uninterrupted):
    tmp, metrics = uninterrupted
    record = json.loads((tmp / "run" / "run.json").read_text())
    environment = record["environment"]
    for key in ("git_commit", "git_uncommitted_changes", "python", "torch", "torchvision",
                "tokenizers", "numpy", "pillow", "device", "cpu", "torch_git_version",
                "cpu_capability", "cuda", "cudnn", "tf32_matmul", "tf32_cudnn",
                "cudnn_deterministic", "cudnn_benchmark", "deterministic_algorithms"):
        assert key in environment, key
    # a sum split over more threads is added in another order: same command, same numbers needs
    # the same counts
    assert environment["threads"] == torch.get_num_threads()
    assert environment["interop_threads"] == torch.get_num_interop_threads()
    assert (record["split_sha256"]
            == torch.load(tmp / "run" / "best.pt", weights_only=True)["split_sha256"])
    assert record["config"]["seed"] == 0 and record["config"]["pixel_mean"] > 0
    assert (record["wall_s"] == metrics["wall_s"]
            and record["metrics"]["macro_auroc"] == metrics["macro_auroc"])
    # the first step's time (compilation included with --compile), and the time to reach it
    assert 0 < record["first_step_s"] <= record["time_to_first_step_s"] < record["wall_s"]


def test_a_report_lost_to_undecodable_images_leaves_the_split_the_run_saves(tmp_path):
    """Every image of one training report is broken: splits.json, the checkpoint's split hash and
    evaluate.py must all see the split that training used (without that report), not the one read
    before decoding."""
    import data
    collection = data.prepare("demo", data_dir=str(tmp_path / "data"), demo_reports=60)
    lost = collection.split_ids["train"][0]
    report = next(i for i, r in enumerate(collection.reports) if r.id == lost)
    for i in np.flatnonzero(collection.report_index == report):
        Path(collection.image_paths[i]).write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    run = tmp_path / "run"
    train.train(train.get_args(TINY + ["--data-dir", str(tmp_path / "data"), "--out", str(run),
                                       "--epochs", "1"]))
    saved = json.loads((run / "splits.json").read_text())
    assert lost not in saved["train"] and saved["train"]
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    assert (checkpoint["split_sha256"]
            == data.split_hash({s: saved[s] for s in ("train", "val", "test")}))
    result = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(run / "best.pt"),
                             "--json", "--bootstrap", "20"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_preset_sets_defaults_that_explicit_flags_override():
    """--preset tiny is a plain dict of defaults (train.PRESETS); a flag on the command line wins,
    and the run folder (and a recipe's) carries the preset's name so that it never mixes with a
    full run's."""
    args = train.get_args(["--preset", "tiny"])
    assert all(getattr(args, name) == value for name, value in train.PRESETS["tiny"].items())
    assert args.out == "runs/demo-tiny-vkd-seed0"
    args = train.get_args(["--preset", "tiny", "--epochs", "2", "--image-size", "48",
                           "--method", "image"])
    assert ((args.epochs, args.image_size, args.demo_reports)
            == (2, 48, train.PRESETS["tiny"]["demo_reports"]))
    assert args.out == "runs/demo-tiny-image-seed0"
    plain = train.get_args([])
    assert ((plain.image_size, plain.demo_reports, plain.epochs, plain.out)
            == (128, 1500, 12, "runs/demo-vkd-seed0"))


def test_model_options_default_to_the_model_config():
    """The model's defaults are defined once, in VKDConfig; the command line takes them from
    there."""
    args, config = train.get_args([]), VKDConfig()
    for name in ("latent_dim", "backbone", "cnn_width", "vocab_size", "max_len", "text_dim",
                 "text_layers", "dropout"):
        assert getattr(args, name) == getattr(config, name), name


def test_help_groups_every_option_and_shows_its_default(capsys):
    parser = options.build_parser(train.PRESETS)
    titles = [group.title for group in parser._action_groups if group._group_actions]
    assert titles[-8:] == ["method", "the other ways to use the report (model.py)",
                           "the authors' design choices (model.py; all on: --preset authors)",
                           "model", "optimisation", "data", "speed", "run management"]
    flags = [action for action in parser._actions if action.option_strings != ["-h", "--help"]]
    assert len(flags) > 40
    assert [action.option_strings[0] for action in flags if "(default:" not in action.help] == []
    with pytest.raises(SystemExit):
        train.get_args(["--help"])
    assert "run management:" in capsys.readouterr().out
