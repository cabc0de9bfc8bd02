"""The teacher of `--method distill`: a trained `text` run's logits on every image, computed once
when the student's run starts (train.setup). A student can skip this file."""
from pathlib import Path

import numpy as np
import torch

import data
from model import VKD, VKDConfig
from vkd.reports import DataError
from vkd.runtime import read_checkpoint


def load_teacher(path, split_sha256, image_size, label_names, device):
    """The teacher's model (eval mode) and checkpoint; refused unless it is a `text` run on the
    student's split, image size and labels (the message names both of what differs)."""
    if path is None:
        raise DataError("--method distill needs --teacher RUN/best.pt, a text run on this split")
    checkpoint = read_checkpoint(path, device)
    method = checkpoint["model_config"].get("method")
    if method != "text":
        raise DataError(f"--teacher {path} is a {method} run; distill needs a text run "
                        f"(python train.py --method text)")
    if checkpoint["split_sha256"] != split_sha256:
        theirs = checkpoint["split_sha256"]
        raise DataError(f"--teacher {path} was trained on another split (sha256 {theirs}) than "
                        f"this run (sha256 {split_sha256}): use the same --data, --split-seed and "
                        f"--train-fraction")
    if checkpoint["config"]["image_size"] != image_size:
        raise DataError(f"--teacher {path} saw {checkpoint['config']['image_size']} px images, "
                        f"this run {image_size} px: give the same --image-size")
    if checkpoint["label_names"] != label_names:
        raise DataError(f"--teacher {path} predicts {checkpoint['label_names']}, this run "
                        f"{label_names}")
    with torch.random.fork_rng(devices=[]):       # building it draws no number of the student's
        model = VKD(VKDConfig(**checkpoint["model_config"])).to(device)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


@torch.no_grad()
def teacher_logits(path, collection, cache, split_sha256, image_size, device, batch_size=256):
    """(N, K) float32 on `device`: the teacher's logits s = f(mu_q(x, t)) on every sample, with the
    reports it was trained on (its own --report-control on the training reports), its tokenizer and
    its pixel statistics. The student reads s[i] where the other methods read report i."""
    model, checkpoint = load_teacher(path, split_sha256, image_size, collection.label_names,
                                     device)
    config = checkpoint["config"]
    tokenizer = data.load_tokenizer(Path(path).parent / "tokenizer.json")
    tokens = data.sample_tokens(collection, tokenizer, checkpoint["model_config"]["max_len"],
                                config.get("report_control", "none"), config["split_seed"])
    logits = []
    for start in range(0, len(tokens), batch_size):
        idx = np.arange(start, min(start + batch_size, len(tokens)))
        images = torch.as_tensor(np.asarray(cache[idx])).to(device)
        x = data.normalise(images, config["pixel_mean"], config["pixel_std"])
        h_x, _, _ = model.encode_prior(x)
        mu_q, _ = model.encode_posterior(h_x, torch.as_tensor(tokens[idx]).to(device))
        logits.append(model.classify(mu_q, h_x).float())                    # (B, K)
    return torch.cat(logits)
