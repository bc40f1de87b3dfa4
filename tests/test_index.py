import numpy as np
import pytest

from patchknn.errors import ConfigError, NotFittedError
from patchknn.index import MemoryBankIndex


def brute(bank, q, k):
    d = np.sqrt(((q[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, :k]


@pytest.mark.parametrize("k", [1, 3])
def test_flat_equals_brute_force(k):
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(500, 16)).astype(np.float32)
    q = rng.normal(size=(40, 16)).astype(np.float32)
    got = MemoryBankIndex().build(bank).search(q, k)
    np.testing.assert_allclose(got, brute(bank, q, k), rtol=1e-4, atol=1e-4)


def test_errors():
    with pytest.raises(NotFittedError):
        MemoryBankIndex().search(np.zeros((1, 2), np.float32))
    idx = MemoryBankIndex().build(np.zeros((3, 2), np.float32))
    with pytest.raises(ConfigError, match="larger than the memory bank"):
        idx.search(np.zeros((1, 2), np.float32), k=4)
    with pytest.raises(ConfigError):
        MemoryBankIndex().build(np.zeros((0, 2), np.float32))
