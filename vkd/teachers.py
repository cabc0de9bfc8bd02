"""The teacher of `--method distill`: a trained `text` run's logits on every image, computed once
when the student's run starts (train.setup). A student can skip this file."""
from pathlib import Path

import numpy as np
import torch

import data
from model import VKD, VKDConfig
from vkd.download import file_sha256
from vkd.reports import DataError
from vkd.runtime import read_checkpoint


def load_teacher(args, split_sha256, label_names, device):
    """The teacher (--teacher) in eval mode and its checkpoint; refused unless it is a `text` run
    on the student's collection (the same data options), split, image size and labels; the
    message names what differs. The student takes the teacher's --report-control, saved in its
    config, so that a student of a control teacher is a control too."""
    path = args.teacher
    if path is None:
        raise DataError("--method distill needs --teacher RUN/best.pt, a text run on this split")
    checkpoint = read_checkpoint(path, device)
    digest = file_sha256(path)          # saved in the student's config: a resume checks it
    if getattr(args, "teacher_sha256", digest) != digest:
        raise DataError(f"--teacher {path} is not the teacher this run started with (sha256 "
                        f"{digest}, the run's {args.teacher_sha256}); resume with that file, or "
                        f"start a new --out")
    args.teacher_sha256 = digest
    config, method = checkpoint["config"], checkpoint["model_config"].get("method")
    if method != "text":
        raise DataError(f"--teacher {path} is a {method} run; distill needs a text run "
                        f"(python train.py --method text)")
    if checkpoint["split_sha256"] != split_sha256:
        theirs = checkpoint["split_sha256"]
        raise DataError(f"--teacher {path} was trained on another split (sha256 {theirs}) than "
                        f"this run (sha256 {split_sha256}): use the same --data, --split-seed and "
                        f"--train-fraction")
    other = {name: (config.get(name), getattr(args, name))
             for name in (*data.DATA_OPTIONS, "image_size")
             if name != "data_dir" and config.get(name) != getattr(args, name)}
    if other or checkpoint["label_names"] != label_names:
        raise DataError(f"--teacher {path} was trained on other data (option: (teacher, this "
                        f"run)) {other or {'labels': (checkpoint['label_names'], label_names)}}")
    if args.report_control not in ("none", config["report_control"]):
        raise DataError(f"--report-control {args.report_control}: distill's control is its "
                        f"teacher's ({config['report_control']})")
    args.report_control = config["report_control"]
    try:
        with torch.random.fork_rng(devices=[]):   # building it draws no number of the student's
            model = VKD(VKDConfig(**checkpoint["model_config"])).to(device)
        model.load_state_dict(checkpoint["model"])
    except (TypeError, RuntimeError, AssertionError) as error:      # another version's model
        raise DataError(f"--teacher {path} was refused: its model does not fit this model.py "
                        f"({str(error).splitlines()[0][:200]})") from error
    return model.eval(), checkpoint


@torch.no_grad()
def teacher_logits(args, collection, cache, split_sha256, device, batch_size=256):
    """(N, K) float32 on `device`: the teacher's logits s = f(mu_q(x, t)) on every sample, with the
    reports it was trained on (its own --report-control on the training reports), its tokenizer
    and its pixel statistics. The student reads s[i] where the other methods read report i."""
    model, checkpoint = load_teacher(args, split_sha256, collection.label_names, device)
    config = checkpoint["config"]
    tokenizer = data.load_tokenizer(Path(args.teacher).parent / "tokenizer.json")
    tokens = data.sample_tokens(collection, tokenizer, checkpoint["model_config"]["max_len"],
                                config["report_control"], config["split_seed"])
    logits = []
    for start in range(0, len(tokens), batch_size):
        idx = np.arange(start, min(start + batch_size, len(tokens)))
        images = torch.as_tensor(np.asarray(cache[idx])).to(device)
        x = data.normalise(images, config["pixel_mean"], config["pixel_std"])
        h_x, _, _ = model.encode_prior(x)
        mu_q, _ = model.encode_posterior(h_x, torch.as_tensor(tokens[idx]).to(device))
        logits.append(model.classify(mu_q, h_x).float())                    # (B, K)
    return torch.cat(logits)
