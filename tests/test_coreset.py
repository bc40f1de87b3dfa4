import math

import numpy as np
import pytest
import torch

from patchknn.coreset import _lazy_greedy, coreset_size, greedy_coreset, random_projection
from patchknn.errors import ConfigError


@pytest.fixture(scope="module")
def bank():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=5.0, size=(30, 24))
    return (centres[rng.integers(30, size=3000)] + rng.normal(size=(3000, 24))).astype(np.float32)


def _naive_greedy(z: torch.Tensor, m: int, first: int) -> np.ndarray:
    """Textbook greedy k-center: update every distance after each selection."""
    norms = (z * z).sum(1)
    min_d = (norms - 2 * z @ z[first] + norms[first]).clamp(min=0)
    min_d[first] = -math.inf
    sel = [first]
    for _ in range(m - 1):
        j = int(torch.argmax(min_d))
        sel.append(j)
        min_d = torch.minimum(min_d, norms - 2 * z @ z[j] + norms[j])
        min_d[j] = -math.inf
    return np.array(sel)


def _covering_radius(bank: np.ndarray, idx: np.ndarray) -> float:
    b = bank.astype(np.float64)
    c = b[idx]
    d2 = (b**2).sum(1)[:, None] - 2 * b @ c.T + (c**2).sum(1)[None]
    return float(np.sqrt(np.maximum(d2.min(1), 0)).max())


@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.1, 0.333])
def test_size_unique_and_in_range(bank, ratio):
    idx = greedy_coreset(bank, ratio, projection_dim=16, seed=0)
    assert idx.dtype == np.int64
    assert len(idx) == math.ceil(ratio * len(bank)) == coreset_size(len(bank), ratio)
    assert len(np.unique(idx)) == len(idx)
    assert idx.min() >= 0 and idx.max() < len(bank)


def test_deterministic_given_seed(bank):
    a = greedy_coreset(bank, 0.05, projection_dim=16, seed=7)
    b = greedy_coreset(bank, 0.05, projection_dim=16, seed=7)
    c = greedy_coreset(bank, 0.05, projection_dim=16, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_lazy_selection_equals_textbook_greedy(bank):
    z = random_projection(bank, 16, seed=0)
    expected = _naive_greedy(z, 120, 5)
    for candidates in (64, 512, 10_000):
        np.testing.assert_array_equal(_lazy_greedy(z, 120, 5, candidates=candidates), expected)


def test_greedy_covers_better_than_random(bank):
    idx = greedy_coreset(bank, 0.02, projection_dim=128, seed=0)  # 128 >= 24: no projection
    rng = np.random.default_rng(0)
    random_radius = min(_covering_radius(bank, rng.choice(len(bank), len(idx), replace=False)) for _ in range(5))
    assert _covering_radius(bank, idx) < 0.8 * random_radius
    # each new centre is the farthest point from the ones before it (k-center greedy property)
    b = bank.astype(np.float64)
    for step in (1, 10, len(idx) - 1):
        d = np.sqrt(((b[:, None, :] - b[idx[:step]][None]) ** 2).sum(-1)).min(1)
        assert d[idx[step]] >= d.max() - 1e-3


def test_projection_keeps_selection_sensible(bank):
    idx = greedy_coreset(bank, 0.02, projection_dim=8, seed=0)
    rng = np.random.default_rng(1)
    random_radius = _covering_radius(bank, rng.choice(len(bank), len(idx), replace=False))
    assert _covering_radius(bank, idx) < random_radius


def test_duplicates_and_edge_cases():
    dup = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)  # 3 distinct points, 30 rows
    idx = greedy_coreset(dup, 0.5, projection_dim=3, seed=0)
    assert len(idx) == 15 and len(np.unique(idx)) == 15
    assert len({tuple(r) for r in dup[idx[:3]]}) == 3  # the distinct points come first
    np.testing.assert_array_equal(greedy_coreset(dup, 1.0, 3, 0), np.arange(30))
    assert len(greedy_coreset(dup, 1e-6, 3, 0)) == 1
    assert coreset_size(100, 0.07) == 7
    with pytest.raises(ConfigError):
        greedy_coreset(dup, 0.0, 3, 0)
    with pytest.raises(ConfigError):
        greedy_coreset(dup, 1.5, 3, 0)
    with pytest.raises(ConfigError):
        greedy_coreset(dup, 0.5, 0, 0)
    with pytest.raises(ConfigError):
        greedy_coreset(np.zeros((0, 3), np.float32), 0.5, 3, 0)


def test_random_projection_shapes():
    x = np.random.default_rng(0).normal(size=(70_000, 10)).astype(np.float32)  # > one chunk
    z = random_projection(x, 4, seed=0)
    assert z.shape == (70_000, 4)
    np.testing.assert_array_equal(z.numpy(), random_projection(x, 4, seed=0).numpy())
    assert random_projection(x, 10, seed=0).shape == (70_000, 10)


def test_model_fits_a_coreset_and_rebuilds_the_index_on_load(tmp_path):
    from conftest import tiny_model

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8) for _ in range(4)]
    options = {"coreset_ratio": 0.25, "index": "ivf", "threshold_method": "none"}
    model = tiny_model(**options).fit(images)
    assert model.fit_info_["bank_size_full"] == 4 * 64
    assert model.fit_info_["bank_size"] == model.index_.size == math.ceil(0.25 * 4 * 64)
    assert model.index_.kind == "ivf"
    before = [p.anomaly_map for p in model.predict(images[:2])]
    loaded = type(model).load(model.save(tmp_path / "m"), progress=False)
    assert loaded.index_.kind == "ivf" and loaded.index_.size == model.index_.size
    for a, b in zip(before, [p.anomaly_map for p in loaded.predict(images[:2])]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fast_preset():
    from patchknn.presets import preset

    fast = preset("fast")
    assert fast.coreset_ratio < 0.1 and fast.index in ("flat", "ivf")
    assert preset("paper").coreset_ratio == 1.0 and preset("paper").index == "flat"
