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

import math
import sys
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from . import config, plan
from .arraylib import is_dask, is_torch
from .errors import NonFiniteError
from .formula import I_CAT, J_CAT, OPS, P_CAT, Node, Var, variables, walk
from .preconditioners import SchwarzPreconditioner, kd_order, leaf_boxes


class ConvergenceWarning(RuntimeWarning):
    """Conjugate gradient stopped at its iteration cap before reaching the tolerance.

    >>> import warnings, numpy as np, lazymat as lm
    >>> x = np.random.rand(100, 2)
    >>> K = (-lm.Vi(x).sqdist(lm.Vj(x)) * 10).exp()
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     a = K.solve(np.ones((100, 1)), alpha=1e-3, max_iter=1)
    >>> any(w.category is lm.ConvergenceWarning for w in caught)
    True
    """


# Below this many rows, "auto" solves with plain CG: a preconditioner's setup would cost more
# than the few milliseconds it saves.
AUTO_MIN_ROWS = 2048
# Share of the residual tolerance left to the block-sparse truncation of a Gaussian K.
_TRUNCATION_SHARE = 0.25
_MAX_ROUNDS = 5
#: A truncated solve runs most CG iterations on a looser block-sparse K, with
#: ‖K - K_loose‖₂ <= LOOSE_TRUNCATION·alpha, and refines against the tight one: each
#: refinement shrinks the residual about LOOSE_TRUNCATION-fold (a contraction of
#: ‖(alpha·Id + K_loose)⁻¹ (K - K_loose)‖ <= LOOSE_TRUNCATION), and a loose matvec keeps
#: a third to a tenth of the tight one's pairs. None: every iteration on the tight K.
LOOSE_TRUNCATION: float | None = 0.05
#: From this many points on: below, the loose K saved less than the timing noise (N = 10⁴
#: and 2·10⁴ on the benchmark problem: as often slower as faster; 1.3–2× faster from 4·10⁴).
LOOSE_MIN_ROWS = 32768


def _verbose() -> bool:
    return config.verbose()


def _default_max_iter(n: int) -> int:
    return min(10_000, max(100, 10 * n))


def _size(a: Any) -> int:
    return a.numel() if is_torch(a) else a.size


def _dot(a: Any, b: Any) -> float:
    return float((a * b).sum())


def _stagnation_window(n: int) -> int:
    """Iterations without progress after which CG gives up: CG needs at most n in exact
    arithmetic, so a quarter of n (at least 50, at most 500) with no gain means rounding
    (or an indefinite K) has taken over."""
    return max(50, min(n // 4, 500))


#: Progress over a stagnation window: the best |r|² must shrink at least by this factor.
_PROGRESS = 0.99


def _not_finite(what: str) -> NonFiniteError:
    return NonFiniteError(f"{what} holds NaN or inf: the kernel matrix-vector product of the "
                          "solve is not finite; check b, the points and the parameters of K "
                          "for NaN/inf (and that K's formula does not overflow)")


def _persist(*vectors: Any) -> tuple:
    """Dask vectors computed once and kept on the workers (CG reads each several times;
    unpersisted, every iteration would recompute the whole history); others unchanged."""
    if not any(is_dask(v) for v in vectors):
        return vectors
    from .backends.dask import persist

    return persist(*vectors)


def _pcg(op: Callable[[Any], Any], b: Any, tol: float, max_iter: int,
         precond: Callable[[Any], Any] | None, clock: tuple[float, int] = (0.0, 0)
         ) -> tuple[Any, int, float, bool]:
    """(x, iterations, |r|², stagnated): preconditioned CG on op(x) = b from x = 0, stopped
    when the recurrence residual |r|² < tol, or when the best |r|² has not improved over a
    window of iterations (then x is the best iterate seen). Raises NonFiniteError when the
    residual becomes NaN or inf. ``clock`` = (start time, iterations done before) for the
    verbose progress lines."""
    verbose = _verbose()
    x = b * 0
    r = b * 1  # the residual of x = 0 (a copy)
    z = r if precond is None else precond(r)
    p = z * 1
    x, r, p = _persist(x, r, p)
    z = r if precond is None else z
    rr, rz = _dot(r, r), _dot(r, z)
    if not (math.isfinite(rr) and math.isfinite(rz)):
        raise _not_finite("the right-hand side (or its preconditioned image)")
    best_x, best_rr, window = x, rr, _stagnation_window(b.shape[0])
    mark_it, mark_rr, stagnated = 0, rr, False
    it = 0
    while rr >= tol and rr > 0 and it < max_iter:
        it += 1
        (Ap,) = _persist(op(p))
        curvature = _dot(p, Ap)
        if not math.isfinite(curvature):
            raise _not_finite("K @ p")
        if not curvature > 0 or not rz > 0:  # breakdown: K (or the preconditioner) not SPD
            break
        step = rz / curvature
        x = x + step * p
        r_old = r
        r = r - step * Ap
        rr = _dot(r, r)
        if not math.isfinite(rr):
            raise _not_finite("the residual")
        if rr < best_rr:
            best_x, best_rr = x, rr
        if it - mark_it >= window:
            if best_rr > _PROGRESS * mark_rr:  # no progress over a whole window
                stagnated = True
                break
            mark_it, mark_rr = it, best_rr
        if precond is None:
            z, beta = r, rr / rz
            rz = rr
        else:
            # Polak-Ribière's beta: robust to a preconditioner applied in lower precision.
            z = precond(r)
            rz_new = _dot(r, z)
            beta = max(0.0, (rz_new - _dot(r_old, z)) / rz)
            rz = rz_new
        p = z + beta * p
        x, r, p = _persist(x, r, p)
        if verbose and ((clock[1] + it) % 10 == 0):
            print(f"[lazymat] conjugate gradient: iteration {clock[1] + it}, |r|^2 = {rr:.3e} "
                  f"(target {tol:.1e}), {time.perf_counter() - clock[0]:.1f} s", file=sys.stderr)
    if rr > best_rr:  # the last iterate is not the best one
        x, rr = best_x, best_rr
    return x, it, rr, stagnated


def _refined_pcg(op: Callable[[Any], Any], loose: Callable[[Any], Any] | None, b: Any,
                 tol: float, max_iter: int, precond: Callable[[Any], Any] | None,
                 clock: tuple[float, int], contraction: float) -> tuple[Any, int, int, bool]:
    """(x, iterations, refinements, stagnated): op(x) = b to |r|² < tol, by iterative
    refinement: CG on the cheaper ``loose`` operator for each correction, the residual taken
    with ``op``; plain :func:`_pcg` on op when loose is None, or when a refinement does not
    shrink the residual (then loose is too far from op)."""
    if loose is None:
        x, its, _, stagnated = _pcg(op, b, tol, max_iter, precond, clock)
        return x, its, 0, stagnated
    x, r = b * 0, b
    rr, total, refinements, stagnated = _dot(b, b), 0, 0, False
    while rr >= tol and rr > 0 and total < max_iter:
        # Solve each correction about as well as the loose K allows: finer is wasted work.
        target = max(0.5 * tol, rr * (contraction * contraction))
        d, its, _, stagnated = _pcg(loose, r, target, max_iter - total, precond,
                                    (clock[0], clock[1] + total))
        total += its
        x_new = x + d
        (x_new,) = _persist(x_new)
        (r_new,) = _persist(b - op(x_new))
        rr_new = _dot(r_new, r_new)
        refinements += 1
        if not math.isfinite(rr_new):
            raise _not_finite("the residual")
        if rr_new < rr:
            x, r = x_new, r_new
        if stagnated or rr_new > 0.5 * rr:  # not contracting: finish on op itself
            if rr_new >= tol and total < max_iter:
                d, its, _, stagnated = _pcg(op, r, tol, max_iter - total, precond,
                                            (clock[0], clock[1] + total))
                total += its
                x = x + d
            break
        rr = min(rr, rr_new)
    return x, total, refinements, stagnated


def _warn_not_converged(iterations: int, rr: float, tol: float, stacklevel: int,
                        hint: str = "", stagnated: bool = False) -> None:
    how = (f"stopped after {iterations} iterations without progress (stagnation; the best "
           "iterate is returned)" if stagnated else f"did not converge in {iterations} "
           "iterations")
    warnings.warn(f"conjugate gradient {how} (|r|^2 = {rr:.3e}, target {tol:.3e}): is the "
                  f"kernel matrix positive definite? A larger alpha helps.{hint}",
                  ConvergenceWarning, stacklevel=stacklevel + 1)


def _check_finite(b: Any) -> None:
    finite = bool(b.isfinite().all()) if is_torch(b) else bool(np.isfinite(b).all())
    if not finite:
        raise NonFiniteError("the right-hand side b of the solve holds NaN or inf")


def conjugate_gradient(matvec: Callable[[Any], Any], b: Any, alpha: float, eps: float,
                       max_iter: int | None = None,
                       precond: Callable[[Any], Any] | None = None) -> Any:
    """Solve (alpha·Id + A) x = b for a symmetric positive definite A given by ``matvec``.

    Works on numpy arrays or torch tensors (b of shape (n, e), all columns at once);
    stops when ‖r‖² < n·e·eps² (KeOps' criterion) and warns if ``max_iter`` iterations
    (default: 10·n, between 100 and 10⁴) were not enough, instead of running forever.
    ``precond``, a symmetric positive definite approximation of r ↦ (alpha·Id + A)⁻¹ r,
    makes it preconditioned CG.

    >>> import numpy as np
    >>> A = np.diag([1.0, 2.0, 3.0])
    >>> conjugate_gradient(lambda v: A @ v, np.ones((3, 1)), 1.0, 1e-10).ravel().round(4)
    array([0.5   , 0.3333, 0.25  ])
    """
    n = b.shape[0]
    max_iter = _default_max_iter(n) if max_iter is None else max_iter
    tol = _size(b) * eps * eps
    _check_finite(b)
    x, its, rr, stagnated = _pcg(lambda v: alpha * v + matvec(v), b, tol, max_iter, precond,
                                 (time.perf_counter(), 0))
    if rr >= tol:
        _warn_not_converged(its, rr, tol, stacklevel=2, stagnated=stagnated)
    return x


def _checked_solve(matvec: Callable[[Any], Any], b: Any, alpha: float, eps: float,
                   max_iter: int | None, system: "KernelSystem | None",
                   info: dict | None) -> Any:
    """CG rounds until the residual against the exact ``matvec`` meets ‖r‖² < n·e·eps².

    Each round solves (alpha·Id + K̃) d = r for the current exact residual r, where K̃ is
    ``system``'s fast operator (sorted points, block-sparse, preconditioned) or K itself;
    vectors are float64 whatever the data's dtype."""
    start = time.perf_counter()
    n = b.shape[0]
    max_iter = _default_max_iter(n) if max_iter is None else max_iter
    tol = _size(b) * eps * eps
    _check_finite(b)
    (work,) = _persist(b.double() if is_torch(b) else b.astype(np.float64))
    data_dtype = b.dtype

    def exact(v: Any) -> Any:
        out = matvec(v.to(data_dtype) if is_torch(v) else v.astype(data_dtype))
        return alpha * v + (out.double() if is_torch(out) else out.astype(np.float64))

    op, loose, precond, sort, unsort = exact, None, None, None, None
    if system is not None:
        norm_b = math.sqrt(_dot(work, work))
        op = system.operator(budget=_TRUNCATION_SHARE * alpha * math.sqrt(tol) / max(
            norm_b, 1e-300))
        loose = system.loose_operator()
        precond, sort, unsort = system.precond, system.sort, system.unsort
        if _verbose():
            print(f"[lazymat] solve: {system.summary()}", file=sys.stderr)
    x, r, rr = work * 0, work, _dot(work, work)
    total, rounds, refinements, stagnated = 0, 0, 0, False
    while rr >= tol and rr > 0 and total < max_iter and rounds < _MAX_ROUNDS:
        rounds += 1
        rhs = r if sort is None else r[sort]
        d, its, refined, stagnated = _refined_pcg(op, loose, rhs, 0.5 * tol, max_iter - total,
                                                  precond, (start, total),
                                                  LOOSE_TRUNCATION or 0.0)
        total += its
        refinements += refined
        x_new = x + (d if unsort is None else d[unsort])
        x_new, r_new = _persist(x_new, work - exact(x_new))
        rr_new = _dot(r_new, r_new)
        if not math.isfinite(rr_new):
            raise _not_finite("the residual against the exact K")
        if stagnated:  # more rounds would stagnate the same way
            if rr_new < rr:
                x, r, rr = x_new, r_new, rr_new
            break
        if rr_new > 0.5 * rr and rounds > 1:
            # Stagnation: the matvec's own rounding (float32 data) is at the target's level.
            if rr_new < rr:
                x, r, rr = x_new, r_new, rr_new
            break
        x, r, rr = x_new, r_new, rr_new
    if rr >= tol:
        _warn_not_converged(total, rr, tol, stacklevel=4,  # the caller of K.solve
                            hint=" Float32 data limits the attainable residual: try float64 "
                            "or a larger eps." if str(data_dtype).endswith("float32") else "",
                            stagnated=stagnated)
    if info is not None:
        info.update(iterations=total, rounds=rounds, refinements=refinements, residual=rr,
                    target=tol, seconds=time.perf_counter() - start)
        # the options as used ("auto" resolved): what reproduces this solve
        info["options"] = {
            "alpha": alpha, "eps": eps, "max_iter": max_iter,
            "dtype": str(data_dtype).replace("torch.", ""),
            "precond": "schwarz" if system is not None and system.precond is not None else None,
            "truncate": bool(system is not None and system.truncating)}
        if system is not None:
            described = system.describe()
            info["options"]["loose_truncation"] = LOOSE_TRUNCATION if loose is not None else None
            if system.precond is not None:  # the Schwarz options that reproduce it
                info["options"]["schwarz"] = {"block_size": described["precond_block_size"],
                                              "overlap": described["precond_overlap"]}
            info.update(described)
    if _verbose():
        print(f"[lazymat] solve: {total} iterations in {rounds} round(s), |r|^2 = {rr:.3e} "
              f"(target {tol:.1e}, exact K), {time.perf_counter() - start:.2f} s",
              file=sys.stderr)
    return x.to(data_dtype) if is_torch(x) else x.astype(data_dtype)


def solve(matvec: Callable[[Any], Any], b: Any, alpha: float, eps: float,
          max_iter: int | None = None, params: Sequence[Any] = (),
          system: "KernelSystem | None" = None, info: dict | None = None) -> Any:
    """CG solve of (alpha·Id + K) a = b. With torch, differentiable with respect to b and to
    ``params`` (the tensors K depends on): the backward is another solve (K is symmetric).

    ``system`` (a :class:`KernelSystem` of K) speeds it up; the result always meets
    ‖(alpha·Id + K) a - b‖² < n·e·eps² with the exact ``matvec`` (or a ConvergenceWarning
    says it did not). ``info``, a dict, receives the iteration count and the final residual.
    """
    import_torch = is_torch(b) and (b.requires_grad or any(t.requires_grad for t in params))
    if not import_torch:
        return _checked_solve(matvec, b, alpha, eps, max_iter, system, info)
    import torch

    params = [t for t in params if t.requires_grad]

    class KernelSolveFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, rhs, *theta):
            with torch.no_grad():
                a = _checked_solve(matvec, rhs.detach(), alpha, eps, max_iter, system, info)
            ctx.save_for_backward(a)
            return a

        @staticmethod
        def backward(ctx, grad_a):
            (a,) = ctx.saved_tensors
            # a = S⁻¹b with S = alpha·Id + K(θ) symmetric: ∂/∂b = S⁻¹g, ∂/∂θ = -(S⁻¹g)ᵀ (∂K/∂θ) a.
            with torch.no_grad():
                g_b = _checked_solve(matvec, grad_a.detach(), alpha, eps, max_iter, system, None)
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


def _number(node: Node, arrays: Sequence[Any]) -> float | None:
    """The value of a scalar formula of constants and (one-number) parameters, else None."""
    if node.dim != 1:
        return None
    if node.op == "Const":
        return float(node.value)
    if node.op == "Var":
        pos, _, cat = node.params
        a = arrays[pos]
        if cat != P_CAT or _size(a) != 1:
            return None
        return float((a.detach() if is_torch(a) else a).reshape(-1)[0])
    fold = OPS[node.op].fold if node.op in OPS else None  # the op's own constant folding
    values = [_number(a, arrays) for a in node.args]
    if fold is None or None in values:
        return None
    try:
        folded = fold(values, node.params)
        return None if folded is None else float(folded)
    except (ArithmeticError, ValueError):
        return None


def _same_data(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if is_torch(a) != is_torch(b) or tuple(a.shape) != tuple(b.shape):
        return False
    if is_torch(a):
        import torch

        return a.device == b.device and bool(torch.equal(a.detach(), b.detach()))
    return bool(np.array_equal(a, b))


def _sqdist_points(node: Node, arrays: Sequence[Any]) -> int | None:
    """If node is |x_i - x_j|² (Sum(Square(Subtract)) of one array as Vi and as Vj), the
    position of x_i."""
    if node.op == "Sum":
        node = node.args[0]
    if node.op != "Square" or node.args[0].op != "Subtract":
        return None
    u, v = node.args[0].args
    if u.op != "Var" or v.op != "Var" or {u.params[2], v.params[2]} != {I_CAT, J_CAT}:
        return None
    if u.dim != v.dim or not _same_data(arrays[u.params[0]], arrays[v.params[0]]):
        return None
    return u.params[0] if u.params[2] == I_CAT else v.params[0]


def _coefficient(node: Node, target: Node, arrays: Sequence[Any]) -> float | None:
    """c if node = c·target with c a number, else None."""
    if node is target:
        return 1.0
    if node.op == "Minus":
        c = _coefficient(node.args[0], target, arrays)
        return None if c is None else -c
    if node.op == "Mult":
        for u, v in (node.args, node.args[::-1]):
            k, c = _number(u, arrays), _coefficient(v, target, arrays)
            if k is not None and c is not None:
                return k * c
    if node.op == "Divide":
        c, k = _coefficient(node.args[0], target, arrays), _number(node.args[1], arrays)
        if c is not None and k:
            return c / k
    return None


def gaussian_kernel(formula: Node, arrays: Sequence[Any]) -> tuple[float, float, int] | None:
    """(gamma, weight, position of x) if formula = weight·exp(-gamma·|x_i - x_j|²) with
    numbers weight >= 0, gamma > 0 and one array x used as Vi and as Vj; else None."""
    weight, node = 1.0, formula
    if node.op in ("Mult", "Divide"):
        u, v = node.args
        k = _number(v, arrays)
        if k is not None and k != 0:
            weight, node = (k if node.op == "Mult" else 1 / k), u
        elif node.op == "Mult" and _number(u, arrays) is not None:
            weight, node = _number(u, arrays), v
    if node.op != "Exp" or not weight >= 0:
        return None
    for candidate in walk(node.args[0]):
        pos = _sqdist_points(candidate, arrays)
        c = _coefficient(node.args[0], candidate, arrays) if pos is not None else None
        if c is not None and c < 0:
            return -c, weight, pos
    return None


def _shared_points(formula: Node, arrays: Sequence[Any]) -> int | None:
    """The position of an array used both as Vi and as Vj by the formula (the points)."""
    found = [v for v in walk(formula) if _sqdist_points(v, arrays) is not None]
    if found:
        return _sqdist_points(found[0], arrays)
    vs = variables(formula)
    for u in vs:
        for v in vs:
            if (u.params[2] == I_CAT and v.params[2] == J_CAT and u.dim == v.dim
                    and _same_data(arrays[u.params[0]], arrays[v.params[0]])):
                return u.params[0]
    return None


class KernelSystem:
    """What makes solves with one symbolic K fast: the n points x (an array used both as Vi
    and as Vj) sorted along a k-d tree, an additive Schwarz preconditioner on blocks of
    nearby points, and, for a Gaussian K = w·exp(-γ|x_i - x_j|²), matrix-vector products
    that skip the blocks of K whose entries are provably negligible.

    ``precond``: "auto" (Schwarz from n = AUTO_MIN_ROWS on), "schwarz", None, or a dict of
    Schwarz options (``block_size``: points per k-d leaf, default 256; ``overlap``: growth of
    each block, a fraction of its side, default 0.25, or 0.1 with "auto" when 0.25 would pass
    the memory cap; the blocks are kept as float32 packed Cholesky factors). ``truncate``:
    "auto" (for Gaussian kernels from n = AUTO_MIN_ROWS on), True or False. Truncation is
    sized so that the dropped entries change the residual by at most a quarter of the
    tolerance; between refinements CG runs on a looser truncation (``loose_operator``,
    :data:`LOOSE_TRUNCATION`); solves check the residual against the exact K anyway.
    ``active`` is False when neither applies.

    >>> import numpy as np, lazymat as lm
    >>> x = np.random.rand(3000, 3); b = np.random.rand(3000, 1)
    >>> K = (-lm.Vi(x).sqdist(lm.Vj(x)) * 200).exp()
    >>> info = {}
    >>> a = K.solve(b, alpha=0.1, precond="schwarz", truncate=True, info=info)
    >>> info["iterations"] < 40 and info["kept"] < 0.5
    True
    """

    def __init__(self, kernel: Node, arrays: Sequence[Any], alpha: float,
                 precond: str | dict | None = "auto", truncate: str | bool = "auto",
                 backend: str = "auto", acc: dict | None = None):
        from .errors import ShapeError

        start = time.perf_counter()
        options = precond if isinstance(precond, dict) else {}
        if not (precond in (None, False, "auto", "schwarz") or isinstance(precond, dict)):
            raise ShapeError(f"precond must be 'auto', 'schwarz', None or a dict of Schwarz "
                             f"options, got {precond!r}")
        unknown = set(options) - {"block_size", "overlap"}
        if unknown:
            raise ShapeError(f"unknown Schwarz option(s) {sorted(unknown)}: the options are "
                             f"'block_size' and 'overlap'")
        if truncate not in ("auto", True, False):
            raise ShapeError(f"truncate must be 'auto', True or False, got {truncate!r}")
        if not alpha > 0 and (precond not in (None, False, "auto") or truncate is True):
            raise ShapeError(f"a preconditioned or truncated solve needs alpha > 0, got {alpha}")
        self.kernel, self.arrays, self.backend, self.alpha = kernel, list(arrays), backend, alpha
        self.acc = acc or {}
        vs = variables(kernel)
        flat = kernel.dim == 1 and all(
            len(self.arrays[v.params[0]].shape) == (1 if v.params[2] == P_CAT else 2)
            for v in vs)
        gauss = gaussian_kernel(kernel, self.arrays) if flat else None
        pos = gauss[2] if gauss else (_shared_points(kernel, self.arrays) if flat else None)
        n = int(self.arrays[pos].shape[0]) if pos is not None else 0
        big = n >= AUTO_MIN_ROWS and alpha > 0
        use_pre = pos is not None and (precond == "schwarz" or isinstance(precond, dict)
                                       or (precond == "auto" and big))
        use_trunc = gauss is not None and (truncate is True or (truncate == "auto" and big))
        if (precond == "schwarz" or isinstance(precond, dict)) and not use_pre:
            raise ShapeError("precond='schwarz' needs a scalar K of the points x (one array "
                             "used as Vi(x) and Vj(x), no batch dims)")
        if truncate is True and not use_trunc:
            raise ShapeError("truncate=True needs a Gaussian kernel w·exp(-γ·|x_i - x_j|²) "
                             "of one array x used as Vi(x) and Vj(x), no batch dims")
        self.active = use_pre or use_trunc
        self.precond = self.sort = self.unsort = None
        self.gauss, self.truncating = gauss, use_trunc
        self._ranges: dict[float, tuple | None] = {}  # truncation budget -> its ranges
        self._tight: float | None = None  # the budget of the last operator()
        self._described: dict[str, Any] = {}
        if not self.active:
            return
        points = self.arrays[pos]
        pts = np.asarray(points.detach().cpu().numpy() if is_torch(points) else points,
                         dtype=np.float64)
        block_size = options.get("block_size", 256)
        if not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ShapeError(f"the Schwarz option block_size must be an integer >= 1 (points "
                             f"per k-d leaf), got {block_size!r}")
        perm, coarse = kd_order(pts, block_size)
        if use_trunc:
            # 32 points: the fastest at N = 1e4 and 1e5; bigger past 131072 points, so that
            # the (leaves x leaves) distance table stays under 8192² numbers.
            leaf = max(32, 2 ** math.ceil(math.log2(max(n, 1) / 4096)))
            perm, self.fine = kd_order(pts, leaf, within=(perm, coarse))
        unsort = np.empty_like(perm)
        unsort[perm] = np.arange(n)
        self.sort, self.unsort = perm, unsort
        like = self.arrays[0]
        if is_torch(like):
            import torch

            self.sort = torch.from_numpy(perm).to(like.device)
            self.unsort = torch.from_numpy(unsort).to(like.device)
        self.sorted_arrays = self._sorted(vs)
        self.points = pts[perm]
        self._matvecs: dict[int, plan.Request] = {}
        if use_pre:
            # "auto" past the memory cap: a thinner overlap (about a third of the memory at
            # 10⁶ points, a few more iterations) before no preconditioner at all.
            overlaps = [float(options.get("overlap", 0.25))]
            if precond == "auto" and overlaps[0] > 0.1:
                overlaps.append(0.1)
            for k, overlap in enumerate(overlaps):
                try:
                    # float32 factors: half the memory, the same iterations (a preconditioner).
                    self.precond = SchwarzPreconditioner(self._block, self.points, coarse,
                                                         alpha, like=like, overlap=overlap,
                                                         single=True)
                    self._described.update(precond_overlap=overlap,
                                           precond_block_size=int(block_size))
                    break
                except ShapeError as e:
                    if precond != "auto" or "GB" not in str(e):
                        raise
                    if _verbose():
                        print(f"[lazymat] solve: overlap {overlap}: {e}", file=sys.stderr)
            if self.precond is None:
                use_pre = False
                self.active = use_trunc
        if use_pre:
            self._described.update(
                precond_blocks=len(self.precond.blocks),
                precond_max_block=max(self.precond.sizes),
                precond_mbytes=self.precond.nbytes / 1e6)
        self._described["setup_seconds"] = time.perf_counter() - start

    def _sorted(self, vs: Sequence[Node]) -> list[Any]:
        moving = {v.params[0] for v in vs if v.params[2] in (I_CAT, J_CAT)}
        out = []
        for k, a in enumerate(self.arrays):
            a = a.detach() if is_torch(a) else a
            out.append(a[self.sort] if k in moving else a)
        return out

    def _block(self, idx: Any) -> Any:
        """The dense K[idx][:, idx] (indices of the sorted points), in float64."""
        from .arraylib import lib_of
        from .formula.evaluate import evaluate

        like = self.sorted_arrays[0]
        if self.gauss is not None:  # w·exp(-γ|x_i - x_j|²), with BLAS
            gamma, weight, pos = self.gauss
            x = self.sorted_arrays[pos][idx]
            x = x.double() if is_torch(x) else x.astype(np.float64)
            sq = (x * x).sum(1)
            d2 = sq[:, None] + sq[None, :] - 2 * (x @ x.T)
            if is_torch(d2):
                return weight * (-gamma * d2.clamp(min=0)).exp()
            return weight * np.exp(-gamma * np.maximum(d2, 0))
        block = evaluate([self.kernel], self.sorted_arrays, idx, idx, lib_of(like), like)[0]
        block = block[..., 0]
        if is_torch(block):
            return block.expand(len(idx), len(idx)).double()
        return np.broadcast_to(block, (len(idx), len(idx))).astype(np.float64)

    def _truncation(self, budgets: dict[str, float]) -> dict[str, tuple | None]:
        """For each ``name: budget``, the ranges that drop the blocks of sorted leaves whose
        entries sum, over any row, to at most budget (a bound of ‖K - K̃‖₂), or None if
        nothing can be dropped; the kept share of the pairs goes to ``describe()[name]``.
        One pass for all budgets: the distance table and its sort are the cost."""
        todo = {name: b for name, b in budgets.items() if b not in self._ranges}
        if todo:
            self._truncate(todo)
        return {name: self._ranges[b] for name, b in budgets.items()}

    def _truncate(self, budgets: dict[str, float]) -> None:
        start = time.perf_counter()
        gamma, weight, _ = self.gauss
        leaves = self.fine
        lo, hi = leaf_boxes(self.points, leaves)
        sizes = (leaves[:, 1] - leaves[:, 0]).astype(np.float64)
        C = len(leaves)
        d2 = np.empty((C, C))
        for s in range(0, C, 256):
            gap = np.maximum(0, np.maximum(lo[None] - hi[s:s + 256, None],
                                           lo[s:s + 256, None] - hi[None]))
            d2[s:s + 256] = (gap * gap).sum(-1)
        # Row I may drop its farthest leaves while their bound w·|J|·exp(-γ·d²) sums to
        # <= budget; it then keeps every leaf up to the distance t_I of its nearest kept one.
        t = {name: np.empty(C) for name in budgets}
        for s in range(0, C, 256):
            part = d2[s:s + 256]
            order = np.argsort(-part, axis=1, kind="stable")
            far = np.take_along_axis(part, order, 1)
            total = np.cumsum(weight * sizes[order] * np.exp(-gamma * far), 1)
            for name, budget in budgets.items():
                ndrop = (total <= budget).sum(1)
                t[name][s:s + 256] = np.where(ndrop < C, far[np.arange(len(part)), np.minimum(
                    ndrop, C - 1)], -1.0)
        for name, budget in budgets.items():
            keep = d2 <= np.maximum(t[name][:, None], t[name][None])
            kept = float(sizes @ keep @ sizes) / float(sizes.sum()) ** 2
            if keep.all():
                six = None
            else:
                runs = np.diff(np.pad(keep.astype(np.int8), ((0, 0), (1, 1))), axis=1)
                rows, first = np.nonzero(runs == 1)
                _, last = np.nonzero(runs == -1)
                red = np.stack([leaves[first, 0], leaves[last - 1, 1]], 1)
                slices = np.cumsum(np.bincount(rows, minlength=C)).astype(np.int64)
                six = (leaves, slices, red, leaves, slices, red)
            self._described.update({name: kept,
                                    name.replace("kept", "truncation_bound"): budget})
            self._ranges[budget] = six
        self._described["setup_seconds"] += time.perf_counter() - start

    def _loose_budget(self, tight: float) -> float | None:
        if LOOSE_TRUNCATION is not None and not 0 <= LOOSE_TRUNCATION < 1:
            raise ValueError(f"lazymat.solve.LOOSE_TRUNCATION must be None or in [0, 1) (the "
                             f"contraction of one refinement), got {LOOSE_TRUNCATION!r}")
        if (not LOOSE_TRUNCATION or LOOSE_TRUNCATION * self.alpha <= tight
                or len(self.points) < LOOSE_MIN_ROWS):
            return None
        return LOOSE_TRUNCATION * self.alpha

    def operator(self, budget: float) -> Callable[[Any], Any]:
        """v ↦ alpha·v + K̃ v on float64 vectors of the sorted points, K̃ the block-sparse K
        (within ``budget``) when truncating, else K."""
        six = None
        if self.truncating:
            budgets = {"kept": budget}
            loose = self._loose_budget(budget)
            if loose is not None:  # computed with the tight one, for loose_operator()
                budgets["kept_loose"] = loose
            six = self._truncation(budgets)["kept"]
        self._tight = budget
        return self._operator(six)

    def loose_operator(self) -> Callable[[Any], Any] | None:
        """v ↦ alpha·v + K_loose v, ‖K - K_loose‖₂ <= LOOSE_TRUNCATION·alpha, for the CG
        iterations between refinements (see :data:`LOOSE_TRUNCATION`); None when not
        truncating, or when it would keep nearly as many pairs as the last operator()."""
        if not self.truncating or self._tight is None:
            return None
        budget = self._loose_budget(self._tight)
        if budget is None:
            return None
        six = self._truncation({"kept_loose": budget})["kept_loose"]
        if six is None or self._described["kept_loose"] > 0.7 * self._described["kept"]:
            return None  # refinements would cost more than the pairs saved
        return self._operator(six)

    def _operator(self, six: tuple | None) -> Callable[[Any], Any]:
        alpha, data = self.alpha, self.sorted_arrays[0]

        def op(v: Any) -> Any:
            e = int(v.shape[1])
            req = self._matvecs.get(e)
            if req is None:
                vj = Var(len(self.sorted_arrays), e, J_CAT)
                req = self._matvecs[e] = plan.Request("Sum", self.kernel * vj, axis=1,
                                                      **self.acc)
            vd = v.to(data.dtype) if is_torch(v) else v.astype(data.dtype)
            out = plan.run(req, self.sorted_arrays + [vd], backend=self.backend,
                           ranges=six)[0]
            return alpha * v + (out.double() if is_torch(out) else out.astype(np.float64))

        return op

    def describe(self) -> dict[str, Any]:
        """Setup facts for ``info``: preconditioner blocks and memory, kept pairs, seconds."""
        return dict(self._described)

    def summary(self) -> str:
        d, parts = self._described, []
        if "precond_blocks" in d:
            parts.append(f"Schwarz preconditioner on {d['precond_blocks']} blocks (<= "
                         f"{d['precond_max_block']} points, {d['precond_mbytes']:.0f} MB)")
        if "kept" in d:
            parts.append(f"block-sparse K keeping {100 * d['kept']:.0f} % of the pairs")
        if "kept_loose" in d:
            parts.append(f"{100 * d['kept_loose']:.0f} % between refinements")
        return ", ".join(parts) + f"; setup {d.get('setup_seconds', 0):.2f} s"


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
                 max_iter: int | None = None, backend: str = "auto",
                 precond: str | dict | None = "auto", truncate: str | bool = "auto",
                 info: dict | None = None, **ignored: Any) -> Any:
        """The solution a; ``precond``, ``truncate`` and ``info`` as in
        :meth:`lazymat.LazyTensor.solve` (they apply when the formula is K(x_i, x_j) * a with
        one array x given as both variables)."""
        args = list(args)
        b = args[self.position]

        def matvec(v: Any) -> Any:
            args[self.position] = v
            return self.genred(*args, backend=backend)

        system = None
        if any(is_dask(a) for a in args):  # plain CG on distributed matvecs
            if precond not in ("auto", None, False) or truncate is True:
                from .errors import ShapeError

                raise ShapeError("precond and truncate need the points in one memory; with "
                                 "dask arrays the solve runs plain CG on distributed matvecs")
        elif precond not in (None, False) or truncate not in (None, False):
            system = self._system(args, alpha, precond, truncate or False, backend)
        # Each tensor once: one array given for two aliases (Kinv(x, x, b)) is one parameter,
        # whose gradient autograd must not count twice.
        params = list({id(a): a for k, a in enumerate(args)
                       if k != self.position and is_torch(a)}.values())
        return solve(matvec, b, alpha, eps, max_iter, params, system, info)

    def _system(self, args: list, alpha: float, precond: Any, truncate: Any,
                backend: str) -> KernelSystem | None:
        """The KernelSystem of K when the formula is K * a (or a * K), else None (or an error
        if precond or truncate was asked for explicitly)."""
        from .errors import ShapeError
        from .plan import swap_categories

        req = self.genred.request
        f, kernel = req.formula, None
        if f.op == "Mult":
            for u, v in (f.args, f.args[::-1]):
                if v.op == "Var" and v.params[0] == self.position and u.dim == 1 and not any(
                        w.params[0] == self.position for w in variables(u)):
                    kernel = u
        if kernel is None:
            if precond not in ("auto", None, False) or truncate is True:
                raise ShapeError(f"precond and truncate need a formula K * {self.position}, "
                                 f"with K scalar")
            return None
        if req.axis == 0:
            kernel = swap_categories(kernel)
        try:
            system = KernelSystem(kernel, args, alpha, precond, truncate, backend=backend,
                                  acc={"dtype_acc": req.dtype_acc,
                                       "sum_scheme": req.sum_scheme})
        except IndexError:  # too few arrays: the call itself reports it
            return None
        return system if system.active else None
