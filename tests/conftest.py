"""Shared helpers for the lazymat tests: data, dense numpy oracles, tolerances, libraries.

Helpers are plain functions (import them with ``from conftest import ...``) and,
where handy, fixtures. Torch is optional: every torch-dependent test goes
through :data:`TORCH` / :func:`requires_torch` / the ``lib`` parameters, and
skips cleanly when torch is missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

# Compiled kernels persist between runs (a few hundred, ~0.2 s each the first time).
os.environ.setdefault("LAZYMAT_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / ".cache" / "lazymat"))

try:  # torch is optional for lazymat: tests that need it skip without it
    import torch as TORCH
except Exception:  # noqa: BLE001
    TORCH = None

requires_torch = pytest.mark.skipif(TORCH is None, reason="torch is not installed")

DTYPES = ("float32", "float64")

#: (rtol, atol): atol is relative to the magnitude of what is compared (see assert_close).
TOL = {"float32": (1e-4, 1e-5), "float64": (1e-10, 1e-10)}

#: libraries: numpy always, torch when installed (skipped otherwise)
LIBS = ["numpy", pytest.param("torch", marks=requires_torch)]


# --------------------------------------------------------------------------- fixtures

@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(params=DTYPES)
def dtype(request) -> str:
    return request.param


@pytest.fixture(params=LIBS)
def lib(request) -> str:
    return request.param


@pytest.fixture
def torch():
    """The torch module, or skip."""
    if TORCH is None:
        pytest.skip("torch is not installed")
    return TORCH


@pytest.fixture
def no_compile(monkeypatch):
    """Spy on kernel compilation: ``assert_none()`` fails if anything compiled or launched.

    Counts both the compile cache's counter and the calls to the CPU backend's
    ``kernel_for`` (a kernel found on disk does not bump the counter, the call does).
    """
    from lazymat.backends import cpu
    from lazymat.compile import stats

    calls: list = []
    real = cpu.kernel_for

    def spy(spec):
        calls.append(spec)
        return real(spec)

    monkeypatch.setattr(cpu, "kernel_for", spy)

    class Spy:
        compiles_before = stats["compiles"]

        @staticmethod
        def assert_none() -> None:
            assert stats["compiles"] == Spy.compiles_before, "a kernel was compiled"
            assert not calls, f"a kernel was built/launched before the error: {calls[0]}"

    return Spy


# --------------------------------------------------------------------------- conversions

def count_prepares(monkeypatch) -> list[int]:
    """A one-element list counting the calls that take the general path (plan.prepare:
    validation, orientation, set-up) from now on."""
    import lazymat.plan as plan

    calls = [0]
    real = plan.prepare

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(plan, "prepare", counting)
    return calls


def to_lib(arr: Any, lib: str = "numpy", dtype: str = "float64") -> Any:
    """numpy array -> numpy or torch (CPU) array of the given float dtype (a copy)."""
    a = np.array(arr, dtype=dtype)
    if lib == "numpy":
        return a
    if lib == "torch":
        if TORCH is None:
            pytest.skip("torch is not installed")
        return TORCH.from_numpy(a)
    raise ValueError(lib)


def to_np(a: Any) -> np.ndarray:
    """Any array (numpy / torch) -> numpy, keeping the dtype."""
    if TORCH is not None and isinstance(a, TORCH.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def as64(a: Any) -> np.ndarray:
    """Any array -> float64 numpy (the oracle always computes in float64)."""
    return to_np(a).astype(np.float64)


def check_type(result: Any, lib: str, dtype: str) -> None:
    """The result lives in the inputs' library with the inputs' dtype."""
    if lib == "torch":
        assert isinstance(result, TORCH.Tensor), type(result)
        assert result.dtype == getattr(TORCH, dtype), result.dtype
    else:
        assert isinstance(result, np.ndarray), type(result)
        assert result.dtype == np.dtype(dtype), result.dtype


def check_index(result: Any, lib: str = "numpy") -> None:
    if lib == "torch":
        assert isinstance(result, TORCH.Tensor) and result.dtype == TORCH.int64, result.dtype
    else:
        assert isinstance(result, np.ndarray) and result.dtype == np.int64, result.dtype


# --------------------------------------------------------------------------- oracles

def dense(fn: Callable[..., Any], i: tuple = (), j: tuple = (), p: tuple = ()) -> np.ndarray:
    """The dense (M, N, D) float64 matrix of F = fn(*i_vars, *j_vars, *params).

    i-variables (M, D) are seen as (M, 1, D), j-variables (N, D) as (1, N, D),
    parameters (D,) as (1, 1, D); the result is broadcast to (M, N, D).
    """
    iv = [as64(a).reshape(len(a), 1, -1) for a in i]
    jv = [as64(a).reshape(1, len(a), -1) for a in j]
    pv = [as64(a).reshape(1, 1, -1) for a in p]
    M = iv[0].shape[0] if iv else 1
    N = jv[0].shape[1] if jv else 1
    with np.errstate(all="ignore"):
        out = np.asarray(fn(*iv, *jv, *pv), dtype=np.float64)
    return np.broadcast_to(out, (M, N, out.shape[-1])).copy()


def sqdist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(M, N) squared distances, float64."""
    x, y = as64(x), as64(y)
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def assert_close(got: Any, want: Any, dtype: str, mag: Any = None, err_msg: str = "") -> None:
    """|got - want| <= rtol |want| + atol * magnitude.

    ``mag`` is the magnitude of the terms that produced ``want`` (e.g. Σ_j |F_ij|
    for a sum, so cancellation is not held against float32); by default the
    largest |want| (at least 1).
    """
    rtol, atol = TOL[dtype]
    g, w = as64(got), as64(want)
    assert g.shape == w.shape, f"shape {g.shape} != expected {w.shape} {err_msg}"
    if mag is None:
        finite = np.abs(w[np.isfinite(w)])
        mag = max(1.0, float(finite.max())) if finite.size else 1.0
    bound = rtol * np.abs(w) + atol * np.asarray(mag, dtype=np.float64)
    same_inf = (g == w)  # infinities must match exactly
    ok = same_inf | (np.abs(g - w) <= bound) | (np.isnan(g) & np.isnan(w))
    if not ok.all():
        bad = np.argwhere(~ok)[:5]
        details = "; ".join(f"{tuple(b)}: got {g[tuple(b)]!r} want {w[tuple(b)]!r}" for b in bad)
        raise AssertionError(f"{(~ok).sum()} of {ok.size} values differ ({dtype}) {err_msg}: "
                             f"{details}")
