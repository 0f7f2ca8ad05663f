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


def test_forward_mode_of_other_reductions_is_a_clear_error():
    from torch.func import jvp

    with pytest.raises(NotImplementedError, match="reverse mode"):
        jvp(lambda x: lm.Vi(x).sqdist(lm.Vj(Y)).min(dim=1), (X,), (torch.randn_like(X),))
