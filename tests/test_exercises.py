"""Checkers for the exercises in docs/EXERCISES.md that add something new to the code. Each is
skipped until the exercise is done (the interface it asks for exists); then it checks the student's
code. The other exercises are checked by the tests that guard the code they rewrite (named in
docs/EXERCISES.md)."""
import dataclasses

import pytest
import torch

from model import VKD, VKDConfig


def test_product_of_experts_fusion():
    """Exercise 10: VKDConfig(fusion="poe") makes q(z|x,t) the product of the prior p(z|x) and a
    text expert N(mu_t, sigma_t^2) = VKD.text_expert(t): precisions add,
    1/s_q^2 = 1/s_p^2 + 1/s_t^2, and the mean is the precision-weighted mean,
    mu_q = s_q^2 (mu_p / s_p^2 + mu_t / s_t^2)."""
    if "fusion" not in {field.name for field in dataclasses.fields(VKDConfig)}:
        pytest.skip("exercise 10 (product of experts) not done: VKDConfig has no fusion field yet")
    torch.manual_seed(0)
    model = VKD(VKDConfig(method="vkd", fusion="poe", num_labels=3, cnn_width=4, latent_dim=6,
                          vocab_size=40, text_dim=16, max_len=10)).eval()
    x, t = torch.randn(4, 1, 32, 32), torch.randint(1, 40, (4, 10))
    h_x, mu_p, logvar_p = model.encode_prior(x)
    mu_t, logvar_t = model.text_expert(t)
    mu_q, logvar_q = model.encode_posterior(h_x, t)
    precision_p, precision_t = torch.exp(-logvar_p), torch.exp(-logvar_t)
    torch.testing.assert_close(torch.exp(-logvar_q), precision_p + precision_t)
    torch.testing.assert_close(mu_q, (mu_p * precision_p + mu_t * precision_t)
                               / (precision_p + precision_t))
