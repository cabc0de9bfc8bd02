"""Model: the KL, the reparameterisation, the loss parts of each method, and image-only
inference."""
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from model import VKD, TextEncoder, VKDConfig, bce, gaussian_kl, reparameterize

SMALL = dict(latent_dim=8, cnn_width=4, vocab_size=50, max_len=12, text_dim=16, text_heads=2,
             text_layers=1)


def batch(B=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, size, size, generator=g)
    t = torch.randint(1, 50, (B, 12), generator=g)
    t[:, 8:] = 0                                                  # padding
    y = (torch.rand(B, 14, generator=g) < 0.3).float()
    return x, t, y


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu_q, mu_p = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    logvar_q, logvar_p = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    expected = kl_divergence(Normal(mu_q, (0.5 * logvar_q).exp()),
                             Normal(mu_p, (0.5 * logvar_p).exp())).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu_q, logvar_q, mu_p, logvar_p), expected)
    # direction matters: KL(q || p) != KL(p || q) in general (the authors' code had it reversed)
    assert not torch.allclose(gaussian_kl(mu_p, logvar_p, mu_q, logvar_q), expected)
    assert torch.allclose(gaussian_kl(mu_q, logvar_q, mu_q, logvar_q), torch.zeros(5), atol=1e-6)


def test_reparameterize_moments_and_gradients():
    torch.manual_seed(0)
    mu = torch.tensor([[1.5, -2.0]], requires_grad=True)
    # sigma = 1, 3
    logvar = torch.tensor([[0.0, 2 * torch.log(torch.tensor(3.0)).item()]], requires_grad=True)
    z = reparameterize(mu, logvar, num_samples=200_000)                    # (S, 1, 2)
    assert z.shape == (200_000, 1, 2)
    torch.testing.assert_close(z.mean(0), mu.detach(), atol=0.03, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([[1.0, 3.0]]), atol=0.03, rtol=0)
    z.sum().backward()
    assert mu.grad is not None and logvar.grad is not None
    assert torch.all(mu.grad == 200_000)                                   # dz/dmu = 1 per sample


@pytest.mark.parametrize("method", ("vkd", "image", "text"))
def test_loss_parts_per_method(method):
    torch.manual_seed(0)
    # eval: no dropout, so parts are repeatable
    model = VKD(VKDConfig(method=method, **SMALL)).eval()
    x, t, y = batch()
    torch.manual_seed(1)
    parts = model(x, t, y, beta=0.5, prior_weight=2.0)
    assert set(parts) == {"loss", "bce_posterior", "bce_prior", "kl"}
    # recompute each part from the encoders, drawing the same eps (posterior first, then prior)
    h_x, mu_p, logvar_p = model.encode_prior(x)
    torch.manual_seed(1)
    if method == "image":
        expected_prior = F.binary_cross_entropy_with_logits(model.classifier(mu_p), y,
                                                            reduction="sum") / len(y)
        torch.testing.assert_close(parts["bce_prior"], expected_prior)
        torch.testing.assert_close(parts["loss"], expected_prior)
        assert model.text_encoder is None and parts["kl"] == 0 and parts["bce_posterior"] == 0
        return
    mu_q, logvar_q = model.encode_posterior(h_x, t)
    z_q = reparameterize(mu_q, logvar_q)
    expected_posterior = F.binary_cross_entropy_with_logits(model.classifier(z_q[0]), y,
                                                            reduction="sum") / len(y)
    torch.testing.assert_close(parts["bce_posterior"], expected_posterior)
    if method == "text":
        assert parts["bce_prior"] == 0 and parts["kl"] == 0
        torch.testing.assert_close(parts["loss"], expected_posterior)
        return
    z_p = reparameterize(mu_p, logvar_p)
    expected_prior = F.binary_cross_entropy_with_logits(model.classifier(z_p[0]), y,
                                                        reduction="sum") / len(y)
    q = Normal(mu_q, (0.5 * logvar_q).exp())
    p = Normal(mu_p, (0.5 * logvar_p).exp())
    expected_kl = kl_divergence(q, p).sum(-1).mean()                 # KL(q || p), not KL(p || q)
    torch.testing.assert_close(parts["bce_prior"], expected_prior)
    torch.testing.assert_close(parts["kl"], expected_kl)
    torch.testing.assert_close(parts["loss"],
                               expected_posterior + 2.0 * expected_prior + 0.5 * expected_kl)


def test_training_step_under_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    model = VKD(VKDConfig(method="vkd", **SMALL))
    x, t, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = model(x, t, y, beta=torch.tensor(0.5))
    assert all(v.dtype == torch.float32 for v in parts.values())   # BCE and KL are computed in fp32
    parts["loss"].backward()
    assert torch.isfinite(parts["loss"]) and model.classifier.weight.grad.abs().sum() > 0


def test_predict_never_runs_the_text_encoder():
    model = VKD(VKDConfig(method="vkd", **SMALL)).eval()

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder ran at inference")
    model.text_encoder.forward = refuse
    model.posterior.forward = refuse
    x, t, y = batch()
    p, std = model.predict(x)
    assert p.shape == (6, 14) and torch.all((p > 0) & (p < 1)) and torch.all(std == 0)
    p_s, std_s = model.predict(x, num_samples=16)
    assert p_s.shape == (6, 14) and torch.all(std_s > 0)
    with pytest.raises(AssertionError, match="text encoder ran"):
        model(x, t, y)                                                  # while training it must run


def test_text_encoder_ignores_padding_and_other_reports():
    torch.manual_seed(0)
    encoder = TextEncoder(VKDConfig(**SMALL)).eval()
    _, t, _ = batch()                                     # tokens 8..11 of every report are padding
    h = encoder(t)
    torch.testing.assert_close(encoder(t[:, :8]), h)      # the padding does not change the features
    other = t.clone()
    other[1:, :8] = torch.randint(1, 50, (5, 8))          # the other reports of the batch change
    torch.testing.assert_close(encoder(other)[0], h[0])  # attention stays within one report
    shifted = t.clone()
    shifted[0, :8] = t[0, :8].flip(0)                   # same tokens, other order: positions matter
    assert not torch.allclose(encoder(shifted)[0], h[0])


@pytest.mark.parametrize("backbone", ["resnet18", "densenet121"])
def test_torchvision_backbone_runs_on_gray_images_and_loads_local_weights(backbone, tmp_path):
    import torchvision
    reference = getattr(torchvision.models, backbone)(weights=None)
    state = reference.state_dict()
    if backbone == "densenet121":                # the old key names of torchvision's published file
        state = {(k.replace("norm1", "norm.1").replace("conv1", "conv.1") if "denselayer" in k
                  else k): v for k, v in state.items()}
    torch.save(state, tmp_path / "weights.pth")
    model = VKD(VKDConfig(method="image", backbone=backbone, **SMALL),
                backbone_weights=tmp_path / "weights.pth")
    loaded = model.image_encoder.net.state_dict()
    for name, tensor in reference.state_dict().items():
        if name in loaded:                                # all but the replaced fc / classifier
            assert torch.equal(loaded[name], tensor), name
    assert "features.denseblock1.denselayer1.conv1.weight" in loaded or backbone == "resnet18"
    x, _, _ = batch(B=2, size=64)
    p, _ = model.eval().predict(x)
    assert p.shape == (2, 14)


def test_bce_leaves_out_unobserved_labels():
    """A NaN label (uncertain, ignored) contributes neither loss nor gradient; the others are
    unchanged."""
    logits = torch.randn(2, 5, 3, requires_grad=True)                       # (S, B, K)
    y = torch.tensor([[1.0, 0.0, float("nan")]] * 5)
    loss = bce(logits, y)
    expected = F.binary_cross_entropy_with_logits(logits[..., :2], y[:, :2].expand(2, 5, 2),
                                                  reduction="none").sum(-1).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[..., 2] == 0).all()
    assert (logits.grad[..., :2] != 0).all()


# ---------------------------------------------------------------------- the authors' design choices

def test_posterior_of_the_report_alone_never_reads_the_image():
    """posterior_reads_image=False: q(z | t). Other images, same reports -> the same posterior."""
    torch.manual_seed(0)
    model = VKD(VKDConfig(method="vkd", posterior_reads_image=False, **SMALL)).eval()
    x, t, _ = batch()
    h_x, _, _ = model.encode_prior(x)
    mu_q, logvar_q = model.encode_posterior(h_x, t)
    other_mu_q, other_logvar_q = model.encode_posterior(torch.randn_like(h_x) * 10, t)
    torch.testing.assert_close((mu_q, logvar_q), (other_mu_q, other_logvar_q))
    assert model.posterior.net[0].in_features == SMALL["text_dim"]
    default = VKD(VKDConfig(method="vkd", **SMALL)).eval()                # q(z | x, t) does read it
    h_x, _, _ = default.encode_prior(x)
    assert not torch.allclose(default.encode_posterior(h_x, t)[0],
                              default.encode_posterior(h_x + 1, t)[0])


def test_classifier_that_reads_the_image_sees_z_and_the_image_features():
    """classifier_reads_image=True: f([z; h_x]) for the posterior samples, the prior path and
    prediction."""
    torch.manual_seed(0)
    model = VKD(VKDConfig(method="vkd", classifier_reads_image=True, **SMALL)).eval()
    x, t, y = batch()
    h_x, mu_p, _ = model.encode_prior(x)
    f = model.classifier
    assert f.in_features == SMALL["latent_dim"] + model.image_encoder.out_dim
    expected = torch.sigmoid(F.linear(torch.cat([mu_p, h_x], -1), f.weight, f.bias))
    torch.testing.assert_close(model.predict(x)[0], expected)
    z = torch.randn(3, *mu_p.shape)                                              # (S, B, D) samples
    torch.testing.assert_close(model.classify(z, h_x)[1],
                               F.linear(torch.cat([z[1], h_x], -1), f.weight, f.bias))
    assert torch.isfinite(model(x, t, y)["loss"])


def test_kl_direction_pq_is_kl_of_the_prior_from_the_posterior():
    """kl_direction="pq": the loss's KL is KL(p || q) (the authors' code), checked against
    torch.distributions."""
    torch.manual_seed(0)
    model = VKD(VKDConfig(method="vkd", kl_direction="pq", **SMALL)).eval()
    x, t, y = batch()
    h_x, mu_p, logvar_p = model.encode_prior(x)
    mu_q, logvar_q = model.encode_posterior(h_x, t)
    std = lambda logvar: (0.5 * logvar).exp()                                          # noqa: E731
    p, q = Normal(mu_p, std(logvar_p)), Normal(mu_q, std(logvar_q))
    torch.testing.assert_close(model(x, t, y)["kl"], kl_divergence(p, q).sum(-1).mean())
    model.cfg.kl_direction = "qp"
    torch.testing.assert_close(model(x, t, y)["kl"], kl_divergence(q, p).sum(-1).mean())
    assert not torch.allclose(kl_divergence(p, q).sum(-1).mean(),
                              kl_divergence(q, p).sum(-1).mean())


def test_averaged_samples_feed_their_mean_to_the_classifier():
    """average_samples=True: L samples z_l, then f(mean_l z_l) (the authors average 100): the noise
    left in the mean shrinks as 1/sqrt(L)."""
    mu, logvar = torch.zeros(4, 5), torch.zeros(4, 5)                         # sigma = 1
    for average, shape in ((False, (100, 4, 5)), (True, (1, 4, 5))):
        model = VKD(VKDConfig(method="vkd", average_samples=average, **SMALL))
        torch.manual_seed(0)
        z = model.sample(mu, logvar, 100)
        torch.manual_seed(0)
        assert z.shape == shape
        torch.testing.assert_close(z, reparameterize(mu, logvar, 100).mean(0, keepdim=True)
                                   if average else reparameterize(mu, logvar, 100))
    torch.manual_seed(0)
    spread = VKD(VKDConfig(method="vkd", average_samples=True, **SMALL)).sample(
        torch.zeros(1000, 5), torch.zeros(1000, 5), 100).std()
    assert 0.07 < spread < 0.13                                                # 1 / sqrt(100) = 0.1
