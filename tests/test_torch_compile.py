"""torch.compile through lazymat: the lazymat::reduce custom op and the traced LazyTensor.

Each scenario is traced once by ``torch._dynamo.explain`` (zero graph breaks) and compiled
once with ``fullgraph=True`` and dynamic shapes on a compile-counting backend: same results
as eager, and one compilation for three sizes N. Backends are Dynamo-only ("eager") or
"aot_eager" where the compiled backward is what is tested; inductor is not.
"""

from __future__ import annotations

import pytest

import lazymat as lm

torch = pytest.importorskip("torch")
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend  # noqa: E402

from lazymat.formula import SqDist, Var, apply  # noqa: E402
from lazymat.errors import LazymatError  # noqa: E402
from lazymat.torch import ops  # noqa: E402

SIZES = (40, 56, 72)  # the N of three calls of one compiled function


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def no_graph_break(fn, *args):
    explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1
    # the graph holds the custom op, not a fallback to Python
    code = "\n".join(g.code for g in explained.graphs)
    assert "lazymat.reduce" in code


def gauss(x, y, b):
    K = (-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp()
    return (K * lm.Vj(b)).sum(dim=1)


def gauss_dense(x, y, b):
    return torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1) / 2) @ b


def data(n, m=30, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed + n)
    return (torch.randn(m, 3, generator=g, dtype=dtype),
            torch.randn(n, 3, generator=g, dtype=dtype),
            torch.randn(n, 1, generator=g, dtype=dtype))


# ---------------------------------------------------------------------- the op itself

def _key(reduction, **kw):
    f = SqDist(Var(0, 3, 0), Var(1, 3, 1))
    f = f if reduction == "KMin" else apply("Exp", -f)
    weight = Var(2, 2, 1) if reduction == "SumSoftMaxWeight" else None
    req = lm.plan.Request(reduction, f, axis=kw.pop("axis", 1), weight=weight, **kw)
    return ops.register(req, ["x", "y", "w"][:2 + (weight is not None)], "auto")


@pytest.mark.parametrize("reduction,kw", [("Sum", {}), ("LogSumExp", {"axis": 0}),
                                           ("SumSoftMaxWeight", {}), ("KMin", {"K": 2}),
                                           ("Min_ArgMin", {})])
def test_opcheck(reduction, kw):
    """Schema, fake rule (shapes, dtypes, strides), autograd rule and AOT dispatch with dynamic
    shapes of lazymat::reduce, for sum-like and selection reductions."""
    key = _key(reduction, **kw)
    x, y, _ = data(7, m=5)
    args = [x.requires_grad_(), y.requires_grad_()]
    if reduction == "SumSoftMaxWeight":
        args.append(torch.rand(7, 2, dtype=torch.float64, requires_grad=True))
    torch.library.opcheck(torch.ops.lazymat.reduce.default, (key, args, [-1, -1]))


def test_op_gradients_any_order_match_eager():
    """The op's backward runs the gradient reductions as the op again: second and third
    derivatives match the eager autograd.Function path."""
    x, y, b = (t.requires_grad_() for t in data(9, m=6))
    F, arrays = ((-lm.Vi(x).sqdist(lm.Vj(y))).exp() * lm.Vj(b)).bound()
    req = lm.plan.Request("Sum", F, axis=1)
    key = ops.register(req, ["x", "y", "b"], "auto")
    ours = ops.call(key, arrays)[0]
    eager = lm.autograd.run(req, arrays)[0]
    close(ours, eager)
    g1, = torch.autograd.grad(ours.pow(2).sum(), x, create_graph=True)
    g2, = torch.autograd.grad(eager.pow(2).sum(), x, create_graph=True)
    close(g1, g2)
    h1, = torch.autograd.grad(g1.pow(2).sum(), y, create_graph=True)
    h2, = torch.autograd.grad(g2.pow(2).sum(), y, create_graph=True)
    close(h1, h2)
    close(torch.autograd.grad(h1.sum(), b)[0], torch.autograd.grad(h2.sum(), b)[0])


def test_op_vmap_rule():
    """vmap over the op: the mapped dim becomes a batch dim (mapped and unmapped inputs)."""
    key = _key("Sum")
    xs = torch.randn(4, 6, 3, dtype=torch.float64)
    _, y, _ = data(8)
    got = torch.vmap(lambda x: ops.call(key, [x, y])[0])(xs)
    close(got, torch.stack([ops.call(key, [x, y])[0] for x in xs]))


def test_op_autocast_reduces_in_float32():
    """Under torch.autocast, float16/bfloat16 inputs are reduced (and returned) in float32."""
    key = _key("Sum")
    x, y, _ = data(8, dtype=torch.float32)
    xh, yh = x.bfloat16(), y.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.call(key, [xh, yh])[0]
    assert out.dtype == torch.float32
    close(out, ops.call(key, [xh.float(), yh.float()])[0], tol=1e-6)


# ---------------------------------------------------------------------- compiled scenarios

def test_gaussian_kernel_sum_and_its_gradient():
    """fullgraph, aot_eager (the compiled backward runs the gradient reductions as custom
    ops), dynamic N: forward and gradient as eager, one compilation."""
    no_graph_break(gauss, *data(SIZES[0]))

    def loss(x, y, b):
        return gauss(x, y, b).pow(2).sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend=counter)
    for n in SIZES:
        x, y, b = data(n)
        xc, yc = x.clone().requires_grad_(), y.clone().requires_grad_()
        xe, ye = x.clone().requires_grad_(), y.clone().requires_grad_()
        got, want = compiled(xc, yc, b), loss(xe, ye, b)
        close(got, want)
        close(want, gauss_dense(x, y, b).pow(2).sum())
        got.backward()
        want.backward()
        close(xc.grad, xe.grad)
        close(yc.grad, ye.grad)
    assert counter.frame_count == 1


def test_second_order_through_a_compiled_function():
    """create_graph=True through a Dynamo-compiled function (the op's autograd, any order)."""
    def loss(x, y, b):
        return gauss(x, y, b).pow(2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="eager")
    x, y, b = data(SIZES[0])
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    gc, = torch.autograd.grad(compiled(xc, y, b), xc, create_graph=True)
    ge, = torch.autograd.grad(loss(xe, y, b), xe, create_graph=True)
    close(gc, ge)
    close(torch.autograd.grad(gc.pow(2).sum(), xc)[0],
          torch.autograd.grad(ge.pow(2).sum(), xe)[0])


def knn_step(x, y, labels):
    """One k-NN classification step: the 3 nearest columns' labels, averaged."""
    idx = lm.Vi(x).sqdist(lm.Vj(y)).argKmin(3, dim=1)
    return labels[idx].mean(1), idx


def test_knn_step():
    x, y, _ = data(SIZES[0], dtype=torch.float32)
    no_graph_break(knn_step, x, y, torch.rand(SIZES[0]))
    counter = CompileCounter()
    compiled = torch.compile(knn_step, fullgraph=True, dynamic=True, backend=counter)
    for n in SIZES:
        x, y, _ = data(n, dtype=torch.float32)
        labels = torch.rand(n)
        (got, got_idx), (want, want_idx) = compiled(x, y, labels), knn_step(x, y, labels)
        assert torch.equal(got_idx, want_idx)
        assert torch.equal(got_idx, ((x[:, None] - y[None]) ** 2).sum(-1).topk(
            3, 1, largest=False).indices)
        close(got, want)
    assert counter.frame_count == 1


def sinkhorn(x, y, eps: float = 0.5, iters: int = 3):
    """Log-domain Sinkhorn between uniform measures: the dual potentials (f, g)."""
    C = lm.Vi(x).sqdist(lm.Vj(y)) / 2
    log_a = -torch.log(torch.tensor(float(x.shape[0]), dtype=x.dtype))
    log_b = -torch.log(torch.tensor(float(y.shape[0]), dtype=x.dtype))
    f, g = x.new_zeros(x.shape[0], 1), x.new_zeros(y.shape[0], 1)
    for _ in range(iters):
        f = -eps * ((lm.Vj(g) - C) / eps).logsumexp(dim=1) - eps * log_b
        g = -eps * ((lm.Vi(f) - C) / eps).logsumexp(dim=0) - eps * log_a
    return f, g


def sinkhorn_dense(x, y, eps=0.5, iters=3):
    C = ((x[:, None] - y[None]) ** 2).sum(-1) / 2
    f, g = x.new_zeros(x.shape[0]), x.new_zeros(y.shape[0])
    for _ in range(iters):
        f = -eps * torch.logsumexp((g[None] - C) / eps, 1) + eps * torch.log(
            torch.tensor(float(y.shape[0]), dtype=x.dtype))
        g = -eps * torch.logsumexp((f[:, None] - C) / eps, 0) + eps * torch.log(
            torch.tensor(float(x.shape[0]), dtype=x.dtype))
    return f[:, None], g[:, None]


def test_log_domain_sinkhorn_loop():
    x, y, _ = data(SIZES[0])
    no_graph_break(sinkhorn, x, y)
    counter = CompileCounter()
    compiled = torch.compile(sinkhorn, fullgraph=True, dynamic=True, backend=counter)
    for n in SIZES:
        x, y, _ = data(n)
        for got, want, dense in zip(compiled(x, y), sinkhorn(x, y), sinkhorn_dense(x, y)):
            close(got, want)
            close(want, dense)
    assert counter.frame_count == 1


class KernelMatvec(torch.nn.Module):
    """A GPyTorch-style RBF kernel matvec K(x, x) @ v with a learnt lengthscale."""

    def __init__(self):
        super().__init__()
        self.log_lengthscale = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, x, v):
        z = x / self.log_lengthscale.exp()
        K = (-lm.Vi(z).sqdist(lm.Vj(z)) / 2).exp()
        # K @ v here: torch 2.13's Dynamo traces the @ as a tensor matmul (a graph break)
        return (K * lm.Vj(v)).sum(dim=1)


def test_kernel_matvec_in_module_forward():
    model = KernelMatvec()
    x, _, _ = data(SIZES[0])
    no_graph_break(model, x, torch.randn(30, 2, dtype=torch.float64))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    for m in SIZES:
        x, v = torch.randn(m, 3, dtype=torch.float64), torch.randn(m, 2, dtype=torch.float64)
        got = compiled(x, v)
        (grad,) = torch.autograd.grad(got.sum(), model.log_lengthscale)
        want = model(x, v)
        (want_grad,) = torch.autograd.grad(want.sum(), model.log_lengthscale)
        z = x / model.log_lengthscale.exp()
        dense = torch.exp(-((z[:, None] - z[None]) ** 2).sum(-1) / 2) @ v
        close(got, want)
        close(want, dense)
        close(grad, want_grad)
    assert counter.frame_count == 1


def test_genred_inside_compiled_function():
    """A Genred made outside, called inside: the same op, no graph break."""
    g = lm.Genred("Exp(-SqDist(x, y) / 2) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"],
                  reduction_op="Sum", axis=1)

    def f(x, y, b):
        return g(x, y, b) * 2

    no_graph_break(f, *data(SIZES[0]))
    x, y, b = data(SIZES[1])
    close(torch.compile(f, fullgraph=True, backend="eager")(x, y, b), gauss_dense(x, y, b) * 2)


def test_errors_inside_compiled_function():
    """User mistakes raise lazymat's errors at trace time; eager-only features say so."""
    def mismatched(x, y):
        return (lm.Vi(x) * lm.Vi(y)).sum(dim=1)

    # found by the op's fake rule: Dynamo wraps the ShapeError (its ``from_exc``)
    with pytest.raises((lm.ShapeError, torch._dynamo.exc.TorchRuntimeError),
                       match="has 6 rows but Vi operand #0 has 5"):
        torch.compile(mismatched, fullgraph=True, backend="eager")(
            torch.randn(5, 3), torch.randn(6, 3))

    def with_out(x):
        return lm.Vi(x).sqdist(lm.Vj(x)).sum(dim=1, out=torch.empty(5, 1))

    with pytest.raises(Exception, match="not supported inside torch.compile"):  # Dynamo's
        torch.compile(with_out, fullgraph=True, backend="eager")(torch.randn(5, 3))


def _with_out(x):
    return lm.Vi(x).sqdist(lm.Vj(x)).sum(dim=1, out=torch.empty(5, 1))


@pytest.mark.slow  # Dynamo tries, and gives up on, every frame of the eager path: ~20 s
@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")
def test_eager_fallback_without_fullgraph():
    """Without fullgraph, what is not traced falls back to eager lazymat (out= here), and
    TracedLazyTensors reaching eager code behave as ordinary LazyTensors."""
    x = torch.randn(5, 3)
    close(torch.compile(_with_out, backend="eager")(x), ((x[:, None] - x[None]) ** 2).sum(
        (1, 2))[:, None], tol=1e-5)


def test_eager_calls_do_not_use_the_op(monkeypatch):
    """Outside torch.compile the direct path runs (no custom-op dispatch cost)."""
    def fail(*a, **k):
        raise AssertionError("the custom op was called eagerly")

    monkeypatch.setattr(ops, "call", fail)
    x, y, b = data(SIZES[0])
    close(gauss(x, y, b), gauss_dense(x, y, b))
    assert type(lm.Vi(x)) is lm.LazyTensor


def test_key_from_another_process_runs():
    """A graph reloaded from torch's on-disk caches (inductor's FX graph cache, AOTAutograd's)
    holds keys registered by the process that compiled it: the key carries its request, so a
    fresh process runs it (gallery 14 failed this way on its second run)."""
    import subprocess
    import sys

    code = ("import torch, lazymat as lm\n"
            "from lazymat.formula import Var, SqDist\n"
            "from lazymat.torch import ops\n"
            "req = lm.plan.Request('Sum', SqDist(Var(0, 1, 0), Var(1, 1, 1)), axis=1)\n"
            "print(ops.register(req, ['x of the subprocess', 'y'], 'auto'))\n")
    key = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.strip().splitlines()[-1]
    # (names unique to this test: no earlier test of this worker registered the key)
    assert key.startswith("Sum:") and not ops.is_registered(key)
    x, y = torch.zeros(2, 1, dtype=torch.float64), torch.ones(3, 1, dtype=torch.float64)
    (out,) = torch.ops.lazymat.reduce(key, [x, y], [-1, -1])
    close(out, torch.full((2, 1), 3.0, dtype=torch.float64))
    with pytest.raises(LazymatError, match="is not a key made by"):
        torch.ops.lazymat.reduce("Sum:garbage", [x, y], [-1, -1])
