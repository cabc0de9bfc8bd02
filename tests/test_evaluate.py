"""evaluate.py: checkpoints that would run code or are cut short are refused, and the image
baseline is evaluated at its prior mean whatever --samples says."""
import numpy as np
import pytest

import evaluate
from vkd.reports import DataError


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
                                                     "used: the image baseline never trains "
                                                     "logvar_p)")
    assert evaluate.prediction_name("vkd", 20) == "mean over 20 prior samples"
    assert (evaluate.prediction_name("image", 0) == evaluate.prediction_name("vkd", 0)
            == "prior mean f(mu_p(x))")
