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
def test_ivf_probes_the_lists_faiss_own_quantizer_would(data, k, monkeypatch):
    """The lists come from torch's product (in blocks of queries), the scan from faiss: the same
    lists, hence the same distances, as faiss' own ``IndexIVFFlat.search`` with its quantizer."""
    import patchknn.index.approximate as approximate

    bank, q = data
    index = build_index(bank, "ivf", IndexParams(nlist=32, nprobe=3), seed=1)
    _, lists = index._quantizer.search(q, 3)
    np.testing.assert_array_equal(np.sort(index._probe(q)[0], axis=1), np.sort(lists, axis=1))
    index._index.parallel_mode = 0
    faiss_own, _ = index._index.search(q, k)
    index._index.parallel_mode = 2
    np.testing.assert_array_equal(index.search(q, k), np.sqrt(np.maximum(faiss_own, 0)))
    monkeypatch.setattr(approximate, "_PROBE_BLOCK", 32 * 7)  # blocks of 7 queries: the same answers
    np.testing.assert_array_equal(index.search(q, k), np.sqrt(np.maximum(faiss_own, 0)))


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


def test_exact_flat_distances_equal_float64_brute_force(clustered):
    """The exact index against a float64 scan, every rank, to 1e-5 relative. Fails if a wrong
    neighbour is returned (on this data the nearest and second nearest differ by far more than
    1e-5), if ranks come unsorted, or if the distance loses precision (e.g. computed as
    ||q||^2 - 2 q.b + ||b||^2 in float32 on the 0-distance queries, or returned squared)."""
    bank, q = clustered
    exact = brute(bank, q, 4)
    for index in (MemoryBankIndex().build(bank), build_index(bank, "flat")):
        got = index.search(q, 4)
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "params", "min_recall"),
    [
        ("ivf", IndexParams(nlist=32, nprobe=2), 0.95),  # measured 0.993 (0.963 with nprobe=1)
        ("hnsw", IndexParams(hnsw_m=8, hnsw_ef_search=8), 0.90),  # measured 0.96 (0.66 with m=4, ef=1)
    ],
)
def test_approximate_recall_and_no_distance_below_exact(clustered, kind, params, min_recall):
    """Approximate indexes on clustered data (queries near the bank's clusters; the 20 far
    "anomalies" of the fixture left out, as their nearest cluster is ambiguous).

    * recall@1 (the returned nearest distance is the exact one) >= a stated figure: fails if the
      search parameters are not applied (IVF probing fewer lists than asked, HNSW's efSearch
      ignored) or the index is built wrongly;
    * every returned distance, rank by rank, is >= the exact one at that rank (within round-off):
      an approximate index may miss neighbours but every distance it reports is a real distance to
      a bank vector, so the i-th smallest it reports cannot be below the true i-th smallest. Fails
      if distances are underestimated (quantised/compressed vectors, a missing square root on a
      value < 1, unsorted output);
    * and the distances agree with a recomputation from scratch for the queries it got right.
    """
    bank, q = clustered
    q = q[20:]
    exact = brute(bank, q, 3)
    got = build_index(bank, kind, params, seed=1).search(q, 3)
    hit = np.abs(got[:, 0] - exact[:, 0]) <= 1e-5 * exact[:, 0] + 1e-5
    assert hit.mean() >= min_recall, f"{kind} recall@1 {hit.mean():.3f} < {min_recall}"
    assert (got >= exact * (1 - 1e-5) - 1e-5).all()
    assert (np.diff(got, axis=1) >= 0).all()
    # a deliberately weak setting misses neighbours: the recall measure above can see misses
    weak = IndexParams(nlist=32, nprobe=1, hnsw_m=4, hnsw_ef_search=1)
    low = build_index(bank, kind, weak, seed=1).search(q, 1)
    assert (np.abs(low[:, 0] - exact[:, 0]) > 1e-5 * exact[:, 0] + 1e-5).any()


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


def test_pruned_flat_threads_and_small_bank_factory(clustered, monkeypatch):
    import patchknn.index as ix

    bank, q = clustered
    one = ix.PrunedFlatIndex(nlist=32, threads=1).build(bank).search(q, 3)
    two = ix.PrunedFlatIndex(nlist=32, threads=2).build(bank)
    np.testing.assert_array_equal(one, two.search(q, 3))  # each query's result is independent of the split
    threads_before = torch.get_num_threads()
    two.search(np.repeat(q, 4, axis=0), 1)
    assert torch.get_num_threads() == threads_before
    monkeypatch.setattr(ix, "PRUNED_MIN_BANK", 10**9)  # small banks: faiss's flat index
    assert type(build_index(bank, "flat")) is MemoryBankIndex


@pytest.mark.parametrize("k", [1, 3])
def test_cuda_flat_with_gpu_faiss_on_a_large_bank(monkeypatch, k):
    """Issue 12: a flat bank of >= PRUNED_MIN_BANK rows on CUDA with a GPU faiss used to hand the
    CPU's pruned structure (a dict) to ``index_cpu_to_gpu``, which raised TypeError. faiss' GPU
    functions are replaced by stand-ins that, like the real ones, accept only faiss indexes."""
    import faiss

    import patchknn.index as ix

    copied = []

    class FakeResources:  # faiss.StandardGpuResources
        pass

    def fake_cpu_to_gpu(res, device, index):
        if not isinstance(res, FakeResources) or not isinstance(index, faiss.Index):
            raise TypeError(f"in method 'index_cpu_to_gpu', argument 3 of type 'faiss::Index const *' ({type(index)})")
        copied.append((device, type(index).__name__))
        return index  # the "GPU" index answers as the CPU one would

    monkeypatch.setattr(faiss, "StandardGpuResources", FakeResources, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", fake_cpu_to_gpu, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ix.faiss_has_gpu()

    rng = np.random.default_rng(7)
    n = ix.PRUNED_MIN_BANK + 500  # over the size at which the CPU search becomes the pruned one
    centres = rng.normal(scale=5.0, size=(30, 8))
    bank = (centres[rng.integers(30, size=n)] + rng.normal(size=(n, 8))).astype(np.float32)
    q = (centres[rng.integers(30, size=40)] + rng.normal(size=(40, 8))).astype(np.float32)
    index = build_index(bank, "flat", device="cuda:1")
    assert isinstance(index, ix.FaissGpuIndex) and index.kind == "flat" and index.device == "cuda:1"
    assert copied == [(1, "IndexFlatL2")]
    assert index.bank.shape == (n, 8)
    np.testing.assert_allclose(index.search(q, k), brute(bank, q, k), rtol=1e-4, atol=1e-3)
    # IVF takes the same road (its faiss index is copyable)
    build_index(bank[:2000], "ivf", IndexParams(nlist=8, nprobe=8), device="cuda")
    assert copied[-1] == (0, "IndexIVFFlat")


# ------------------------------------------------------------------ the screened exact index
def brute64(bank, q, k, step=50_000):
    """float64 scan, chunked: the k smallest Euclidean distances, sorted."""
    qq = torch.from_numpy(np.asarray(q)).double()
    best = None
    for a in range(0, len(bank), step):
        b = torch.from_numpy(np.asarray(bank[a : a + step])).double()
        d2 = ((qq * qq).sum(1, keepdim=True) - 2 * qq @ b.T + (b * b).sum(1)[None]).clamp_(min=0)
        # the expansion loses digits in float64 only far below float32 resolution, but recompute
        # the candidates from differences to be safe
        part = d2.topk(min(k + 2, d2.shape[1]), dim=1, largest=False).indices
        exact = ((qq[:, None, :] - b[part]) ** 2).sum(-1)
        best = exact if best is None else torch.cat([best, exact], 1)
    return best.topk(k, dim=1, largest=False).values.sqrt().numpy()


@pytest.fixture(scope="module")
def big_bank():
    """A seeded clustered bank of 200,000 x 400 with a decaying spectrum (like PCA output), plus
    queries with adversarial near-ties."""
    rng = np.random.default_rng(11)
    n, d = 200_000, 400
    scale = (np.linspace(2.0, 0.2, d) ** 1.5).astype(np.float32)
    centres = rng.normal(size=(300, d)).astype(np.float32) * scale
    bank = centres[rng.integers(300, size=n)]
    bank += rng.standard_normal((n, d), dtype=np.float32) * (0.6 * scale)
    bank[1000:1010] = bank[2000:2010]  # exact duplicates
    bank[3000] = bank[3001]
    bank[3000, -1] = np.nextafter(bank[3001, -1], np.float32(np.inf))  # 1 ulp apart, in the tail
    q = centres[rng.integers(300, size=48)] + rng.standard_normal((48, d), dtype=np.float32) * (0.6 * scale)
    q[0:4] = bank[[5, 2000, 3001, 77_777]]  # on bank rows (distance 0; duplicated ones)
    q[4:8] = 0.5 * (bank[[10, 20, 30, 40]] + bank[[11, 21, 31, 41]])  # midpoints: near-ties of 2 rows
    q[8] = bank[3001] + 1e-3 * scale  # two rows 1 ulp apart at nearly the same distance
    q[9:12] = rng.normal(scale=8.0, size=(3, d)).astype(np.float32) * scale  # far "anomalies"
    return bank, q.astype(np.float32)


def test_screened_exact_equals_float64_scan_on_a_large_wide_bank(big_bank):
    """Issue 13: the exact search on >= 200k rows x >= 400 dims equals a float64 scan (to the
    float32 rounding of the result), for k = 1 and k = 4 and near-ties, and screens out most of
    the bank."""
    from patchknn.index.screened import ScreenedFlatIndex

    bank, q = big_bank
    index = ScreenedFlatIndex(threads=2).build(bank)
    assert index._index.head_dim < bank.shape[1]  # the screen really is in fewer dimensions
    exact = brute64(bank, q, 4)
    for k in (1, 4):
        got = index.search(q, k)
        np.testing.assert_allclose(got, exact[:, :k], rtol=2e-7, atol=1e-6)
    assert (got[0, 0] == 0) and (got[1, :2] == 0).all()  # a duplicated row: twice distance 0
    assert got[2, 0] == 0 and 0 < got[2, 1] < 1e-5  # the row 1 ulp away
    st = index.stats
    assert st["queries"] == 2 * len(q) and st["screened"] == 2 * len(q) * len(bank)
    assert st["rechecked"] < 0.05 * st["screened"]  # the bound rules out most rows


def test_screened_threads_split_and_factory(clustered, monkeypatch):
    """The distance of a neighbour is computed in float64 from the vectors alone: any split of the
    queries gives bit-identical answers; the factory uses the screened index for large banks."""
    import patchknn.index as ix
    from patchknn.index.screened import ScreenedFlatIndex

    bank, q = clustered
    one = ScreenedFlatIndex(head_dim=4, threads=1, chunk_rows=512).build(bank).search(q, 3)
    two = ScreenedFlatIndex(head_dim=4, threads=2, chunk_rows=512).build(bank).search(np.repeat(q, 50, axis=0), 3)
    np.testing.assert_array_equal(np.repeat(one, 50, axis=0), two)
    np.testing.assert_allclose(one, brute64(bank, q, 3), rtol=2e-7, atol=1e-6)
    threads_before = torch.get_num_threads()
    monkeypatch.setattr(ix, "PRUNED_MIN_BANK", 1000)
    assert isinstance(build_index(bank, "flat"), ix.PrunedFlatIndex)  # narrow banks: clusters prune well
    monkeypatch.setattr(ix, "SCREENED_MIN_DIM", 12)
    index = build_index(bank, "flat")
    assert isinstance(index, ScreenedFlatIndex) and index.kind == "flat"
    assert index.bank is not None and index.bank.shape == bank.shape
    np.testing.assert_allclose(index.search(torch.from_numpy(q), 1), brute64(bank, q, 1), rtol=2e-7, atol=1e-6)
    assert torch.get_num_threads() == threads_before


def test_screened_exact_with_large_norms_and_tiny_distances():
    """Vectors far from the origin with neighbours close together: float32's
    ||q||^2 - 2 q.b + ||b||^2 cannot separate the neighbours here (its round-off exceeds the gaps);
    the round-off bound widens the screen and the float64 re-check picks the right rows."""
    from patchknn.index.screened import BoundedFlatIndex, ScreenedFlatIndex

    rng = np.random.default_rng(3)
    d = 64
    bank = (300.0 + rng.normal(scale=0.01, size=(3000, d))).astype(np.float32)
    q = (300.0 + rng.normal(scale=0.01, size=(40, d))).astype(np.float32)
    exact = brute64(bank, q, 2)
    naive = TorchFlatIndex("cpu").build(bank).search(q, 2)
    assert np.abs(naive - exact).max() > 1e-3  # the plain float32 expansion is visibly off here
    got = ScreenedFlatIndex(head_dim=8, threads=1, chunk_rows=256).build(bank).search(q, 2)
    np.testing.assert_allclose(got, exact, rtol=2e-7, atol=1e-7)
    # the bound itself: |LB computed in float32 - LB in float64| <= E for every pair
    state = BoundedFlatIndex(bank, head_dim=8)
    qt = torch.from_numpy(q)
    p = state.head_dim
    qa = torch.empty((len(q), p + 1))
    qa[:, :p] = qt[:, state.columns[:p]]
    qa[:, p] = qt[:, state.columns[p:]].double().norm(dim=1)
    lb32 = torch.addmm(state.aug_sq[None, :], qa, state.aug.T, alpha=-2.0).double() + (qa.double() ** 2).sum(1)[:, None]
    lb64 = torch.cdist(qa.double(), state.aug.double()) ** 2
    err = state._error_bound(qt.double().norm(dim=1))
    assert ((lb32 - lb64).abs() <= err[:, None]).all()
    assert (lb32 - lb64).abs().max() > 1e-3 * err.min()  # and the check is not vacuous


def test_int8_screen_bounds_never_exceed_the_distance():
    """The int8 screen (:mod:`patchknn.index.quantized`): for every (query, row) pair of a bank
    with a decaying spectrum, the pair's lower bound is <= its float64 squared distance and is not
    vacuous, and every row whose bound is <= ``u`` passes its chunk's integer threshold."""
    from patchknn.index.quantized import QuantizedBounds

    rng = np.random.default_rng(5)
    n, d = 3000, 300
    scale = np.linspace(2.0, 0.1, d) ** 1.5
    bank = (rng.normal(size=(n, d)) * scale).astype(np.float32)
    q = (rng.normal(size=(40, d)) * scale).astype(np.float32)
    q[:5] *= 3.0  # beyond the bank's spread
    q[5:10] = bank[:5] + 1e-4  # next to bank rows
    state = QuantizedBounds(bank, head_dim=64, chunk_rows=512, pilot_rows=1024)
    enc = state.encode(torch.from_numpy(q))
    assert bool((enc.kappa >= 1).all())
    # R' of every pair (rows in screening order), chunk by chunk as the screen computes it
    prod = torch.cat([state.product(enc.codes, ci).to(torch.int32) for ci in range(len(state.bounds))], 1)
    qi = torch.arange(len(q)).repeat_interleave(n)
    ri = torch.arange(n).repeat(len(q))
    low = state.pair_lower_bound(enc, qi, ri, prod.reshape(-1))
    diff = torch.from_numpy(q).double()[qi] - torch.from_numpy(bank).double()[state.order[ri]]
    true = (diff * diff).sum(1)
    assert bool((low <= true).all())
    assert float((low / true).median()) > 0.5  # and the bound is informative
    u = true.view(len(q), n).quantile(0.05, dim=1)  # some per-query radius
    for ci, (a, b) in enumerate(state.bounds):
        thr = state.chunk_threshold(enc, ci, u)
        inside = low.view(len(q), n)[:, a:b] <= u[:, None]
        assert bool((prod[:, a:b][inside] >= thr[:, None].expand(-1, b - a)[inside]).all())


def test_int8_and_float32_screens_agree_and_far_queries_fall_back(clustered):
    """Both screens give the float64 scan's answers bit for bit; a query far outside the int8
    range (its scale factor below 1) is screened in float32, still exactly."""
    from patchknn.index.screened import ScreenedFlatIndex

    bank, q = clustered
    q = np.concatenate([q, 1e4 * q[:2]])
    screens = ("int8", "float32")
    got = {s: ScreenedFlatIndex(head_dim=8, threads=1, chunk_rows=512, screen=s).build(bank) for s in screens}
    one, two = (got[s].search(q, 3) for s in screens)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_allclose(one, brute64(bank, q, 3), rtol=2e-7, atol=1e-6)
    assert got["int8"].stats["int8_kept"] > 0 and got["int8"].stats["rechecked"] < got["int8"].stats["screened"]
    assert bool((got["int8"]._index.encode(torch.from_numpy(q[-2:])).kappa < 1).all())
    with pytest.raises(ValueError, match="screen"):
        ScreenedFlatIndex(screen="int4")


def test_pruned_stats_are_the_same_on_one_or_two_threads(clustered):
    """The counters of the pruned search are per block, summed under a lock: splitting the work
    over threads neither loses nor adds counts (each query's work does not depend on the split)."""
    from patchknn.index import PrunedFlatIndex

    bank, q = clustered
    q = np.repeat(q, 20, axis=0)
    counts = []
    for threads in (1, 2):
        index = PrunedFlatIndex(nlist=40, threads=threads).build(bank)
        index.search(q, 2)
        counts.append(dict(index.stats))
    assert counts[0] == counts[1] and counts[0]["queries"] == len(q) and counts[0]["pairs"] > 0


def _onednn_int8_or_skip() -> None:
    """oneDNN's int8 linear layer is only chosen on a CPU with AMX (``int8_backend``); elsewhere it is
    not exact (its products differed from ``torch._int_mm`` on a 2-core AMD EPYC without AMX) and the
    screen must keep ``_int_mm``: assert that, then skip the comparison of the two kernels."""
    from patchknn.index import quantized

    if not torch.cpu._is_amx_tile_supported():
        assert quantized.int8_backend() == "int_mm"
        pytest.skip("no AMX: oneDNN's int8 layer is never chosen here (int8_backend keeps _int_mm)")


def test_int8_products_of_both_kernels_are_the_same_integers(clustered, monkeypatch):
    """The int8 screen's product runs on ``torch._int_mm`` or, where it is faster (AMX), oneDNN's int8
    linear layer with a float32 output: both give the same exact integers for every chunk, and the
    index the same answers bit for bit. Codes too wide for float32 to hold their sums keep _int_mm."""
    from patchknn.index import quantized
    from patchknn.index.screened import ScreenedFlatIndex

    bank, q = clustered
    if not quantized.int8_matmul_available():
        pytest.skip("this torch has no CPU int8 matrix product")
    _onednn_int8_or_skip()
    answers, states = {}, {}
    for backend in ("int_mm", "onednn"):
        monkeypatch.setattr(quantized, "int8_backend", lambda b=backend: b)
        try:
            index = ScreenedFlatIndex(head_dim=8, threads=1, chunk_rows=512, screen="int8").build(bank)
        except (AttributeError, RuntimeError) as exc:  # a torch without oneDNN's int8 linear layer
            pytest.skip(f"oneDNN int8 linear not available: {exc}")
        states[backend] = index._index
        assert index._index.backend == backend
        answers[backend] = index.search(q, 3)
    np.testing.assert_array_equal(answers["int_mm"], answers["onednn"])
    enc = states["int_mm"].encode(torch.from_numpy(q))
    for ci in range(len(states["int_mm"].bounds)):
        one = states["int_mm"].product(enc.codes, ci)
        two = states["onednn"].product(enc.codes, ci)
        assert one.dtype == torch.int32 and two.dtype == torch.float32
        assert torch.equal(two.to(torch.int32), one) and bool((two == one.to(torch.float32)).all())
    assert quantized.ONEDNN_MAX_COLUMNS * 255 * 127 < 2**24


def test_onednn_int8_product_is_exact_up_to_its_column_limit():
    """oneDNN's int8 linear layer gives ``torch._int_mm``'s integers at the widest code it is used for
    (:data:`~patchknn.index.quantized.ONEDNN_MAX_COLUMNS`), with the codes at their extremes."""
    from patchknn.index import quantized

    if not quantized.int8_matmul_available():
        pytest.skip("this torch has no CPU int8 matrix product")
    _onednn_int8_or_skip()
    cols = quantized.ONEDNN_MAX_COLUMNS
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (48, cols), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (96, cols), dtype=torch.int8, generator=gen)
    q[0], q[1], w[0], w[1] = 127, -127, 127, -127
    try:
        packed = torch.ops.onednn.qlinear_prepack(w, list(q.shape))
    except (AttributeError, RuntimeError) as exc:
        pytest.skip(f"oneDNN int8 linear not available: {exc}")
    got = quantized._onednn_product(q, packed, torch.ones(len(w)), torch.zeros(len(w), dtype=torch.int64))
    ref = torch._int_mm(q, w.t())
    assert got.dtype == torch.float32
    assert torch.equal(got.to(torch.int32), ref)
    assert int(ref.abs().max()) == 127 * 127 * cols
