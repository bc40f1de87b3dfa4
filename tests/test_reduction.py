import numpy as np
import pytest
from sklearn.decomposition import PCA as SkPCA

from patchknn.reduction import PCA, MomentAccumulator


def _fit(x, variance, chunks=3):
    acc = MomentAccumulator(x.shape[1])
    for part in np.array_split(x, chunks):
        acc.update(part)
    return PCA.from_moments(acc, variance)


def test_matches_sklearn_full_pca():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2000, 20)) @ rng.normal(size=(20, 20)) + 5).astype(np.float32)
    ours = _fit(x, 0.95)
    sk = SkPCA(n_components=ours.n_components, svd_solver="full").fit(x.astype(np.float64))
    # same subspace: projections agree up to the sign of each component
    a = ours.transform(x).numpy()
    b = sk.transform(x)
    for j in range(ours.n_components):
        assert min(np.abs(a[:, j] - b[:, j]).max(), np.abs(a[:, j] + b[:, j]).max()) < 1e-2
    np.testing.assert_allclose(ours.explained_variance_ratio, sk.explained_variance_ratio_, rtol=1e-4)


@pytest.mark.parametrize("variance", [0.5, 0.8, 0.95, 0.999])
def test_keeps_fewest_components_reaching_variance(variance):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(1000, 12)) * np.linspace(5, 0.1, 12)).astype(np.float32)
    p = _fit(x, variance)
    cum = np.cumsum(_fit(x, 1.0).explained_variance_ratio)
    assert cum[p.n_components - 1] >= variance - 1e-9
    if p.n_components > 1:
        assert cum[p.n_components - 2] < variance


def test_distances_preserved_with_full_variance():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    p = _fit(x, 1.0)
    y = p.transform(x).numpy()
    d_x = np.linalg.norm(x[:50, None] - x[None, :50], axis=-1)
    d_y = np.linalg.norm(y[:50, None] - y[None, :50], axis=-1)
    np.testing.assert_allclose(d_x, d_y, atol=1e-3)


def test_constant_data_keeps_one_component():
    x = np.ones((100, 5), np.float32)
    p = _fit(x, 0.95)
    assert p.n_components == 1
    assert np.allclose(p.transform(x).numpy(), 0)


def test_fewer_samples_than_dims():
    x = np.random.default_rng(3).normal(size=(4, 50)).astype(np.float32)
    p = _fit(x, 1.0, chunks=1)
    assert p.n_components <= 3
    assert np.isfinite(p.transform(x).numpy()).all()


def test_deterministic_signs():
    x = np.random.default_rng(4).normal(size=(500, 8)).astype(np.float32)
    assert np.array_equal(_fit(x, 0.9).components, _fit(x, 0.9).components)
