"""torch.func transforms through lazymat reductions: vmap, grad, vjp, jacrev and their nests."""

from __future__ import annotations

import pytest

import lazymat as lm

torch = pytest.importorskip("torch")
from torch.func import grad, jacrev, vjp, vmap  # noqa: E402

torch.manual_seed(0)
X = torch.randn(6, 3, dtype=torch.float64)
Y = torch.randn(7, 3, dtype=torch.float64)
B = torch.randn(7, 1, dtype=torch.float64)
XS = torch.randn(4, 6, 3, dtype=torch.float64)
S = torch.tensor([0.8], dtype=torch.float64)


def ours(x, y, b, s=S):
    return ((-lm.Vi(x).sqdist(lm.Vj(y)) * lm.Pm(s)).exp() * lm.Vj(b)).sum(dim=1)


def dense(x, y, b, s=S):
    return torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1) * s) @ b


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_vmap_over_i_variables_and_parameters():
    close(vmap(ours, in_dims=(0, None, None))(XS, Y, B),
          torch.stack([dense(x, Y, B) for x in XS]))
    ss = torch.tensor([[0.5], [1.0], [2.0]], dtype=torch.float64)
    close(vmap(lambda s: ours(X, Y, B, s))(ss), torch.stack([dense(X, Y, B, s) for s in ss]))


def test_grad_jacrev_vjp_and_nests():
    close(grad(lambda x: ours(x, Y, B).sum())(X), grad(lambda x: dense(x, Y, B).sum())(X))
    close(jacrev(lambda b: ours(X, Y, b))(B), jacrev(lambda b: dense(X, Y, b))(B))
    out, pull = vjp(lambda y: ours(X, y, B), Y)
    out2, pull2 = vjp(lambda y: dense(X, y, B), Y)
    close(out, out2)
    cot = torch.randn_like(out)
    close(pull(cot)[0], pull2(cot)[0])
    close(vmap(grad(lambda x: ours(x, Y, B).sum()))(XS),
          torch.stack([grad(lambda x: dense(x, Y, B).sum())(x) for x in XS]))
    close(grad(lambda x: grad(lambda z: ours(z, Y, B).sum())(x).sum())(X),
          grad(lambda x: grad(lambda z: dense(z, Y, B).sum())(x).sum())(X))


def test_vmap_of_selections():
    def nearest(x):
        return lm.Vi(x).sqdist(lm.Vj(Y)).Kmin(2, dim=1)

    want = torch.stack([((x[:, None] - Y[None]) ** 2).sum(-1).topk(2, largest=False).values
                        for x in XS])
    close(vmap(nearest)(XS), want)
    close(vmap(grad(lambda x: nearest(x).sum()))(XS),
          torch.stack([grad(lambda x: ((x[:, None] - Y[None]) ** 2).sum(-1).topk(
              2, largest=False).values.sum())(x) for x in XS]))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # raised inside torch
def test_forward_mode_jvp_jacfwd_hessian():
    from torch.func import hessian, jacfwd, jvp

    t = torch.randn_like(X)
    close(jvp(lambda x: ours(x, Y, B), (X,), (t,))[1], jvp(lambda x: dense(x, Y, B), (X,), (t,))[1])
    close(jacfwd(lambda y: ours(X, y, B))(Y), jacfwd(lambda y: dense(X, y, B))(Y))
    close(hessian(lambda x: ours(x, Y, B).sum())(X), hessian(lambda x: dense(x, Y, B).sum())(X))

    def lse(x):
        return (-lm.Vi(x).sqdist(lm.Vj(Y))).logsumexp(dim=0)

    def lse_dense(x):
        return torch.logsumexp(-((x[:, None] - Y[None]) ** 2).sum(-1), 0)[:, None]

    close(jvp(lse, (X,), (t,))[1], jvp(lse_dense, (X,), (t,))[1])
    close(hessian(lambda x: lse(x).sum())(X), hessian(lambda x: lse_dense(x).sum())(X))


W = torch.rand(7, 2, dtype=torch.float64) + 0.5


def _scalar(x, y):  # a formula with distinct values (no ties for the selections)
    return lm.Vi(x).sqdist(lm.Vj(y)) + (lm.Vi(x) * lm.Vj(y)).sum(-1) * 0.3


def _scalar_dense(x, y):
    return ((x[:, None] - y[None]) ** 2).sum(-1) + (x[:, None] * y[None]).sum(-1) * 0.3


def _vector(x, y):
    return (lm.Vi(x) - lm.Vj(y)).sin() * lm.Vj(y)


def _vector_dense(x, y):
    return torch.sin(x[:, None] - y[None]) * y[None]


FORWARD = {  # (lazymat, dense torch) of (x, y, w): every reduction with a value output
    "LogSumExp-weight": (lambda x, y, w: (-_scalar(x, y)).logsumexp(dim=1, weight=lm.Vj(w)),
                         lambda x, y, w: torch.logsumexp(
                             -_scalar_dense(x, y)[..., None] + torch.log(w)[None], 1)),
    "SumSoftMaxWeight": (lambda x, y, w: (-_scalar(x, y)).sumsoftmaxweight(lm.Vj(w), dim=1),
                         lambda x, y, w: torch.softmax(-_scalar_dense(x, y), 1) @ w),
    "SumSoftMaxWeight-axis0": (lambda x, y, w: (-_scalar(y, x)).sumsoftmaxweight(
                                   lm.Vi(w), dim=0),
                               lambda x, y, w: torch.softmax(-_scalar_dense(y, x), 0).T @ w),
    "Min": (lambda x, y, w: _vector(x, y).min(dim=1),
            lambda x, y, w: _vector_dense(x, y).min(1).values),
    "Max_ArgMax": (lambda x, y, w: _vector(x, y).max_argmax(dim=0)[0],
                   lambda x, y, w: _vector_dense(x, y).max(0).values),
    "KMin": (lambda x, y, w: _vector(x, y).Kmin(3, dim=1),
             lambda x, y, w: _vector_dense(x, y).topk(3, 1, largest=False).values),
    "KMin-D1": (lambda x, y, w: _scalar(x, y).Kmin(3, dim=1),
                lambda x, y, w: _scalar_dense(x, y).topk(3, 1, largest=False).values),
}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("name", list(FORWARD))
def test_forward_mode_of_every_reduction(name):
    """jvp with tangents on x, y and the weight at once, and jacfwd, against dense torch."""
    from torch.func import jacfwd, jvp

    ours_fn, dense_fn = FORWARD[name]
    w = W  # a j-variable of Y's rows (an i-variable for the axis-0 case, where i runs over Y)
    primals = (X, Y, w)
    tangents = tuple(torch.randn_like(p) for p in primals)
    got_out, got = jvp(ours_fn, primals, tangents)
    want_out, want = jvp(dense_fn, primals, tangents)
    close(got_out, want_out.reshape(got_out.shape))
    close(got, want.reshape(got.shape))
    close(jacfwd(lambda y: ours_fn(X, y, w))(Y),
          jacfwd(lambda y: dense_fn(X, y, w))(Y).reshape(got.shape + Y.shape))
