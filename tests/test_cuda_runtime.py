"""The CUDA backend on a real GPU; every test here but the first few skips without one.

Run on a GPU machine with ``pytest -m gpu tests/test_cuda_runtime.py`` (add ``-n 8`` with
pytest-xdist: NVRTC compiles in each worker). What is checked:

- every op row of ``test_ops`` and every reduction (both axes, batch dims, block-sparse
  ranges), float32 and float64: the CUDA kernel against the reference backend running
  dense torch on the same GPU, and against the float64 numpy oracle;
- autograd: first and second derivatives of every reduction on the GPU against the same
  computation on the CPU (the backward reductions run on the GPU);
- streams: a reduction queued on a side stream behind a long kernel reads what that kernel
  wrote, and the launch does not wait for it; several GPUs when present;
- numpy inputs with ``backend="cuda"``, float16/bfloat16 inputs, ``KernelSolve``.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TORCH, as64, assert_close
from test_cuda_codegen import SCAFFOLD, reduction_case, scaffold_arrays
from test_ops import NAMES, ROWS, make_data, oracle_sum, variables

import lazymat as lm
from lazymat.errors import CudaUnavailableError
from lazymat.plan import Request, cuda_unavailable_reason, run
from lazymat.reductions import REDUCTIONS

REASON = cuda_unavailable_reason()
requires_gpu = pytest.mark.skipif(REASON is not None, reason=f"no CUDA backend: {REASON}")
DTYPES = ("float32", "float64")


# --------------------------------------------------------------------------- without a GPU

@pytest.mark.skipif(REASON is None, reason="a GPU is here")
@pytest.mark.parametrize("name", ["cuda", "GPU", "gpu_1d"])
def test_cuda_backend_without_gpu_says_what_is_missing(name, no_compile):
    x = np.random.rand(5, 3)
    with pytest.raises(CudaUnavailableError, match="backend='cuda' cannot run here: .+"):
        (lm.Vi(x) * lm.Vj(x)).sum(-1).sum(1, backend=name)


def test_health_report_names_the_cuda_backend():
    report = lm.check_health(verbose=False)
    status = report["cuda_backend"]
    assert status.startswith("ready: ") if REASON is None else status == f"unavailable: {REASON}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs_are_reduced_in_float32(dtype):
    """Same code path on every backend: widen, reduce, return in the inputs' dtype."""
    if TORCH is None:
        pytest.skip("torch is not installed")
    device = "cuda" if REASON is None else "cpu"
    rng = np.random.default_rng(0)
    x, y = rng.random((40, 3)), rng.random((300, 3))
    half = [TORCH.tensor(a, dtype=getattr(TORCH, dtype), device=device) for a in (x, y)]
    got = (-lm.Vi(half[0]).sqdist(lm.Vj(half[1]))).exp().sum(1)
    assert got.dtype == getattr(TORCH, dtype) and got.device.type == device
    want = (-lm.Vi(half[0].double()).sqdist(lm.Vj(half[1].double()))).exp().sum(1)
    eps = 1e-2 if dtype == "bfloat16" else 1e-3  # the output's rounding
    assert TORCH.allclose(got.double(), want, rtol=eps)


# --------------------------------------------------------------------------- helpers

@pytest.fixture
def spy(monkeypatch):
    """Counts launches of the CUDA backend (so a test knows the GPU path ran)."""
    from lazymat.backends import cuda

    calls = []
    real = cuda.run

    def counting(*args, **kwargs):
        calls.append(args[0].red.name)
        return real(*args, **kwargs)

    monkeypatch.setattr(cuda, "run", counting)
    return calls


def on_gpu(arrays, device="cuda"):
    return [TORCH.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays]


def _compare(got, want, dtype, what=""):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.device.type == "cuda", what
        if g.dtype == TORCH.int64:
            assert TORCH.equal(g.cpu(), w.cpu()), what
        else:
            assert_close(g, w, dtype, err_msg=what)


def _ranges(M, N, rng):
    from lazymat.ranges import from_matrix

    def clusters(parts):
        ends = np.cumsum(parts)
        return np.stack([ends - np.array(parts), ends], 1)

    ri = clusters([5, 17, 1, M - 23])
    rj = clusters([10, 3, 200, N - 213])
    keep = rng.random((4, 4)) < 0.6
    keep[0, :] = False  # rows with nothing to reduce: the identity
    return from_matrix(ri, rj, keep)


# --------------------------------------------------------------------------- ops, reductions

@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_op_row_on_gpu(row, dtype, spy):
    data = make_data(row, 13, 300, dtype, seed=11)
    want, mag = oracle_sum(row, data)
    f = row.build(variables(row.pdim))
    arrays = on_gpu([data[n] for n in NAMES])
    (got,) = run(Request("Sum", f), arrays, backend="cuda")
    (ref,) = run(Request("Sum", f), arrays, backend="reference")
    assert spy == ["Sum"] and got.device.type == "cuda"
    assert_close(got, want, dtype, mag=mag, err_msg=f"cuda vs dense numpy, {row.id}")
    assert_close(got, ref, dtype, mag=mag, err_msg=f"cuda vs reference on the GPU, {row.id}")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
def test_reduction_on_gpu(reduction, dtype, axis, split, monkeypatch):
    """Batch dims (broadcast), block-sparse ranges, partial tiles, both axes; with the
    columns cut into parts (as for small M) and without."""
    from lazymat.backends import cuda, launch

    combined = []
    real = launch.combine
    monkeypatch.setattr(launch, "combine", lambda *a: combined.append(1) or real(*a))
    if split:
        monkeypatch.setattr(cuda, "MIN_CHUNK", 64)
    rng = np.random.default_rng(7)
    M, N = 300, 1000
    arrays = [rng.standard_normal((2, M, 3)), rng.standard_normal((2, N, 3)),
              rng.random((1, N, 2)) + 0.1, rng.random((2, 1)) + 0.5]
    arrays = on_gpu([a.astype(dtype) for a in arrays])
    f, w, K = reduction_case(reduction)
    req = Request(reduction, f, K=K, weight=w, axis=axis)
    for ranges in (None, _ranges(M, N, rng)):
        for a in (arrays, [t[0] for t in arrays[:3]] + [arrays[3][0]]):  # with, without batch
            got = run(req, a, backend="cuda", ranges=ranges)
            want = run(req, a, backend="reference", ranges=ranges)
            _compare(got, want, dtype, f"{reduction} axis={axis} ranges={ranges is not None}")
    assert bool(combined) == split


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("case", list(SCAFFOLD))
def test_scaffold_case_on_gpu(case):
    """Long dot products, dims too large for the shared tile, unused arguments."""
    name, f, w, K, _ = SCAFFOLD[case]
    arrays, dtype = scaffold_arrays(case, 190, 230)
    arrays = on_gpu(arrays)
    req = Request(name, f, K=K, weight=w)
    _compare(run(req, arrays, backend="cuda"), run(req, arrays, backend="reference"), dtype,
             case)


@pytest.mark.gpu
@requires_gpu
def test_large_gaussian_sum_matches_dense_torch(spy):
    rng = np.random.default_rng(5)
    x, y, b = on_gpu([rng.random((20_000, 3), np.float32), rng.random((50_000, 3), np.float32),
                      rng.standard_normal((50_000, 2)).astype(np.float32)])
    got = ((-lm.Vi(x).sqdist(lm.Vj(y)) * 20).exp() * lm.Vj(b)).sum(1)
    want = TORCH.cat([TORCH.exp(-TORCH.cdist(x[k:k + 2000].double(), y.double()) ** 2 * 20)
                      @ b.double() for k in range(0, 20_000, 2000)])
    assert spy == ["Sum"]
    assert_close(got, want, "float32")


# --------------------------------------------------------------------------- autograd

def _autodiff_cases():
    from test_autodiff import REDUCTION_CASES

    return REDUCTION_CASES


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", ["Sum", "LogSumExp", "LogSumExp-weight", "SumSoftMaxWeight",
                                  "Min", "Max", "Min_ArgMin", "KMin", "KMin_ArgKMin"])
def test_gradients_on_gpu_match_cpu(name, axis, spy):
    case = _autodiff_cases()[name]
    rng = np.random.default_rng(9)
    base = [rng.standard_normal((70, 3)), rng.standard_normal((90, 3)), np.array([0.8])]

    def derivatives(device):
        x, y, p = [TORCH.tensor(a, device=device, requires_grad=True) for a in base]
        out = case(lm.Vi(x), lm.Vj(y), lm.Pm(p), axis)
        c = TORCH.tensor(np.random.default_rng(1).standard_normal(out.shape), device=device)
        g1 = TORCH.autograd.grad((out * c).sum(), [x, y, p], create_graph=True)
        g2 = TORCH.autograd.grad(sum((g * g).sum() for g in g1), [x, y, p])
        return [out, *g1, *g2]

    got = derivatives("cuda")
    assert len(spy) >= 3, spy  # the forward and the backward reductions ran on the GPU
    want = derivatives("cpu")
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.device.type == "cuda"
        np.testing.assert_allclose(as64(g), as64(w), rtol=1e-9, atol=1e-9,
                                   err_msg=f"{name}: output {k}")


# --------------------------------------------------------------------------- streams, devices

@pytest.mark.gpu
@requires_gpu
def test_reduction_waits_for_its_stream_and_does_not_block():
    rng = np.random.default_rng(2)
    (x,) = on_gpu([rng.random((4000, 3), np.float32)])
    (-lm.Vi(x).sqdist(lm.Vj(x))).exp().sum(1)  # compiled and loaded before the timed part
    side = TORCH.cuda.Stream()
    side.wait_stream(TORCH.cuda.current_stream())
    with TORCH.cuda.stream(side):
        TORCH.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU time on this stream
        x.mul_(2)  # queued behind the sleep
        got = (-lm.Vi(x).sqdist(lm.Vj(x))).exp().sum(1)
        assert not side.query(), "the launch waited for the stream"
    side.synchronize()
    x2 = x.double()
    want = TORCH.exp(-TORCH.cdist(x2, x2) ** 2).sum(1, keepdim=True)
    assert_close(got, want, "float32")


@pytest.mark.gpu
@requires_gpu
def test_numpy_inputs_with_cuda_backend_come_back_as_numpy(spy):
    rng = np.random.default_rng(4)
    x, y = rng.random((50, 3)), rng.random((60, 3))
    got = (lm.Vi(x) - lm.Vj(y)).abs().sum(-1).argmin(1, backend="cuda")
    assert isinstance(got, np.ndarray) and spy == ["ArgMin"]
    want = np.abs(x[:, None] - y[None]).sum(-1).argmin(1)[:, None]
    np.testing.assert_array_equal(got, want)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.skipif(TORCH is None or not TORCH.cuda.is_available()
                    or TORCH.cuda.device_count() < 2, reason="needs two GPUs")
def test_each_gpu_reduces_its_own_tensors():
    rng = np.random.default_rng(8)
    data = rng.random((300, 3))
    results = []
    for k in range(2):
        (x,) = on_gpu([data], device=f"cuda:{k}")
        with TORCH.cuda.device(1 - k):  # the current device is the other one
            out = (lm.Vi(x) * lm.Vj(x)).sum(-1).logsumexp(1)
        assert out.device == x.device
        results.append(out.cpu())
    assert TORCH.equal(results[0], results[1])


@pytest.mark.gpu
@requires_gpu
def test_kernel_solve_on_gpu():
    rng = np.random.default_rng(6)
    x, b = rng.random((500, 2)), rng.standard_normal((500, 1))
    xt, bt = on_gpu([x, b])
    K = (-lm.Vi(xt).sqdist(lm.Vj(xt)) * 10).exp()
    a = K.solve(bt, alpha=0.1, eps=1e-10)
    assert a.device.type == "cuda"
    dense = np.exp(-10 * ((x[:, None] - x[None]) ** 2).sum(-1)) + 0.1 * np.eye(500)
    np.testing.assert_allclose(as64(a), np.linalg.solve(dense, b), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("D", [64, 200])  # rows copied to the thread's array, rows read in place
def test_knn_in_high_dimension_matches_torch(D):
    gen = TORCH.Generator(device="cuda").manual_seed(0)
    x = TORCH.rand(500, D, device="cuda", generator=gen)
    y = TORCH.rand(3000, D, device="cuda", generator=gen)
    got = lm.Vi(x).sqdist(lm.Vj(y)).argKmin(10, dim=1)
    d2 = TORCH.cdist(x.double(), y.double()) ** 2
    want = TORCH.topk(d2, 10, dim=1, largest=False).values
    # compare the distances of the neighbours found (near-ties may swap indices)
    TORCH.testing.assert_close(TORCH.gather(d2, 1, got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("mode, rtol", [("tf32", 5e-3), ("3xtf32", 2e-5)])
@pytest.mark.parametrize("D", [16, 64, 130])  # one MMA chunk, several, a ragged last one
def test_tensor_core_modes_match_float64(mode, rtol, D, monkeypatch):
    """The tensor-core tiles (codegen/cuda_mma.py) on the hardware: Gaussian sum, LogSumExp
    and k-NN distances against float64 torch, ragged M and N, and the same call with the
    mode off for a ratio-free sanity check of the dispatch."""
    gen = TORCH.Generator(device="cuda").manual_seed(D)
    x = TORCH.rand(1037, D, device="cuda", generator=gen) / D ** 0.5
    y = TORCH.rand(2061, D, device="cuda", generator=gen) / D ** 0.5
    b = TORCH.randn(2061, 3, device="cuda", generator=gen)
    d2 = TORCH.cdist(x.double(), y.double()) ** 2
    monkeypatch.setenv("LAZYMAT_TENSOR_CORES", mode)
    K = (-lm.Vi(x).sqdist(lm.Vj(y)) * 4).exp()
    TORCH.testing.assert_close((K @ b).double(), TORCH.exp(-4 * d2) @ b.double(), rtol=rtol,
                               atol=rtol)
    lse = (lm.Vi(x) | lm.Vj(y)).logsumexp(dim=1)
    TORCH.testing.assert_close(lse.double()[:, 0],
                               TORCH.logsumexp(x.double() @ y.double().T, 1),
                               rtol=rtol, atol=rtol)
    idx = lm.Vi(x).sqdist(lm.Vj(y)).argKmin(10, dim=1)
    want = TORCH.topk(d2, 10, dim=1, largest=False).values
    TORCH.testing.assert_close(TORCH.gather(d2, 1, idx), want, rtol=10 * rtol, atol=10 * rtol)
