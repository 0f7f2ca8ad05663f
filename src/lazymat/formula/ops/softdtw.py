"""Soft-DTW between two series (SoftDTW_SqDist) and its gradient (GradSoftDTW_SqDist).

>>> from lazymat.formula import Var, apply
>>> apply("SoftDTW_SqDist", Var(0, 4, 0), Var(1, 5, 1), Var(2, 1, 2)).dim
1
"""

from __future__ import annotations

from typing import Any, Callable

from ...errors import ShapeError
from ..node import Node, make, register
from .base import NoGradient, bcast_lead
from .structural import Extract


def _softdtw_dim(out_dim: Callable[[int, int], int]):
    def rule(name, dims, params):
        if params:
            raise ShapeError(f"{name} takes no integer parameters, got {list(params)}")
        if dims[2] != 1:
            raise ShapeError(f"{name}: gamma must be a scalar (dim 1), got dim {dims[2]}")
        return out_dim(dims[0], dims[1])

    return rule


def _softdtw_table(xp, x, y, gamma):
    """R[i][j]: the soft-DTW value of x[:i+1] and y[:j+1] (arrays over the leading axes),
    and the cost function."""
    n, m = x.shape[-1], y.shape[-1]
    gam = gamma[..., 0]

    def cost(i, j):
        d = x[..., i] - y[..., j]
        return d * d

    R: list[list[Any]] = [[None] * m for _ in range(n)]
    for i in range(n):
        for j in range(m):
            c = cost(i, j)
            if i == 0 and j == 0:
                R[i][j] = c
            elif i == 0:
                R[i][j] = c + R[0][j - 1]
            elif j == 0:
                R[i][j] = c + R[i - 1][0]
            else:
                a, b, d = R[i - 1][j - 1], R[i - 1][j], R[i][j - 1]
                mn = xp.minimum(xp.minimum(a, b), d)
                R[i][j] = c + mn - gam * xp.log(xp.exp((mn - a) / gam) + xp.exp((mn - b) / gam)
                                                + xp.exp((mn - d) / gam))
    return R, cost


def _softdtw_ref(xp, p, x, y, gamma):
    R, _ = _softdtw_table(xp, x, y, gamma)
    return xp.expand_dims(R[-1][-1], -1)


def _grad_softdtw_ref(xp, p, x, y, gamma):
    n, m = x.shape[-1], y.shape[-1]
    R, cost = _softdtw_table(xp, x, y, gamma)
    gam = gamma[..., 0]
    # E[i][j] = dR[n-1][m-1] / dR[i][j], backwards over the successors of (i, j); a successor
    # on the first row or column has a single predecessor (derivative 1).
    E: list[list[Any]] = [[None] * m for _ in range(n)]
    for i in reversed(range(n)):
        for j in reversed(range(m)):
            if i == n - 1 and j == m - 1:
                E[i][j] = xp.full(tuple(R[i][j].shape), 1, like=R[i][j])
                continue
            e = 0
            if i + 1 < n:
                e = e + E[i + 1][j] * (1 if j == 0 else xp.exp(
                    (R[i + 1][j] - cost(i + 1, j) - R[i][j]) / gam))
            if j + 1 < m:
                e = e + E[i][j + 1] * (1 if i == 0 else xp.exp(
                    (R[i][j + 1] - cost(i, j + 1) - R[i][j]) / gam))
            if i + 1 < n and j + 1 < m:
                e = e + E[i + 1][j + 1] * xp.exp((R[i + 1][j + 1] - cost(i + 1, j + 1)
                                                  - R[i][j]) / gam)
            E[i][j] = e
    gx = [sum(2 * (x[..., i] - y[..., j]) * E[i][j] for j in range(m)) for i in range(n)]
    gy = [sum(-2 * (x[..., i] - y[..., j]) * E[i][j] for i in range(n)) for j in range(m)]
    return xp.concat(bcast_lead(xp, [xp.expand_dims(v, -1) for v in gx + gy]), -1)


# softmin_gamma(a, b, c) = -gamma log(e^-a/gamma + e^-b/gamma + e^-c/gamma), shifted by the min.
_SOFTMIN3 = """template <typename F> LM_INLINE F lm_softmin3(F a, F b, F c, F g) {
  F m = a < b ? a : b; m = m < c ? m : c;
  return m - g * lm_log(lm_exp((m - a) / g) + lm_exp((m - b) / g) + lm_exp((m - c) / g));
}"""


def _softdtw_loads(ctx, n: int, m: int) -> list[str]:
    return [f"{ctx.T} dtw_x[{n}], dtw_y[{m}];",
            f"for (int k = 0; k < {n}; k++) dtw_x[k] = {ctx.arg(0, 'k')};",
            f"for (int k = 0; k < {m}; k++) dtw_y[k] = {ctx.arg(1, 'k')};",
            f"const {ctx.T} dtw_g = {ctx.arg(2, 0)};"]


def _softdtw_render(ctx, node):
    # Column by column: dtw_r[i] holds R[i][j - 1], then R[i][j].
    n, m, T = node.args[0].dim, node.args[1].dim, ctx.T
    return _softdtw_loads(ctx, n, m) + [
        f"{T} dtw_r[{n}], dtw_acc = 0;",
        f"for (int i = 0; i < {n}; i++) {{ {T} d = dtw_x[i] - dtw_y[0]; dtw_acc += d * d; "
        f"dtw_r[i] = dtw_acc; }}",
        f"for (int j = 1; j < {m}; j++) {{",
        f"  {T} d = dtw_x[0] - dtw_y[j]; {T} diag = dtw_r[0]; dtw_r[0] += d * d; "
        f"{T} up = dtw_r[0];",
        f"  for (int i = 1; i < {n}; i++) {{",
        "    d = dtw_x[i] - dtw_y[j];",
        f"    {T} v = d * d + lm_softmin3(diag, up, dtw_r[i], dtw_g);",
        "    diag = dtw_r[i]; dtw_r[i] = v; up = v; } }",
        f"{ctx.out(0)} = dtw_r[{n - 1}];"]


def _grad_softdtw_render(ctx, node):
    n, m, T = node.args[0].dim, node.args[1].dim, ctx.T
    R = lambda i, j: f"dtw_R[({i}) * {m} + ({j})]"  # noqa: E731
    E = lambda i, j: f"dtw_E[({i}) * {m} + ({j})]"  # noqa: E731
    return _softdtw_loads(ctx, n, m) + [
        f"{T} dtw_R[{n * m}], dtw_E[{n * m}], dtw_gx[{n}], dtw_gy[{m}];",
        f"for (int i = 0; i < {n}; i++) for (int j = 0; j < {m}; j++) {{",
        f"  {T} d = dtw_x[i] - dtw_y[j]; d = d * d;",
        f"  {R('i', 'j')} = i == 0 && j == 0 ? d : i == 0 ? d + {R(0, 'j - 1')} : "
        f"j == 0 ? d + {R('i - 1', 0)} : "
        f"d + lm_softmin3({R('i - 1', 'j - 1')}, {R('i - 1', 'j')}, {R('i', 'j - 1')}, dtw_g); }}",
        f"for (int k = 0; k < {n}; k++) dtw_gx[k] = 0;",
        f"for (int k = 0; k < {m}; k++) dtw_gy[k] = 0;",
        f"for (int i = {n - 1}; i >= 0; i--) for (int j = {m - 1}; j >= 0; j--) {{",
        f"  {T} e = i == {n - 1} && j == {m - 1} ? ({T})1 : ({T})0, d;",
        f"  if (i + 1 < {n}) {{ d = dtw_x[i + 1] - dtw_y[j]; e += {E('i + 1', 'j')} * "
        f"(j == 0 ? ({T})1 : lm_exp(({R('i + 1', 'j')} - d * d - {R('i', 'j')}) / dtw_g)); }}",
        f"  if (j + 1 < {m}) {{ d = dtw_x[i] - dtw_y[j + 1]; e += {E('i', 'j + 1')} * "
        f"(i == 0 ? ({T})1 : lm_exp(({R('i', 'j + 1')} - d * d - {R('i', 'j')}) / dtw_g)); }}",
        f"  if (i + 1 < {n} && j + 1 < {m}) {{ d = dtw_x[i + 1] - dtw_y[j + 1]; "
        f"e += {E('i + 1', 'j + 1')} * lm_exp(({R('i + 1', 'j + 1')} - d * d - {R('i', 'j')}) "
        f"/ dtw_g); }}",
        f"  {E('i', 'j')} = e; d = dtw_x[i] - dtw_y[j];",
        "  dtw_gx[i] += 2 * d * e; dtw_gy[j] -= 2 * d * e; }",
        f"for (int k = 0; k < {n}; k++) {ctx.out('k')} = dtw_gx[k];",
        f"for (int k = 0; k < {m}; k++) {ctx.out(f'{n} + k')} = dtw_gy[k];"]


def _softdtw_vjp(n: Node, g: Node):
    x, y, gamma = n.args
    G = make("GradSoftDTW_SqDist", (x, y, gamma))
    return (Extract(G, 0, x.dim) * g, Extract(G, x.dim, y.dim) * g,
            NoGradient("SoftDTW_SqDist is not differentiable with respect to gamma (KeOps has "
                        "no such gradient either): keep gamma constant or detach it"))


def _grad_softdtw_vjp(n: Node, g: Node):
    raise ShapeError("second derivatives of SoftDTW_SqDist are not implemented (KeOps has "
                     "none either): GradSoftDTW_SqDist is not differentiable")


register("SoftDTW_SqDist", 3, _softdtw_ref, dims=_softdtw_dim(lambda n, m: 1),
         render=_softdtw_render, c_helper=_SOFTMIN3,
         doc="SoftDTW_SqDist(x, y, gamma): soft-DTW discrepancy between the series x (length "
         "x.dim) and y (length y.dim) with the cost (x_i - y_j)^2 and the smoothing "
         "gamma > 0 (a scalar): R[0][0] = 0, R[i][0] = R[0][j] = inf, R[i][j] = "
         "cost(i, j) + softmin_gamma(R[i-1][j-1], R[i-1][j], R[i][j-1]), value R[n][m] "
         "(dim 1). Differentiable in x and y (through GradSoftDTW_SqDist, once), not in "
         "gamma (an error if gamma depends on the differentiated variable, as in KeOps)",
         vjp=_softdtw_vjp)
register("GradSoftDTW_SqDist", 3, _grad_softdtw_ref, dims=_softdtw_dim(lambda n, m: n + m),
         render=_grad_softdtw_render,
         doc="GradSoftDTW_SqDist(x, y, gamma): the gradient of SoftDTW_SqDist(x, y, gamma) "
         "with respect to x, then y (dim x.dim + y.dim); not differentiable", vjp=_grad_softdtw_vjp)


