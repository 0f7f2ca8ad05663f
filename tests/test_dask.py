"""The dask backend on a LocalCluster of two worker processes, against single-machine runs.

One cluster serves the whole module (started once, shut down at the end). Its workers are
separate processes that inherit LAZYMAT_CACHE_DIR, so they load the kernels this process
compiled (and compile the others once, under the cache's lock).
"""

from __future__ import annotations

import os
import pickle
import signal
import time

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")

import lazymat as lm  # noqa: E402
from lazymat.backends import dask as dask_backend  # noqa: E402

# Small blocks, so that a few hundred rows give a grid of tasks and a merge tree of depth > 1.
SMALL = {"lazymat.rows-per-task": 80, "lazymat.columns-per-task": 80, "lazymat.split-every": 2}


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", silence_logs=40)
    c = distributed.Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def _data(dtype, rng, m=157, n=211, d=2):
    x = rng.random((m, d)).astype(dtype)
    y = rng.random((n, d)).astype(dtype)
    b = rng.standard_normal((n, 2)).astype(dtype)  # j-weights
    c = rng.standard_normal((m, 2)).astype(dtype)  # i-weights (reductions over i)
    return x, y, b, c


UNEVEN_X, UNEVEN_Y = (50, 40, 67), (60, 71, 80)

# (name, reduction call): every reduction; F is a LazyTensor, W the weight of its axis.
CASES = [
    ("Sum", lambda F, W, ax: ((-F).exp() * W).sum(dim=ax)),
    ("Min", lambda F, W, ax: F.min(dim=ax)),
    ("Max", lambda F, W, ax: F.max(dim=ax)),
    ("ArgMin", lambda F, W, ax: F.argmin(dim=ax)),
    ("ArgMax", lambda F, W, ax: F.argmax(dim=ax)),
    ("Min_ArgMin", lambda F, W, ax: F.min_argmin(dim=ax)),
    ("Max_ArgMax", lambda F, W, ax: F.max_argmax(dim=ax)),
    ("KMin", lambda F, W, ax: F.Kmin(4, dim=ax)),
    ("ArgKMin", lambda F, W, ax: F.argKmin(4, dim=ax)),
    ("KMin_ArgKMin", lambda F, W, ax: F.Kmin_argKmin(4, dim=ax)),
    ("LogSumExp", lambda F, W, ax: (-F * 3).logsumexp(dim=ax)),
    ("LogSumExp weighted", lambda F, W, ax: (-F * 3).logsumexp(dim=ax, weight=W.exp())),
    ("SumSoftMaxWeight", lambda F, W, ax: (-F * 3).sumsoftmaxweight(W, dim=ax)),
]
EXACT = {"Min", "Max", "ArgMin", "ArgMax", "Min_ArgMin", "Max_ArgMax", "KMin", "ArgKMin",
         "KMin_ArgKMin"}


def _as_tuple(r):
    return r if isinstance(r, tuple) else (r,)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_reduction_both_axes_uneven_chunks(client, dtype, rng):
    x, y, b, c = _data(dtype, rng)
    xd, yd = da.from_array(x, chunks=(UNEVEN_X, 2)), da.from_array(y, chunks=(UNEVEN_Y, 2))
    bd, cd = da.from_array(b, chunks=(UNEVEN_Y, 2)), da.from_array(c, chunks=(UNEVEN_X, 2))
    lazy, expected, labels = [], [], []
    with dask.config.set(SMALL):
        for label, call in CASES:
            for ax in (0, 1):
                W, Wd = (lm.Vj(b), lm.Vj(bd)) if ax == 1 else (lm.Vi(c), lm.Vi(cd))
                out = _as_tuple(call(lm.Vi(xd).sqdist(lm.Vj(yd)), Wd, ax))
                assert all(isinstance(o, da.Array) for o in out), label
                lazy.append(out)
                expected.append(_as_tuple(call(lm.Vi(x).sqdist(lm.Vj(y)), W, ax)))
                labels.append(f"{label} axis={ax}")
    computed = dask.compute(*lazy)
    rtol = 2e-6 if dtype == "float32" else 1e-13
    for label, got, want in zip(labels, computed, expected):
        assert len(got) == len(want), label
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype, (label, g.shape, w.shape)
            if label.split()[0] in EXACT:
                np.testing.assert_array_equal(g, w, err_msg=label)  # bit for bit
            else:
                np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol, err_msg=label)


def test_global_indices_of_knn(client, rng):
    # y is a permutation of x: each x_i's nearest y_j is its own copy, far from chunk 0.
    x = rng.random((300, 3))
    perm = rng.permutation(300)
    y = x[perm]
    xd, yd = da.from_array(x, chunks=70), da.from_array(y, chunks=45)
    with dask.config.set(SMALL):
        idx = lm.Vi(xd).sqdist(lm.Vj(yd)).argKmin(3, dim=1)
    got = idx.compute()
    assert got.dtype == np.int64 and got.shape == (300, 3)
    np.testing.assert_array_equal(perm[got[:, 0]], np.arange(300))
    np.testing.assert_array_equal(got, lm.Vi(x).sqdist(lm.Vj(y)).argKmin(3, dim=1))


def test_mixed_numpy_and_dask_operands_and_backend_dask(client, rng):
    x, y, b, _ = _data("float64", rng)
    xd = da.from_array(x, chunks=(UNEVEN_X, 2))
    want = ((-lm.Vi(x).sqdist(lm.Vj(y))).exp() * lm.Vj(b)).sum(dim=1)
    with dask.config.set(SMALL):
        mixed = ((-lm.Vi(xd).sqdist(lm.Vj(y))).exp() * lm.Vj(b)).sum(dim=1)
        chunked_here = ((-lm.Vi(x).sqdist(lm.Vj(y))).exp() * lm.Vj(b)).sum(dim=1,
                                                                            backend="dask")
    assert isinstance(mixed, da.Array) and isinstance(chunked_here, da.Array)
    # chunked like x, each chunk split to the task size
    assert set(np.cumsum(UNEVEN_X)) <= set(np.cumsum(mixed.chunks[0]))
    np.testing.assert_allclose(mixed.compute(), want, rtol=1e-13)
    np.testing.assert_allclose(chunked_here.compute(), want, rtol=1e-13)
    # K @ v and Genred take dask arrays too
    K = (-lm.Vi(xd).sqdist(lm.Vj(y))).exp()
    np.testing.assert_allclose((K @ da.from_array(b[:, 0], chunks=100)).compute(),
                               (-lm.Vi(x).sqdist(lm.Vj(y))).exp() @ b[:, 0], rtol=1e-13)
    g = lm.Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(2)", "y = Vj(2)", "b = Vj(2)"],
                  reduction_op="Sum", axis=1)
    np.testing.assert_allclose(g(xd, y, da.from_array(b, chunks=50)).compute(), want,
                               rtol=1e-13)


def test_out_and_half_precision(client, rng):
    x, y, b, _ = _data("float64", rng)
    xd = da.from_array(x, chunks=(UNEVEN_X, 2))
    want = lm.Vi(x).sqdist(lm.Vj(y)).sum(dim=1)
    out = np.zeros((157, 1))
    got = lm.Vi(xd).sqdist(lm.Vj(y)).sum(dim=1, out=out)  # out= computes into out
    assert got is out
    np.testing.assert_allclose(out, want, rtol=1e-13)
    half = lm.Vi(xd.astype(np.float16)).sqdist(lm.Vj(y.astype(np.float16))).min_argmin(dim=1)
    assert isinstance(half[0], da.Array) and half[0].dtype == np.float16
    want_half = lm.Vi(x.astype(np.float16)).sqdist(lm.Vj(y.astype(np.float16))).min_argmin(1)
    for g, w in zip(dask.compute(*half), want_half):
        np.testing.assert_array_equal(g, w)


def test_batch_dims(client, rng):
    # pykeops layout: x (2, 3, M, 1, D), y (1, 3, 1, N, D) broadcast along the first batch
    # dim, a parameter per batch (2, 3, 1, 1, 1); batch dims chunked too (rechunked)
    x = rng.random((2, 3, 40, 1, 2))
    y = rng.random((1, 3, 1, 50, 2))
    p = rng.random((2, 3, 1, 1, 1)) + 0.5
    xd = da.from_array(x, chunks=(1, 2, 15, 1, 2))
    pd = da.from_array(p, chunks=1)

    def reductions(X, Y, P):
        F = lm.LazyTensor(X).sqdist(lm.LazyTensor(Y))
        return ((-(F * lm.LazyTensor(P))).exp().sum(dim=3),) + F.Kmin_argKmin(2, dim=2)

    with dask.config.set(SMALL):
        got = dask.compute(*reductions(xd, y, pd))
    for g, w in zip(got, reductions(x, y, p)):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-13)
    np.testing.assert_array_equal(got[1:], reductions(x, y, p)[1:])


def test_symbolic_gradient(client, rng):
    x, y, b, _ = _data("float64", rng)
    e = rng.standard_normal((157, 1))
    xd, ed = da.from_array(x, chunks=(UNEVEN_X, 2)), da.from_array(e, chunks=(UNEVEN_X, 1))
    X, Xd = lm.Vi(x), lm.Vi(xd)
    with dask.config.set(SMALL):
        got = ((-Xd.sqdist(lm.Vj(y))).exp() * lm.Vj(b[:, :1])).grad(Xd, lm.Vi(ed)).sum(dim=1)
    want = ((-X.sqdist(lm.Vj(y))).exp() * lm.Vj(b[:, :1])).grad(X, lm.Vi(e)).sum(dim=1)
    # the dense gradient: d/dx_i Σ_j exp(-|x_i - y_j|²) b_j e_i
    k = np.exp(-((x[:, None] - y[None]) ** 2).sum(-1))
    dense = (-2 * (x[:, None] - y[None]) * (k * b[None, :, 0])[..., None]).sum(1) * e
    np.testing.assert_allclose(got.compute(), want, rtol=1e-12)
    np.testing.assert_allclose(want, dense, rtol=1e-10)


def test_kernel_solve_with_dask_inputs(client, rng):
    # A well-conditioned system: a few CG iterations (each one: a distributed matvec and two
    # scheduler round trips for the dot products)
    x = rng.random((300, 2))
    rhs = rng.random((300, 1))
    xd, bd = dask.persist(da.from_array(x, chunks=150), da.from_array(rhs, chunks=150))
    K = (-lm.Vi(xd).sqdist(lm.Vj(xd)) * 400).exp()
    info: dict = {}
    a = K.solve(bd, alpha=10.0, eps=1e-6, info=info)
    assert isinstance(a, da.Array)
    a = a.compute()
    Kn = (-lm.Vi(x).sqdist(lm.Vj(x)) * 400).exp()
    residual = 10 * a + Kn @ a - rhs  # the guarantee of the single-machine solve
    assert (residual ** 2).sum() < 300 * 1e-12
    np.testing.assert_allclose(a, Kn.solve(rhs, alpha=10.0, eps=1e-6), rtol=1e-5)
    assert 0 < info["iterations"] < 30
    with pytest.raises(lm.ShapeError, match="dask"):
        K.solve(bd, alpha=10.0, precond="schwarz")
    ks = lm.KernelSolve("Exp(-SqDist(x, y) * g) * a", ["x = Vi(2)", "y = Vj(2)", "a = Vj(1)",
                                                        "g = Pm(1)"], "a", axis=1)
    np.testing.assert_allclose(ks(xd, xd, bd, np.array([400.0]), alpha=10.0, eps=1e-6)
                               .compute(), a, rtol=1e-5)


def test_tasks_pickle_and_have_readable_names(client, rng, monkeypatch, capfd):
    x, y, b, _ = _data("float32", rng)
    xd = da.from_array(x, chunks=(UNEVEN_X, 2))
    monkeypatch.setenv("LAZYMAT_VERBOSE", "1")
    with dask.config.set(SMALL):
        s = ((-lm.Vi(xd).sqdist(lm.Vj(y))).exp() * lm.Vj(b)).sum(dim=1)
    err = capfd.readouterr().err
    assert "[lazymat] dask Sum:" in err and "block tasks" in err and "merge tasks" in err
    assert s.name.startswith("lazymat-Sum-")
    from dask.utils import key_split

    graph = dict(s.__dask_graph__())
    ours = {k: v for k, v in graph.items() if key_split(k).startswith("lazymat-")}
    names = {key_split(k) for k in ours}
    assert {"lazymat-Sum-block", "lazymat-Sum-merge", "lazymat-Sum"} <= names, names
    jobs = []
    for key, task in ours.items():  # plain pickle: no lambda, no ctypes handle in a task
        back = pickle.loads(pickle.dumps(task))
        assert type(back) is type(task), key
        args = task[1:] if isinstance(task, tuple) else getattr(task, "args", ())
        jobs += [a for a in args if isinstance(a, dask_backend.BlockJob)]
    assert jobs, "no task carries its BlockJob"
    again = pickle.loads(pickle.dumps(jobs[0]))
    assert again == jobs[0] and again.formula is jobs[0].formula  # nodes re-interned


def test_errors_before_anything_runs(client, rng):
    x, y, b, _ = _data("float64", rng)
    xd = da.from_array(x, chunks=50)
    with pytest.raises(lm.ShapeError, match="rows"):
        (lm.Vi(xd).sqdist(lm.Vj(y)) * lm.Vi(da.from_array(x[:100], chunks=50))).sum(dim=1)
    with pytest.raises(lm.ShapeError, match="ranges"):
        lm.Vi(xd).sqdist(lm.Vj(y)).sum(dim=1, ranges=lm.from_matrix(
            np.array([[0, 1]]), np.array([[0, 2]]), np.ones((1, 1), bool)))
    with pytest.raises(lm.ShapeError, match="K = 500"):
        lm.Vi(xd).sqdist(lm.Vj(y)).argKmin(500, dim=1)
    with pytest.raises(lm.DtypeError):
        lm.Vi(xd).sqdist(lm.Vj(y.astype(np.float32))).sum(dim=1)
    torch = pytest.importorskip("torch")
    with pytest.raises(lm.DtypeError, match="torch"):
        lm.Vi(xd).sqdist(lm.Vj(torch.from_numpy(y))).sum(dim=1)


def test_empty_reduction_gives_the_identity():
    x = np.zeros((5, 2))
    y = np.zeros((0, 2))
    s = lm.Vi(x).sqdist(lm.Vj(y)).sum(dim=1, backend="dask")
    m = lm.Vi(x).sqdist(lm.Vj(y)).min(dim=1, backend="dask")
    # plan answers empty reductions itself (no task to run)
    np.testing.assert_array_equal(np.asarray(s), np.zeros((5, 1)))
    assert np.isposinf(np.asarray(m)).all()


def test_worker_killed_mid_run(client, rng):
    # Last in the module: it kills a worker (its nanny starts a new one).
    x = rng.random((8000, 3)).astype("float32")
    y = rng.random((8000, 3)).astype("float32")
    want = lm.Vi(x).sqdist(lm.Vj(y)).min_argmin(dim=1)
    xd, yd = da.from_array(x, chunks=1000), da.from_array(y, chunks=1000)
    with dask.config.set({"lazymat.pairs-per-task": 1000 * 2000}):
        v, i = lm.Vi(xd).sqdist(lm.Vj(yd)).min_argmin(dim=1)
    futures = client.compute([v, i])
    pids = client.run(os.getpid)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until some block tasks are done, then kill
        done = [k for keys in client.has_what().values() for k in keys
                if "lazymat-Min_ArgMin-block" in str(k)]
        if len(done) >= 3:
            break
        time.sleep(0.01)
    assert not all(f.done() for f in futures), "the run ended before the kill: make it longer"
    victim = max(client.has_what().items(), key=lambda kv: len(kv[1]))[0]
    os.kill(pids[victim], signal.SIGKILL)
    got_v, got_i = client.gather(futures)
    np.testing.assert_array_equal(got_v, want[0])
    np.testing.assert_array_equal(got_i, want[1])
    client.wait_for_workers(2, timeout=60)
