"""evaluate.py: checkpoints that would run code or are cut short are refused, and the image
baseline is evaluated at its prior mean whatever --samples says."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from vkd.reports import DataError
from vkd.runtime import CHECKPOINT_KEYS

REPO = Path(__file__).resolve().parent.parent


class _Payload:
    """Unpickling this would create a file: a stand-in for code hidden in a shared checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused(tmp_path):
    import pickle

    import torch

    from evaluate import load_checkpoint
    marker = tmp_path / "payload-ran"
    torch.save({"model": {}, "payload": _Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="evil.pt was refused: not a whole checkpoint") as refused:
        load_checkpoint(tmp_path / "evil.pt")
    assert isinstance(refused.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()


def test_a_truncated_checkpoint_gives_a_clear_error(tmp_path):
    import torch

    from evaluate import load_checkpoint
    torch.save({"model": {}, "config": {"seed": 0}}, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:200])
    with pytest.raises(DataError, match="cut.pt was refused"):
        load_checkpoint(tmp_path / "cut.pt")


def damaged(kind, path):
    """A file that is not a whole checkpoint of this train.py, of the given kind."""
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save({key: 0 for key in CHECKPOINT_KEYS}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "not a checkpoint":
        path.write_text("epoch,loss\n1,0.5\n")
    elif kind == "another program's":
        torch.save({"state_dict": {"weight": torch.zeros(2)}, "epoch": 3}, path)
    else:                                             # another version of this project's model
        checkpoint = {key: 0 for key in CHECKPOINT_KEYS}
        torch.save(checkpoint | {"model": {}, "model_config": {"fusion": "poe"}}, path)
    return path


DAMAGED = ["empty", "truncated", "not a checkpoint", "another program's", "another version's"]


def run_script(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("kind", DAMAGED)
def test_a_damaged_checkpoint_is_refused_by_evaluate_with_an_error_and_left_as_it_is(
        tmp_path, kind):
    path = damaged(kind, tmp_path / "best.pt")
    before = path.read_bytes()
    with pytest.raises(DataError, match=rf"{path}"):
        evaluate.load_checkpoint(path)
    result = run_script("evaluate.py", "--ckpt", path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.startswith(f"error: {path}")
    assert path.read_bytes() == before


@pytest.mark.parametrize("kind", ["empty", "another program's"])
def test_a_damaged_checkpoint_is_refused_by_compare_and_by_resume(tmp_path, kind):
    (tmp_path / "run").mkdir()
    path = damaged(kind, tmp_path / "run" / "last.pt")
    before = path.read_bytes()
    compared = run_script("evaluate.py", "--compare", path, path)
    resumed = run_script("train.py", "--out", tmp_path / "run", "--resume")
    for result in (compared, resumed):
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert f"error: {path} " in result.stderr
    assert path.read_bytes() == before


# ------------------------------------------------------------------------------------ prior samples

def test_samples_on_an_image_checkpoint_use_the_prior_mean_and_say_so():
    """The image baseline's logvar_p is untrained: --samples must not draw from it (but does for
    vkd)."""
    import torch

    from model import VKD, VKDConfig
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16), dtype=np.uint8)
    config = {"pixel_mean": 0.5, "pixel_std": 0.25}
    for method in ("image", "vkd"):
        torch.manual_seed(0)
        model = VKD(VKDConfig(method=method, cnn_width=4, latent_dim=8, text_dim=16, max_len=8,
                              vocab_size=50))
        mean, _ = evaluate.predict(model, images, None, np.arange(6), config, "cpu", num_samples=0)
        sampled, std = evaluate.predict(model, images, None, np.arange(6), config, "cpu",
                                        num_samples=20)
        if method == "image":
            assert np.array_equal(sampled, mean) and not std.any()
        else:
            assert not np.allclose(sampled, mean) and std.all()
    assert evaluate.prediction_name("image", 20) == ("prior mean f(mu_p(x)) (--samples 20 not "
                                                     "used: image never trains logvar_p)")
    assert evaluate.prediction_name("vkd", 20) == "mean over 20 prior samples"
    assert (evaluate.prediction_name("image", 0) == evaluate.prediction_name("vkd", 0)
            == "prior mean f(mu_p(x))")
