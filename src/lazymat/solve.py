"""Kernel linear systems (α·Id + K) a = b by conjugate gradient, differentiable with torch.

K is a symmetric positive (semi-)definite symbolic matrix; each CG iteration is
one lazymat reduction (a matrix-vector product K @ p), so nothing of size M×N
is ever stored.

>>> import numpy as np, lazymat as lm
>>> x = np.random.rand(200, 2); b = np.random.rand(200, 1)
>>> K = (-lm.Vi(x).sqdist(lm.Vj(x)) * 10).exp()
>>> a = K.solve(b, alpha=0.1)
>>> float(np.abs(0.1 * a + K @ a - b).max()) < 1e-5
True
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any, Callable, Sequence

from .arraylib import is_torch


class ConvergenceWarning(RuntimeWarning):
    """Conjugate gradient stopped at its iteration cap before reaching the tolerance."""


def conjugate_gradient(matvec: Callable[[Any], Any], b: Any, alpha: float, eps: float,
                       max_iter: int | None = None) -> Any:
    """Solve (alpha·Id + A) x = b for a symmetric positive definite A given by ``matvec``.

    Works on numpy arrays or torch tensors (b of shape (n, e), all columns at once);
    stops when ‖r‖² < n·e·eps² (KeOps' criterion) and warns if ``max_iter`` iterations
    (default: 10·n, between 100 and 10⁴) were not enough, instead of running forever.
    """
    n = b.shape[0]
    if max_iter is None:
        max_iter = min(10_000, max(100, 10 * n))
    verbose = os.environ.get("LAZYMAT_VERBOSE", "") not in ("", "0")
    x = b * 0
    r = b * 1  # the residual of x = 0 (a copy)
    p = r * 1
    rr = float((r * r).sum())
    tol = (b.numel() if is_torch(b) else b.size) * eps * eps
    start = time.perf_counter()
    for it in range(1, max_iter + 1):
        if rr < tol:
            break
        Ap = alpha * p + matvec(p)
        step = rr / float((p * Ap).sum())
        x = x + step * p
        r = r - step * Ap
        rr_new = float((r * r).sum())
        p = r + (rr_new / rr) * p
        rr = rr_new
        if verbose and (it % 10 == 0):
            print(f"[lazymat] conjugate gradient: iteration {it}, |r|^2 = {rr:.3e} "
                  f"(target {tol:.1e}), {time.perf_counter() - start:.1f} s", file=sys.stderr)
    else:
        if rr >= tol:
            warnings.warn(f"conjugate gradient did not converge in {max_iter} iterations "
                          f"(|r|^2 = {rr:.3e}, target {tol:.3e}): is the kernel matrix "
                          f"positive definite? A larger alpha helps.", ConvergenceWarning,
                          stacklevel=3)
    return x


def solve(matvec: Callable[[Any], Any], b: Any, alpha: float, eps: float,
          max_iter: int | None = None, params: Sequence[Any] = ()) -> Any:
    """CG solve of (alpha·Id + K) a = b. With torch, differentiable with respect to b and to
    ``params`` (the tensors K depends on): the backward is another solve (K is symmetric)."""
    import_torch = is_torch(b) and (b.requires_grad or any(t.requires_grad for t in params))
    if not import_torch:
        return conjugate_gradient(matvec, b, alpha, eps, max_iter)
    import torch

    params = [t for t in params if t.requires_grad]

    class KernelSolveFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, rhs, *theta):
            with torch.no_grad():
                a = conjugate_gradient(matvec, rhs.detach(), alpha, eps, max_iter)
            ctx.save_for_backward(a)
            return a

        @staticmethod
        def backward(ctx, grad_a):
            (a,) = ctx.saved_tensors
            # a = S⁻¹b with S = alpha·Id + K(θ) symmetric: ∂/∂b = S⁻¹g, ∂/∂θ = -(S⁻¹g)ᵀ (∂K/∂θ) a.
            with torch.no_grad():
                g_b = conjugate_gradient(matvec, grad_a.detach(), alpha, eps, max_iter)
            needs = ctx.needs_input_grad[1:]
            grads: list[Any] = [None] * len(needs)
            wanted = [k for k, need in enumerate(needs) if need]
            if wanted:
                with torch.enable_grad():
                    Ka = matvec(a.detach())
                    found = torch.autograd.grad(Ka, [params[k] for k in wanted], -g_b,
                                                allow_unused=True)
                for k, g in zip(wanted, found):
                    grads[k] = g
            return (g_b, *grads)

    return KernelSolveFunction.apply(b, *params)


class KernelSolve:
    """pykeops' KernelSolve: solve (alpha·Id + K) a = b where ``formula`` is linear in the
    variable named ``varinvalias``, as in KeOps.

    >>> import numpy as np
    >>> ks = KernelSolve("Exp(-SqDist(x, y)) * a", ["x = Vi(2)", "y = Vj(2)", "a = Vj(1)"],
    ...                  "a", axis=1)
    >>> x = np.random.rand(50, 2); b = np.random.rand(50, 1)
    >>> sol = ks(x, x, b, alpha=0.5)
    >>> sol.shape
    (50, 1)
    """

    def __init__(self, formula: str, aliases: Sequence[str], varinvalias: str, axis: int = 0,
                 **options: Any):
        from .errors import ShapeError
        from .formula.parser import parse_alias
        from .genred import Genred

        self.genred = Genred(formula, aliases, reduction_op="Sum", axis=axis, **options)
        position = None
        for k, text in enumerate(aliases):
            name, pos, dim, cat = parse_alias(text)
            if name == varinvalias or text.strip() == varinvalias.strip():
                position = k if pos is None else pos
        if position is None and varinvalias.strip().startswith("Var("):
            _, position, _, _ = parse_alias(varinvalias)
        if position is None:
            raise ShapeError(f"KernelSolve: {varinvalias!r} is not one of the aliases {aliases}")
        self.position = position

    def __call__(self, *args: Any, alpha: float = 1e-10, eps: float = 1e-6,
                 max_iter: int | None = None, backend: str = "auto", **ignored: Any) -> Any:
        args = list(args)
        b = args[self.position]

        def matvec(v: Any) -> Any:
            args[self.position] = v
            return self.genred(*args, backend=backend)

        params = [a for k, a in enumerate(args) if k != self.position and is_torch(a)]
        return solve(matvec, b, alpha, eps, max_iter, params)
