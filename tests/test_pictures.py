"""pictures.py: the latent projection against scikit-learn's PCA, and a clear message without
matplotlib."""
import numpy as np
import pytest

from vkd.pictures import PlotError, pca_2d, plot_training


def test_pca_matches_the_first_two_principal_components():
    from sklearn.decomposition import PCA
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=(50, 6)) * [5, 3, 1, 1, 1, 1], rng.normal(size=(30, 6))
    ours = np.concatenate(pca_2d([a, b]))
    reference = PCA(2).fit_transform(np.concatenate([a, b]))
    # each axis up to its sign
    np.testing.assert_allclose(np.abs(ours), np.abs(reference), atol=1e-9)


def test_pictures_without_matplotlib_give_a_clear_message(monkeypatch):
    # makes `import matplotlib` fail
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(PlotError, match="pip install matplotlib"):
        plot_training("unused", "unused")
