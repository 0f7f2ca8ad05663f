"""Performance contracts that can fail without a stopwatch: kernels compiled once per formula
(every Python float a parameter), the bound-call cache of small calls, fused backward passes.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import requires_torch, sqdist

from lazymat import Pm, Vi, Vj
from lazymat.backends import cpu as cpu_backend
from lazymat.compile import stats
from lazymat.formula import variables

# ------------------------------------------------------------- every Python float is a parameter

#: one formula per way a Python float enters: each must compile once for all of FLOATS
FLOAT_CASES = {
    "mul": lambda x, y, c: (-(Vi(x).sqdist(Vj(y))) * c).exp(),
    "rmul": lambda x, y, c: c * Vi(x).sqdist(Vj(y)),
    "add": lambda x, y, c: Vi(x).sqdist(Vj(y)) + c,
    "rsub": lambda x, y, c: c - Vi(x).sqdist(Vj(y)),
    "div": lambda x, y, c: Vi(x).sqdist(Vj(y)) / c,
    "pow": lambda x, y, c: Vi(x).sqdist(Vj(y)) ** c,
    "clamp": lambda x, y, c: Vi(x).sqdist(Vj(y)).clamp(-1.0, c),
    "pm": lambda x, y, c: Vi(x).sqdist(Vj(y)) * Pm(c),
}
FLOATS = (0.3, 1.0, 2.0, 3.0, -1.0, 2.5)


@pytest.mark.parametrize("case", sorted(FLOAT_CASES))
def test_integer_valued_floats_are_parameters(case):
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0.5, 1.5, (7, 3)), rng.uniform(0.5, 1.5, (5, 3))
    D = sqdist(x, y)[:, :, None]
    dense = {"mul": lambda c: np.exp(-D * c), "rmul": lambda c: c * D, "add": lambda c: D + c,
             "rsub": lambda c: c - D, "div": lambda c: D / c, "pow": lambda c: D ** c,
             "clamp": lambda c: np.clip(D, -1.0, c), "pm": lambda c: D * c}[case]
    make = FLOAT_CASES[case]
    make(x, y, 0.7).sum(dim=1, backend="cpu")  # the one compile (or a cache hit)
    n_kernels, n_compiles = len(cpu_backend.kernels), stats["compiles"]
    for c in FLOATS:
        got = make(x, y, c).sum(dim=1, backend="cpu")
        np.testing.assert_allclose(got, dense(c).sum(1), rtol=1e-12, atol=1e-12)
    assert len(cpu_backend.kernels) == n_kernels, f"{case}: a float compiled a new kernel"
    assert stats["compiles"] == n_compiles


def test_python_ints_stay_exact_constants():
    # Documented: ints are constants of the formula (x * 1 simplifies away, x * 2 is its own
    # formula); floats are parameters even when integer-valued.
    x = Vi(np.ones((3, 2)))
    assert (x * 1).formula is x.formula
    assert (x * 2).formula is not (x * 3).formula
    for c in (1.0, 2.0, -3.0, 0.0):
        cats = sorted(v.params[2] for v in variables((x * c).formula))
        assert cats == [0, 2], c  # x and one parameter, nothing folded
    # two different floats of equal value stay two parameters (else the formula changes)
    f = x.clamp(-1.0, -1.0).formula
    assert sorted(v.params[2] for v in variables(f)) == [0, 2, 2]


@requires_torch
def test_float_parameter_in_a_loop_torch():
    import torch

    x = torch.rand(6, 2, dtype=torch.float64)
    y = torch.rand(4, 2, dtype=torch.float64)
    K = lambda eps: (-(Vi(x).sqdist(Vj(y))) / (2.0 * eps)).exp().sum(dim=1, backend="cpu")
    K(0.25)
    n_kernels = len(cpu_backend.kernels)
    for eps in (0.5, 1.0, 1.5, 2.0):  # 2*eps lands on integers
        d = ((x[:, None] - y[None]) ** 2).sum(-1)
        torch.testing.assert_close(K(eps), torch.exp(-d / (2 * eps)).sum(1, keepdim=True))
    assert len(cpu_backend.kernels) == n_kernels
