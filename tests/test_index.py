import warnings

import numpy as np
import pytest
import torch

from patchknn.errors import ConfigError, NotFittedError
from patchknn.index import (
    HNSWIndex,
    IndexParams,
    IVFIndex,
    MemoryBankIndex,
    TorchFlatIndex,
    build_index,
    default_threads,
    set_search_threads,
)


def brute(bank, q, k):
    d = np.sqrt(((q[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, :k]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    # clustered data, like patch features: brute force has clear winners
    centres = rng.normal(scale=4.0, size=(20, 16))
    bank = (centres[rng.integers(20, size=600)] + rng.normal(size=(600, 16))).astype(np.float32)
    q = (centres[rng.integers(20, size=50)] + rng.normal(size=(50, 16))).astype(np.float32)
    return bank, q


@pytest.mark.parametrize("k", [1, 3])
def test_flat_equals_brute_force(data, k):
    bank, q = data
    got = MemoryBankIndex().build(bank).search(q, k)
    np.testing.assert_allclose(got, brute(bank, q, k), rtol=1e-4, atol=1e-4)
    got2 = build_index(bank, "flat").search(q, k)
    np.testing.assert_array_equal(got, got2)


@pytest.mark.parametrize("k", [1, 4])
def test_torch_flat_equals_brute_force(data, k):
    bank, q = data
    index = TorchFlatIndex("cpu", block_elements=50 * 64).build(bank)  # forces several chunks
    np.testing.assert_allclose(index.search(q, k), brute(bank, q, k), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(index.search(torch.from_numpy(q), k), brute(bank, q, k), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("k", [1, 3])
def test_ivf_with_all_lists_probed_is_exact(data, k):
    bank, q = data
    index = build_index(bank, "ivf", IndexParams(nlist=8, nprobe=8), seed=3)
    assert isinstance(index, IVFIndex) and index.nlist == 8
    np.testing.assert_allclose(index.search(q, k), brute(bank, q, k), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [1, 3])
def test_hnsw_with_high_ef_is_exact(data, k):
    bank, q = data
    index = build_index(bank, "hnsw", {"hnsw_m": 16, "hnsw_ef_search": 600}, seed=0)
    assert isinstance(index, HNSWIndex)
    np.testing.assert_allclose(index.search(q, k), brute(bank, q, k), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_deterministic(data, kind):
    bank, q = data
    params = IndexParams(nlist=16, nprobe=2, hnsw_m=8, hnsw_ef_search=8)
    a = build_index(bank, kind, params, seed=1).search(q, 2)
    b = build_index(bank, kind, params, seed=1).search(q, 2)
    np.testing.assert_array_equal(a, b)
    # approximate results are never below the exact distance
    assert (a[:, 0] >= brute(bank, q, 1)[:, 0] - 1e-4).all()


def test_ivf_auto_nlist_and_clamps():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(200, 4)).astype(np.float32)
    assert IVFIndex.auto_nlist(200) == 5  # 200 // 39
    assert IVFIndex.auto_nlist(160_000) == 1600
    assert IVFIndex.auto_nlist(10) == 1
    index = build_index(bank, "ivf", IndexParams(nlist=1000, nprobe=1000))
    assert index.nlist == 200  # never more lists than vectors
    np.testing.assert_allclose(index.search(bank[:5], 1), 0, atol=1e-3)


def test_params_and_threads():
    from types import SimpleNamespace

    cfg = SimpleNamespace(index_nlist=7, index_nprobe=3, hnsw_m=12, hnsw_ef_search=5)  # a PatchKNNConfig's fields
    p = IndexParams.from_config(cfg)
    assert (p.nlist, p.nprobe, p.hnsw_m) == (7, 3, 12)
    with pytest.raises(ConfigError, match="unknown index parameter"):
        IndexParams.coerce({"nlists": 3})
    assert 1 <= default_threads() <= torch.get_num_threads()
    assert set_search_threads(1) == 1
    set_search_threads()


def test_errors():
    with pytest.raises(NotFittedError):
        MemoryBankIndex().search(np.zeros((1, 2), np.float32))
    idx = MemoryBankIndex().build(np.zeros((3, 2), np.float32))
    with pytest.raises(ConfigError, match="larger than the memory bank"):
        idx.search(np.zeros((1, 2), np.float32), k=4)
    with pytest.raises(ConfigError, match=r"queries must be \(M, 2\)"):
        idx.search(np.zeros((1, 3), np.float32), k=1)
    assert idx.search(np.zeros((0, 2), np.float32), k=2).shape == (0, 2)
    with pytest.raises(ConfigError):
        MemoryBankIndex().build(np.zeros((0, 2), np.float32))
    with pytest.raises(ConfigError, match="NaN"):
        MemoryBankIndex().build(np.full((2, 2), np.nan, np.float32))
    with pytest.raises(ConfigError, match="index must be one of"):
        build_index(np.zeros((3, 2), np.float32), "lsh")
    with pytest.raises(ConfigError):
        build_index(np.zeros((3, 2), np.float32), "flat", device="mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_unavailable_is_a_clear_error():
    with pytest.raises(ConfigError, match="no CUDA device"):
        build_index(np.zeros((3, 2), np.float32), "flat", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_cuda_search_equals_cpu(data, kind):
    bank, q = data
    params = IndexParams(nlist=8, nprobe=8, hnsw_ef_search=600)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # IVF/HNSW may fall back to the CPU
        gpu = build_index(bank, kind, params, device="cuda")
    np.testing.assert_allclose(gpu.search(q, 2), brute(bank, q, 2), rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def clustered():
    rng = np.random.default_rng(5)
    centres = rng.normal(scale=6.0, size=(40, 12))
    bank = (centres[rng.integers(40, size=4000)] + rng.normal(size=(4000, 12))).astype(np.float32)
    bank[:50] = bank[50:100]  # exact duplicates
    q = (centres[rng.integers(40, size=300)] + rng.normal(size=(300, 12))).astype(np.float32)
    q[:20] = rng.normal(scale=30.0, size=(20, 12))  # "anomalies" far from everything
    q[20:30] = bank[200:210]  # queries on bank vectors: distance 0
    return bank, q


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("nlist", [1, 16, 64])
def test_pruned_flat_equals_brute_force(clustered, k, nlist):
    from patchknn.index import PrunedFlatIndex

    bank, q = clustered
    index = PrunedFlatIndex(nlist=nlist, seed=0, threads=1).build(bank)
    got = index.search(q, k)
    np.testing.assert_allclose(got, brute(bank, q, k), rtol=1e-5, atol=1e-4)
    if nlist == 64:
        assert index.stats["pairs"] < 0.5 * len(q) * len(bank)  # most of the bank was skipped


def test_pruned_flat_threads_and_factory(clustered, monkeypatch):
    import patchknn.index as ix

    bank, q = clustered
    one = ix.PrunedFlatIndex(nlist=32, threads=1).build(bank).search(q, 3)
    two = ix.PrunedFlatIndex(nlist=32, threads=2).build(bank)
    np.testing.assert_array_equal(one, two.search(q, 3))  # each query's result is independent of the split
    threads_before = torch.get_num_threads()
    two.search(np.repeat(q, 4, axis=0), 1)
    assert torch.get_num_threads() == threads_before
    monkeypatch.setattr(ix, "PRUNED_MIN_BANK", 1000)
    assert isinstance(build_index(bank, "flat"), ix.PrunedFlatIndex)
    monkeypatch.setattr(ix, "PRUNED_MIN_BANK", 10**9)
    assert type(build_index(bank, "flat")) is MemoryBankIndex
