"""Large sizes, run by ``make test-slow`` (seconds each): the README's example at full size."""

from __future__ import annotations

import numpy as np
import pytest

import lazymat as lm

pytestmark = pytest.mark.slow


def test_readme_example_full_size():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((100_000, 3)), rng.standard_normal((200_000, 3))
    b = rng.standard_normal((200_000, 1))
    x_i, y_j = lm.Vi(x), lm.Vj(y)
    K = (-x_i.sqdist(y_j) / 2).exp()
    a = K @ b
    rows = rng.choice(len(x), 50, replace=False)
    d = ((x[rows, None] - y[None]) ** 2).sum(-1)
    np.testing.assert_allclose(a[rows], np.exp(-d / 2) @ b, rtol=1e-10, atol=1e-10)
    idx = x_i.sqdist(y_j).argKmin(K=10, dim=1)
    assert idx.shape == (100_000, 10) and idx.dtype == np.int64
    np.testing.assert_array_equal(np.sort(idx[rows], 1),
                                  np.sort(np.argsort(d, 1, kind="stable")[:, :10], 1))


def test_float32_sum_of_ten_million_terms():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 3)).astype(np.float32)
    y = rng.standard_normal((10_000_000, 3)).astype(np.float32)
    got = (-lm.Vi(x).sqdist(lm.Vj(y))).exp().sum(dim=1)
    x64 = x.astype(np.float64)
    want = sum(np.exp(-((x64[:, None] - y[j:j + 10 ** 6][None]) ** 2).sum(-1)).sum(1)
               for j in range(0, len(y), 10 ** 6))
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-5)
