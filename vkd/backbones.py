"""Pretrained image backbones for VKD's prior and posterior: resnet18 and densenet121 from
torchvision, with torchvision's ImageNet weights or a local state_dict (`--backbone`,
`--backbone-weights`). model.ImageEncoder, the compact CNN, is the default; this file is only
needed for a torchvision backbone.
"""
import re
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from vkd.reports import DataError


class TorchvisionEncoder(nn.Module):
    """resnet18 / densenet121 from torchvision for gray radiographs: (B, 1, H, W) -> (B, out_dim).

    weights: None (random init), "imagenet" (torchvision's IMAGENET1K_V1 through its weights API:
    read from torch.hub.get_dir()/checkpoints/, downloaded there once), or the path of a local
    torchvision state_dict. The modules are the same for all three, so a checkpoint loads into
    VKD(cfg) with no weights (no download).

    Gray input: the network keeps its 3-channel first conv and sees x replicated to RGB, which is
    exactly a 1-channel conv with the weights summed over RGB. ImageNet weights expect
    u_c = (p - mean_c) / std_c for a pixel p in [0, 1] (the same p in R, G, B for a gray image);
    the model gets x = (p - m) / s (data.normalise, m, s the training split's pixel mean and std,
    which the model is not given), so

        u_c = (s x + m - mean_c) / std_c.

    On loading ImageNet weights, the first conv's input channel c is divided by std_c: the
    channel-dependent part of u_c, folded in exactly. What remains, a factor s shared by all
    channels and a constant sum_c W_c (m - mean_c) / std_c per output channel, is removed by the
    BatchNorm right after the bias-free first conv (resnet bn1, densenet norm0) as it trains on
    batch statistics: BN(a h + b) = BN(h) for a > 0. Not removed: the pixels within reach of the
    first conv's zero padding (0 there means p = m, not mean_c), BN's eps, and the ImageNet running
    statistics until fine-tuning has updated them. A local file is loaded as it is (x replicated),
    as its expected normalisation is unknown.
    """

    IMAGENET = "imagenet"

    def __init__(self, name, weights=None):
        super().__init__()
        net = getattr(torchvision.models, name)(weights=None)
        if weights == self.IMAGENET:
            state, source, std = self.imagenet_state(name)
            self.load(net, name, state, source, std)
        elif weights:
            self.load(net, name, self.local_state(weights), str(weights))
        if name.startswith("resnet"):
            self.out_dim, net.fc = net.fc.in_features, nn.Identity()
        else:
            self.out_dim, net.classifier = net.classifier.in_features, nn.Identity()
        self.net = net

    @staticmethod
    def imagenet_state(name):
        """-> (torchvision's ImageNet state_dict for `name`, its file, ImageNet's per-channel
        std)."""
        weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        # where torch.hub keeps downloads
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        file_name = weights.url.rsplit("/", 1)[-1]
        try:
            state = weights.get_state_dict(progress=True, map_location="cpu", weights_only=True)
        except OSError as error:                                        # offline, proxy, HTTP error
            raise DataError(f"--backbone-weights imagenet: {file_name} is not in {folder} and "
                            f"cannot be downloaded ({error}); download {weights.url} on a "
                            f"machine with internet and put it into {folder} (TORCH_HOME moves "
                            "that folder)") from error
        return state, str(folder / file_name), weights.transforms().std

    @staticmethod
    def local_state(path):
        if not Path(path).is_file():
            raise DataError(f"--backbone-weights {path}: no such file "
                            "(give imagenet or a torchvision state_dict)")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:    # empty, truncated, not a state_dict: pickle, zip, EOF
            raise DataError(f"--backbone-weights {path} was refused: not a torchvision "
                            f"state_dict of plain tensors ({type(error).__name__})") from error

    @staticmethod
    def load(net, name, state, source, std=None):
        """Load a torchvision state_dict into `net`; with `std`, divide the first conv's input
        channel c by std[c]."""
        # torchvision's published densenet files use old key names ("norm.1" for "norm1")
        state = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))\.(\d)", r"\1\2", k): v
                 for k, v in state.items()}
        expected = net.state_dict()
        missing, unexpected = (sorted(expected.keys() - state.keys()),
                               sorted(state.keys() - expected.keys()))
        shapes = [k for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape]
        if missing or unexpected or shapes:
            raise DataError(f"{source} is not a torchvision {name} state_dict: {len(missing)} "
                            f"missing keys {missing[:3]}, {len(unexpected)} unexpected "
                            f"{unexpected[:3]}, wrong shapes {shapes[:3]}")
        if std is not None:
            first = next(n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)) + ".weight"
            state[first] = state[first] / torch.tensor(std).view(1, 3, 1, 1)    # (C_out, 3, k, k)
        net.load_state_dict(state)

    def forward(self, x):
        return self.net(x.expand(-1, 3, -1, -1))  # gray -> RGB, see the docstring
