"""Pretrained backbones: --backbone-weights imagenet reads torchvision's file from the torch hub
cache (downloading it there only when it is missing), folds ImageNet's per-channel std into the
first conv for gray input, fails offline with the file, folder and URL to fetch, and never
downloads when a checkpoint is loaded."""
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision

from model import VKD, VKDConfig
from vkd.reports import DataError

SMALL = dict(latent_dim=8, vocab_size=50, max_len=12, text_dim=16, text_heads=2, text_layers=1)
RESNET18 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
FILE_NAME = "resnet18-f37072fd.pth"                      # the last part of RESNET18.url


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache under tmp_path, and a network that records every download and fails
    it."""
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # let TORCH_HOME decide, as it does for a user
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    downloads = []

    def offline(url, dst, *args, **kwargs):
        downloads.append(url)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")
    return folder, downloads


def imagenet_like_state(seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).state_dict()


def place(state, folder):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / FILE_NAME)


def test_the_file_name_is_the_last_part_of_torchvisions_url():
    assert RESNET18.url.rsplit("/", 1)[-1] == FILE_NAME


def test_imagenet_weights_are_read_from_the_hub_cache_with_the_std_folded_into_the_first_conv(hub):
    folder, downloads = hub
    state = imagenet_like_state()
    place(state, folder)
    model = VKD(VKDConfig(method="image", backbone="resnet18", **SMALL),
                backbone_weights="imagenet")
    assert downloads == []
    loaded = model.image_encoder.net.state_dict()
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(loaded["conv1.weight"], state["conv1.weight"] / std, rtol=0, atol=0)
    for name, tensor in state.items():
        if name != "conv1.weight" and not name.startswith("fc."):
            assert torch.equal(loaded[name], tensor), name


def test_gray_input_reaches_the_first_batchnorm_as_the_imagenet_normalised_rgb_image_would(hub):
    """The docstring's claim: with the project's normalisation x = (p - m) / s, bn1 (batch
    statistics) gives what ImageNet's normalisation u_c = (p - mean_c) / std_c of the gray image
    replicated to RGB would give, when the padding means the same pixel value (p = m) in both."""
    folder, _ = hub
    state = imagenet_like_state()
    place(state, folder)
    encoder = VKD(VKDConfig(method="image", backbone="resnet18", **SMALL),
                  "imagenet").image_encoder.train()
    m, s = 0.45, 0.27                                     # the training split's pixel mean and std
    p = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    seen = {}
    encoder.net.bn1.register_forward_hook(
        lambda module, inputs, output: seen.update(bn1=output.clone()))
    encoder((p - m) / s)                          # bn1 is followed by an in-place ReLU: hence clone
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    # (B, 3, H+6, W+6)
    u = (F.pad(p, (3, 3, 3, 3), value=m) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    h = F.conv2d(u, state["conv1.weight"], stride=2)
    expected = F.batch_norm(h, None, None, state["bn1.weight"], state["bn1.bias"], training=True)
    # float rounding and BN's eps leave < 1e-3 here; the plain RGB sum, without ImageNet's std,
    # leaves 5e-2
    torch.testing.assert_close(seen["bn1"], expected, rtol=0, atol=2e-3)


def test_offline_without_the_file_the_error_names_the_file_the_folder_and_the_url(hub):
    folder, downloads = hub
    with pytest.raises(DataError) as error:
        VKD(VKDConfig(method="image", backbone="resnet18", **SMALL), backbone_weights="imagenet")
    assert downloads == [RESNET18.url]                    # it did try torchvision's URL
    message = str(error.value)
    assert FILE_NAME in message and str(folder) in message and RESNET18.url in message


def test_a_missing_file_is_downloaded_into_the_hub_cache(hub, monkeypatch):
    folder, _ = hub
    state = imagenet_like_state(seed=2)
    downloads = []

    def download(url, dst, *args, **kwargs):
        downloads.append((url, dst))
        torch.save(state, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    model = VKD(VKDConfig(method="image", backbone="resnet18", **SMALL),
                backbone_weights="imagenet")
    assert downloads == [(RESNET18.url, str(folder / FILE_NAME))]
    assert torch.equal(model.image_encoder.net.layer1[0].conv1.weight,
                       state["layer1.0.conv1.weight"])


def test_a_checkpoint_of_an_imagenet_run_loads_without_the_weights_file(hub):
    folder, downloads = hub
    place(imagenet_like_state(), folder)
    config = VKDConfig(method="image", backbone="resnet18", **SMALL)
    trained = VKD(config, backbone_weights="imagenet").eval()
    checkpoint = {"model": trained.state_dict(), "model_config": vars(config)}
    (folder / FILE_NAME).unlink()
    # as evaluate.load_checkpoint does
    restored = VKD(VKDConfig(**checkpoint["model_config"])).eval()
    restored.load_state_dict(checkpoint["model"])
    assert downloads == []
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(restored.predict(x)[0], trained.predict(x)[0], rtol=0, atol=0)


def test_a_state_dict_of_another_network_is_a_clear_error(hub, tmp_path):
    folder, _ = hub
    place({"model": imagenet_like_state()}, folder)        # a training checkpoint, not a state_dict
    with pytest.raises(DataError,
                       match=rf"{FILE_NAME} is not a torchvision resnet18 state_dict: .*missing"):
        VKD(VKDConfig(method="image", backbone="resnet18", **SMALL), backbone_weights="imagenet")
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(DataError,
                       match=r"resnet34.pth is not a torchvision resnet18 state_dict: "
                             r".*unexpected"):
        VKD(VKDConfig(method="image", backbone="resnet18", **SMALL),
            backbone_weights=tmp_path / "resnet34.pth")
    with pytest.raises(DataError, match="no such file"):
        VKD(VKDConfig(method="image", backbone="resnet18", **SMALL),
            backbone_weights=tmp_path / "absent.pth")


def test_a_local_file_is_loaded_as_it_is(tmp_path, hub):
    state = imagenet_like_state(seed=3)
    torch.save(state, tmp_path / "weights.pth")
    model = VKD(VKDConfig(method="image", backbone="resnet18", **SMALL),
                backbone_weights=tmp_path / "weights.pth")
    # no ImageNet std folded in
    assert torch.equal(model.image_encoder.net.conv1.weight, state["conv1.weight"])
    assert hub[1] == []


def test_densenet121_imagenet_weights_with_the_published_key_names(hub):
    folder, downloads = hub
    torch.manual_seed(4)
    state = torchvision.models.densenet121(weights=None).state_dict()
    # the old key names of torchvision's file
    published = {(k.replace("norm1", "norm.1").replace("conv1", "conv.1") if "denselayer" in k
                  else k): v for k, v in state.items()}
    folder.mkdir(parents=True)
    torch.save(published,
               folder / torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1])
    model = VKD(VKDConfig(method="image", backbone="densenet121", **SMALL),
                backbone_weights="imagenet")
    assert downloads == []
    loaded = model.image_encoder.net.state_dict()
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(loaded["features.conv0.weight"],
                               state["features.conv0.weight"] / std, rtol=0, atol=0)
    name = "features.denseblock1.denselayer1.norm1.weight"
    assert torch.equal(loaded[name], state[name])
