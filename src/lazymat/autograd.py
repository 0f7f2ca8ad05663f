"""torch.autograd glue: reductions whose backward is made of new lazymat reductions.

The backward of a reduction builds the gradient *formulas* (symbolic VJPs,
``formula/autodiff.py``) and runs them through :func:`run` again, so they are
themselves differentiable: ``create_graph=True`` gives derivatives of any order.

- Sum-like reductions (Sum, LogSumExp, SumSoftMaxWeight): the gradient with
  respect to an i-variable is a reduction over j, to a j-variable a reduction
  over i, to a parameter a reduction over j summed over i. Variables of the
  same category share one reduction (their gradients are concatenated). For a
  Sum, the forward itself also reduces Σ_j ∂F_ij/∂v for the i-variables and
  parameters v that require grad (few columns): their first-order gradient is
  then G_iᵀ times that sum, without a backward pass (:class:`_Jacobians`).
- Selection reductions (Min, Max, KMin and the values of Min_ArgMin, ...): the
  forward also returns the selected indices; the backward gathers the selected
  j for each i and evaluates the formula's VJP there: O(M·K), not O(M·N).
- Arg reductions return integer indices: no gradient.

>>> import torch, lazymat as lm
>>> x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
>>> y = torch.randn(7, 3, dtype=torch.float64)
>>> lm.Vi(x).sqdist(lm.Vj(y)).sum(dim=1).sum().backward()
>>> x.grad.shape
torch.Size([5, 3])
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any, Sequence

from . import plan
from .arraylib import is_torch, lib_of
from .errors import DtypeError, ShapeError
from .formula import (I_CAT, J_CAT, P_CAT, Const, Node, Var, diff, grad, make, substitute,
                      variables)
from .formula.evaluate import evaluate_rows
from .formula.factor import Factored, factor_sum


def run(req: plan.Request, arrays: Sequence[Any], *, names: Sequence[str] | None = None,
        backend: str = "auto", out: Any = None,
        sizes: tuple[int | None, int | None] = (None, None), like: Any = None,
        ranges: Sequence[Any] | None = None) -> tuple:
    """``plan.run``, recorded by torch autograd when a tensor input requires grad (or seen
    through a torch.func transform). Inside ``torch.compile`` the front ends call the
    ``lazymat::reduce`` custom op instead (``lazymat/torch/ops.py``)."""
    if not any(is_torch(a) and (a.requires_grad or _transformed(a)) for a in arrays):
        return plan.run(req, arrays, names=names, backend=backend, out=out, sizes=sizes,
                        like=like, ranges=ranges)
    import torch

    if not torch.is_grad_enabled() and not any(_transformed(a) for a in arrays):
        return plan.run(req, arrays, names=names, backend=backend, out=out, sizes=sizes,
                        like=like, ranges=ranges)
    if out is not None:
        raise DtypeError("out= cannot be used when an input requires grad "
                         "(autograd needs the output it creates)")
    names = list(names) if names is not None else [f"argument {k}" for k in range(len(arrays))]
    # Checked and oriented once: the forward runs this launch (the backward needs M and N
    # even when its formulas lose every i- (or j-) variable).
    prepared = plan.prepare(_forward_request(req), arrays, names=names, backend=backend,
                            sizes=sizes, like=like, ranges=ranges)
    jacobians = _forward_jacobians(req, arrays, prepared)
    spec = _Spec(req, tuple(names), backend, prepared.sizes,
                 like if like is not None else arrays[0],
                 None if ranges is None else tuple(ranges), prepared, tuple(arrays), jacobians)
    outs = _reduction_function().apply(spec, *arrays)
    red = req.definition
    if red.selects_with and red.selects_with != red.name:
        outs = outs[:1]  # the forward also returned the selected indices, for the backward
    return outs


def compiling() -> bool:
    """Whether torch.compile (Dynamo) is tracing this call: then the front ends run
    reductions as custom ops (``lazymat/torch/ops.py``).
    False without importing torch (numpy users never import it). No state is cached: Dynamo
    replays this function and must see the same path every time."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def _transformed(t: Any) -> bool:
    """Whether a tensor is wrapped by a torch.func transform (vmap, grad, ...): it has no
    storage of its own and must go through the Function, whose rules unwrap it."""
    import torch

    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def _forward_request(req: plan.Request) -> plan.Request:
    """The reduction the forward runs: selections also return the selected indices."""
    twin = req.definition.selects_with
    return replace(req, reduction=twin) if twin else req


@dataclass(frozen=True)
class _Spec:
    req: plan.Request
    names: tuple[str, ...]
    backend: str
    sizes: tuple[int | None, int | None]
    like: Any
    ranges: tuple | None  # the block-sparse 6-tuple, or None
    prepared: plan.Prepared | None  # the forward's checked, oriented launch, for ``inputs``
    inputs: tuple
    #: the forward that also reduces Jacobian sums (:func:`_forward_jacobians`), or None
    jacobians: "_Jacobians | None" = None
    #: runs the gradient reductions instead of :func:`run` (the custom op's backward)
    runner: Any = None

    def run(self, req: plan.Request, arrays: Sequence[Any], names: Sequence[str],
            sizes: tuple[int | None, int | None], ranges: Any = None) -> tuple:
        if self.runner is not None:
            return self.runner(req, arrays, names, sizes, ranges)
        return run(req, arrays, names=names, backend=self.backend, sizes=sizes, like=self.like,
                   ranges=ranges)


_Function = None


def _reduction_function():
    """The torch.autograd.Function, created on first use so numpy users never import torch."""
    global _Function
    if _Function is not None:
        return _Function
    import torch

    class LazymatReduction(torch.autograd.Function):
        # forward / setup_context / jvp / vmap: torch.func transforms (grad, vjp, jacrev, jvp,
        # jacfwd, hessian, vmap) work through it.
        @staticmethod
        def forward(spec: _Spec, *arrays):
            if len(arrays) == len(spec.inputs) and all(
                    a is b for a, b in zip(arrays, spec.inputs)):
                if spec.jacobians is not None:  # F and the Jacobian sums in one pass
                    return spec.jacobians.run()
                return plan.execute(spec.prepared)  # checked by autograd.run already
            # Other arrays (a torch.func transform unwrapped them, vmap moved a dim): anew.
            return tuple(plan.run(_forward_request(spec.req), [a.detach() for a in arrays],
                                  names=spec.names, backend=spec.backend, sizes=spec.sizes,
                                  like=spec.like, ranges=spec.ranges))

        @staticmethod
        def setup_context(ctx, inputs, output):
            spec, *arrays = inputs
            kinds = _forward_request(spec.req).definition.output_kinds
            ctx.spec, ctx.n_args = spec, len(arrays)
            ctx.jacobians = spec.jacobians.take() if spec.jacobians is not None else None
            ctx.indices = output[kinds.index("index")] if "index" in kinds else None
            values = [o for o, k in zip(output, kinds) if k == "value"]
            ctx.save_for_backward(*arrays, *values)
            ctx.save_for_forward(*arrays, *values)
            ctx.mark_non_differentiable(*[o for o, k in zip(output, kinds) if k == "index"])

        @staticmethod
        def jvp(ctx, spec_tangent, *tangents):
            saved = ctx.saved_tensors
            arrays, values = saved[:ctx.n_args], saved[ctx.n_args:]
            O = values[0] if values else None
            if ctx.spec.req.definition.tangents is not None:
                out = _sum_like_jvp(ctx.spec, arrays, O, tangents)
            else:
                out = _selection_jvp(ctx.spec, arrays, O, ctx.indices, tangents)
            kinds = _forward_request(ctx.spec.req).definition.output_kinds
            return tuple(out if k == "value" else None for k in kinds)

        @staticmethod
        def vmap(info, in_dims, spec: _Spec, *arrays):
            # The mapped dim becomes the outermost batch dim. Batch dims broadcast from the
            # right, so every array is padded to the same number of batch dims first: an
            # array's own size-1 batch dims (a nested vmap's) must not meet the mapped dim.
            moved = _vmapped(spec.req, arrays, in_dims[1:])
            outs = LazymatReduction.apply(spec, *moved)
            return outs, tuple(0 for _ in outs)

        @staticmethod
        def backward(ctx, *grads):
            saved = ctx.saved_tensors
            arrays, values = saved[:ctx.n_args], saved[ctx.n_args:]
            wanted = [p for p in range(ctx.n_args) if ctx.needs_input_grad[1 + p]]
            G = grads[0]
            if G is None or not wanted or not values:
                return (None,) * (1 + ctx.n_args)
            red = ctx.spec.req.definition
            if red.cotangents is not None:
                result = {}
                if ctx.jacobians is not None and not torch.is_grad_enabled():
                    # first order: G_iᵀ H_i from the sums the forward reduced (a graph for
                    # higher orders needs the reductions below, which are differentiable)
                    result = ctx.spec.jacobians.gradients(ctx.jacobians, G, arrays, wanted)
                rest = [p for p in wanted if p not in result]
                if rest:
                    result.update(_sum_like_backward(ctx.spec, arrays, values[0], G, rest))
            else:
                result = _selection_backward(ctx.spec, arrays, ctx.indices, G, wanted)
            return (None, *[result.get(p) for p in range(ctx.n_args)])

    _Function = LazymatReduction
    return _Function


# ------------------------------------------------------- Jacobian sums in the forward pass

#: Largest E·(D_1 + ... + D_k) (output dim times the dims of the variables whose Jacobian
#: sums the forward adds): more columns cost the forward more than the backward pass saved.
JACOBIAN_COLUMNS = 16

#: Whether Sums of gradients (and the Jacobian sums of a forward) reduce only the factors
#: that vary with the reduced index, the others applied to the output's rows afterwards
#: (:func:`lazymat.formula.factor.factor_sum`: Σ_j e_ij (x_i - y_j) = x_i Σ_j e_ij - Σ_j e_ij
#: y_j, no pair-level difference). False: the formulas are reduced as they are.
FACTOR_SUMS = True


@dataclass
class _Jacobians:
    """A Sum's forward that also reduces H_i = Σ_j ∂F_ij/∂v for the output-index variables
    and parameters v that require grad: the first-order backward of those is then G_iᵀ H_i
    (no pass over the data), and only the reduced-index variables need a backward pass.

    ``prepared`` runs Concat(F, ∂F/∂v_1, ...) (E + Σ E·D_k columns), or the factored
    columns of ``split`` whose combines give them from the arrays ``inputs``; ``positions``
    and ``dims`` name the v_k; the forward's H waits in ``pending`` for ``setup_context``.
    """

    prepared: plan.Prepared
    E: int
    positions: list[int]
    dims: list[int]
    cats: list[int]
    split: Factored | None = None
    inputs: tuple = ()
    pending: Any = None

    def run(self) -> tuple:
        both, = plan.execute(self.prepared)
        if self.split is not None:
            import torch

            both = torch.cat(_combined(self.split, self.inputs, both), -1)
        self.pending = both[..., self.E:]
        return (both[..., :self.E].contiguous(),)

    def take(self) -> Any:
        H, self.pending = self.pending, None
        return H

    def gradients(self, H: Any, G: Any, arrays: Sequence[Any], wanted: list[int]
                  ) -> dict[int, Any]:
        out, start = {}, 0
        for p, d, cat in zip(self.positions, self.dims, self.cats):
            part = H[..., start:start + self.E * d]
            start += self.E * d
            if p not in wanted:
                continue
            Hp = part.reshape(part.shape[:-1] + (self.E, d))
            g = (G.unsqueeze(-1) * Hp).sum(-2)  # (..., M, d)
            if cat == P_CAT:
                g = g.sum(-2)
            out[p] = _shape_like(g, arrays[p])
        return out


def _forward_jacobians(req: plan.Request, arrays: Sequence[Any],
                       prepared: plan.Prepared) -> _Jacobians | None:
    """The forward with Jacobian sums, when the reduction allows it (Sum), some output-index
    variable or parameter requires grad, no torch.func transform is at work, and the extra
    columns are few (:data:`JACOBIAN_COLUMNS`); else None (the backward reduces them)."""
    red = req.definition
    if not red.jacobian_in_forward or req.weight is not None or any(
            _transformed(a) for a in arrays if is_torch(a)):
        return None
    out_cat = I_CAT if req.axis == 1 else J_CAT
    F, E = req.formula, req.formula.dim
    chosen = [(p, v) for p, a in enumerate(arrays)
              if is_torch(a) and a.requires_grad and (v := _var_at((F,), p)) is not None
              and v.params[2] in (out_cat, P_CAT)]
    if not chosen or E * sum(v.params[1] for _, v in chosen) > JACOBIAN_COLUMNS:
        return None
    one = Const(1, 1)
    columns = [F]
    try:
        for _, v in chosen:
            for k in range(E):  # row k of ∂F/∂v: the gradient of F's component k
                Fk = F if E == 1 else make("Extract", (F,), (k, 1))
                columns.append(grad(Fk, v, one))
    except ShapeError:  # an op without a derivative (BSpline): the backward says so, if asked
        return None
    split = (factor_sum(columns, red.name, J_CAT if req.axis == 1 else I_CAT, len(arrays))
             if FACTOR_SUMS else None)
    formula = _concat(columns) if split is None else split.columns
    extended = plan.reformulate(prepared, replace(req, formula=formula))
    return _Jacobians(extended, E, [p for p, _ in chosen], [v.params[1] for _, v in chosen],
                      [v.params[2] for _, v in chosen], split, tuple(arrays))


# ---------------------------------------------------------------------- helpers

def _vmapped(req: plan.Request, arrays: Sequence[Any], in_dims: Sequence[Any]) -> list:
    """The arrays of a vmapped call with the mapped dim first and all batch dims aligned:
    (B, 1.., *batch, n, D) for a mapped array, (1, 1.., *batch, n, D) for an unmapped one."""
    cats = {v.params[0]: v.params[2] for root in (req.formula, req.weight) if root is not None
            for v in variables(root)}
    inner = [1 if cats.get(p) == P_CAT else 2 for p in range(len(arrays))]
    own = [a.ndim - (0 if d is None else 1) - k for a, d, k in zip(arrays, in_dims, inner)]
    depth = max(own, default=0)
    out = []
    for a, d, n in zip(arrays, in_dims, own):
        if d is None:
            out.append(a.reshape((1,) * (depth - n + 1) + tuple(a.shape)))
        else:
            a = a.movedim(d, 0)
            out.append(a.reshape(a.shape[:1] + (1,) * (depth - n) + tuple(a.shape[1:])))
    return out


def _oriented(spec: _Spec) -> tuple[Node, Node | None]:
    """F and W with category 0 = the output index (axis=0 reductions swap i and j): the
    forward launch's, oriented once by plan (or here, for a spec without one)."""
    if spec.prepared is None:
        req = spec.req
        if req.axis == 1:
            return req.formula, req.weight
        return (plan.swap_categories(req.formula),
                None if req.weight is None else plan.swap_categories(req.weight))
    return spec.prepared.launch.formula, spec.prepared.launch.weight


def _var_at(roots: Sequence[Node | None], position: int) -> Node | None:
    for r in roots:
        if r is None:
            continue
        for v in variables(r):
            if v.params[0] == position:
                return v
    return None


def _shape_like(g: Any, a: Any) -> Any:
    """g summed over the batch dims along which ``a`` was broadcast, then in a's shape."""
    extra = g.ndim - a.ndim
    if extra > 0:
        g = g.sum(tuple(range(extra)))
    dims = tuple(k for k, (ga, aa) in enumerate(zip(g.shape, a.shape)) if aa == 1 and ga != 1)
    if dims:
        g = g.sum(dims, keepdim=True)
    return g.reshape(a.shape)


def _concat(nodes: list[Node]) -> Node:
    out = nodes[0]
    for n in nodes[1:]:
        out = make("Concat", (out, n))
    return out


def _combined(split: Factored, arrays: Sequence[Any], reduced: Any) -> list[Any]:
    """The factored formulas' reductions, from their reduced columns (one array per formula,
    computed on the output's rows)."""
    return evaluate_rows(split.combines, list(arrays) + [reduced], lib_of(reduced), reduced)


def _split_columns(t: Any, dims: list[int]) -> list[Any]:
    out, start = [], 0
    for d in dims:
        out.append(t[..., start:start + d])
        start += d
    return out


def _sum_like_backward(spec: _Spec, arrays, O, G, wanted: list[int]) -> dict[int, Any]:
    red = spec.req.definition
    F, W = _oriented(spec)
    n = len(arrays)
    extra = [G, O]  # (..., M, E): i-variables, with the batch dims of the output
    Gv = Var(n, G.shape[-1], I_CAT)
    Ov = Var(n + 1, O.shape[-1], I_CAT)
    Lv = None
    if red.needs_log_normalizer:
        L, = spec.run(plan.Request("LogSumExp", F, axis=1), list(arrays), spec.names,
                      _oriented_sizes(spec), _oriented_ranges(spec))
        extra.append(L)
        Lv = Var(n + 2, 1, I_CAT)
    cF, cW = red.cotangents(F, W, Gv, Ov, Lv)
    all_arrays = list(arrays) + extra
    names = list(spec.names) + ["the output gradient", "the saved output", "the log-normalizer"]
    result: dict[int, Any] = {}
    # One reduction per category: i-variables and parameters reduce over j, j-variables over i.
    for cats, axis in (((I_CAT, P_CAT), 1), ((J_CAT,), 0)):
        group = [(p, v) for p in wanted if (v := _var_at((F, W), p)) is not None
                 and v.params[2] in cats]
        if not group:
            continue
        formulas = [grad(F, v, cF) + (grad(W, v, cW) if W is not None else 0) for _, v in group]
        # The gradient Sum reduces only what varies with the reduced index (factor_sum).
        split = (factor_sum(formulas, "Sum", J_CAT if axis == 1 else I_CAT, len(all_arrays))
                 if FACTOR_SUMS else None)
        req = plan.Request("Sum", _concat(formulas) if split is None else split.columns,
                           axis=axis)
        g, = spec.run(req, all_arrays, names, _oriented_sizes(spec), _oriented_ranges(spec))
        parts = (_split_columns(g, [f.dim for f in formulas]) if split is None
                 else _combined(split, all_arrays, g))
        for (p, v), part in zip(group, parts):
            if v.params[2] == P_CAT:
                part = part.sum(-2)
            result[p] = _shape_like(part, arrays[p])
    return result


def _oriented_ranges(spec: _Spec) -> tuple | None:
    """The block-sparse 6-tuple in the oriented formula's terms (halves swapped for axis=0),
    so that the backward reductions, over either index, keep the forward's sparsity."""
    if spec.ranges is None or spec.req.axis == 1:
        return spec.ranges
    return tuple(spec.ranges[3:]) + tuple(spec.ranges[:3])


def _tangent(roots: Sequence[Node], tangents, first: int, renamed=None) -> tuple:
    """(directional derivative of each root, tangent arrays): Σ_v Diff(root, v, t_v) over the
    variables v with a tangent, t_v a new variable from position ``first`` on; ``renamed``
    maps a variable to the one it is replaced by (and its tangent's array to use)."""
    extra, tvs = [], {}
    for p, t in enumerate(tangents):
        for v in {v for r in roots if r is not None for v in variables(r) if v.params[0] == p}:
            if t is None:
                continue
            target, array = renamed(v, t) if renamed is not None else (v, t)
            tvs[v] = Var(first + len(extra), target.params[1], target.params[2])
            extra.append(array)
    out = []
    for r in roots:
        d = None
        for v, tv in tvs.items():
            if r is not None and v in variables(r):
                term = diff(r, v, tv)
                d = term if d is None else d + term
        out.append(d)
    return out, extra


def _sum_like_jvp(spec: _Spec, arrays, O, tangents) -> Any:
    """Forward mode: the output's tangent, one Sum of the reduction's ``tangents`` term,
    made of the directional derivatives dF = Σ_v Diff(F, v, t_v) (and dW of the weight),
    the saved output O and (softmax) the log-normalizer L."""
    red, F, W = spec.req.definition, spec.req.formula, spec.req.weight
    n = len(arrays)
    (dF, dW), extra = _tangent((F, W), tangents, n)
    if dF is None and dW is None:
        return None
    out_cat = I_CAT if spec.req.axis == 1 else J_CAT

    def saved(array: Any, dim: int) -> Node:  # an output as a variable of the output index
        extra.append(array)
        return Var(n + len(extra) - 1, dim, out_cat)

    dF = dF if dF is not None else F * 0  # only the weight has a tangent
    Lv = None
    if red.needs_log_normalizer:
        L, = spec.run(plan.Request("LogSumExp", F, axis=spec.req.axis), arrays, spec.names,
                      spec.sizes, spec.ranges)
        Lv = saved(L.reshape(O.shape[:-1] + (1,)), 1)
    T = red.tangents(F, W, dF, dW, saved(O, O.shape[-1]), Lv)
    names = list(spec.names) + [f"tangent {k}" for k in range(len(extra))]
    out, = spec.run(plan.Request("Sum", T, axis=spec.req.axis), list(arrays) + extra, names,
                    spec.sizes, spec.ranges)
    if O is not None and tuple(out.shape) != tuple(O.shape) and out.numel() == O.numel():
        out = out.reshape(O.shape)  # size-1 batch dims that torch.func's nesting added
    return out


def _selection_jvp(spec: _Spec, arrays, O, indices, tangents) -> Any:
    """Forward mode of Min, Max, KMin and their value+index variants: the tangent of each
    selected value is dF at its pair (i, j*), F evaluated on the gathered j*."""
    import torch

    F, _ = _oriented(spec)
    n, D = len(arrays), F.dim
    per_row = 2 if spec.req.definition.needs_k and D > 1 else 1
    batch = tuple(indices.shape[:indices.ndim - 1 - per_row])
    M = indices.shape[len(batch)]
    idx = indices.reshape(batch + (M, -1, D))
    j_vars = [v for v in variables(F) if v.params[2] == J_CAT]
    slots = []  # built out of place: under jacfwd (vmap) the tangents are batched
    for r in range(idx.shape[-2]):
        row = []
        for k in range(D):
            sel = idx[..., r, k]
            valid = sel >= 0
            sel = sel.clamp_min(0)
            gathered = {v: Var(n + q, v.params[1], I_CAT) for q, v in enumerate(j_vars)}
            extra = [_gather(arrays[v.params[0]], sel) for v in j_vars]

            def renamed(v: Node, t: Any) -> tuple[Node, Any]:
                return (gathered[v], _gather(t, sel)) if v in gathered else (v, t)

            Fk = make("Extract", (F,), (k, 1))
            (dFk,), tangent_arrays = _tangent((Fk,), tangents, n + len(extra), renamed)
            if dFk is None:
                row.append(torch.zeros(batch + (M,), dtype=O.dtype, device=O.device))
                continue
            req = plan.Request("Sum", substitute(dFk, gathered), axis=1)
            names = list(spec.names) + [f"argument {q}" for q in range(n, n + len(extra)
                                                                        + len(tangent_arrays))]
            part, = spec.run(req, list(arrays) + extra + tangent_arrays, names, (M, 1))
            row.append(part[..., 0] * valid)
        slots.append(torch.stack(row, -1))
    return torch.stack(slots, -2).reshape(O.shape)


def _oriented_sizes(spec: _Spec) -> tuple[int | None, int | None]:
    M, N = spec.sizes
    return (M, N) if spec.req.axis == 1 else (N, M)


def _selection_backward(spec: _Spec, arrays, indices, G, wanted: list[int]) -> dict[int, Any]:
    import torch

    F, _ = _oriented(spec)
    n = len(arrays)
    D = F.dim
    # indices: (..., M, D), or (..., M, K, D) for K-min ((..., M, K) when D = 1)
    per_row = 2 if spec.req.definition.needs_k and D > 1 else 1
    batch = tuple(indices.shape[:indices.ndim - 1 - per_row])
    M = indices.shape[len(batch)]
    idx = indices.reshape(batch + (M, -1, D))  # (..., M, K, D): the selected j of each slot
    Gs = G.reshape(batch + (M, -1, D))
    _, N_red = _oriented_sizes(spec)
    j_vars = [v for v in variables(F) if v.params[2] == J_CAT]
    gathered = {v: Var(n + 1 + q, v.params[1], I_CAT) for q, v in enumerate(j_vars)}
    names = list(spec.names) + ["the output gradient"] + [
        f"{spec.names[v.params[0]]} at the selected indices" for v in j_vars]
    result: dict[int, Any] = {}
    for r in range(idx.shape[-2]):
        for k in range(D):
            sel = idx[..., r, k]  # (..., M); -1 where a row had nothing to select
            valid = sel >= 0
            sel = sel.clamp_min(0)
            # The selected j-variables become i-variables: F evaluated at the pairs (i, sel_i).
            Fk = substitute(make("Extract", (F,), (k, 1)), gathered)
            g_slot = Gs[..., r, k:k + 1] * valid.unsqueeze(-1)
            extra = [g_slot] + [_gather(arrays[v.params[0]], sel) for v in j_vars]
            all_arrays = list(arrays) + extra
            for p in wanted:
                v = _var_at((F,), p)
                if v is None:
                    continue
                req = plan.Request("Sum", grad(Fk, gathered.get(v, v), Var(n, 1, I_CAT)), axis=1)
                part, = spec.run(req, all_arrays, names, (M, 1))
                if v.params[2] == J_CAT:
                    full = torch.zeros(part.shape[:-2] + (N_red, part.shape[-1]),
                                       dtype=part.dtype, device=part.device)
                    where = sel.expand(part.shape[:-1]).unsqueeze(-1).expand(part.shape)
                    part = full.scatter_add(-2, where, part)
                elif v.params[2] == P_CAT:
                    part = part.sum(-2)
                part = _shape_like(part, arrays[p])
                result[p] = part if p not in result else result[p] + part
    return result


def _gather(y: Any, sel: Any) -> Any:
    """Rows sel (..., M) of a j-variable y (..., N, D), with broadcast batch dims."""
    batch = tuple(sel.shape[:-1])
    lead = (1,) * (len(batch) - (y.ndim - 2)) + tuple(y.shape[:-2])
    full = tuple(max(a, b) for a, b in zip(batch, lead))
    y = y.reshape(lead + tuple(y.shape[-2:])).expand(full + tuple(y.shape[-2:]))
    where = sel.expand(full + sel.shape[-1:]).unsqueeze(-1).expand(
        full + (sel.shape[-1], y.shape[-1]))
    return y.gather(-2, where)


# ---------------------------------------------------------------------- for the custom ops

def forward_request(req: plan.Request) -> plan.Request:
    """The request a forward runs (selections also return the selected indices)."""
    return _forward_request(req)


def gradient_spec(req: plan.Request, names: Sequence[str], backend: str,
                  sizes: tuple[int | None, int | None], like: Any, runner: Any) -> _Spec:
    """What :func:`gradients` needs of a forward call; ``runner(req, arrays, names, sizes,
    ranges)`` runs each gradient reduction (lazymat/torch/ops.py: the custom op again)."""
    return _Spec(req, tuple(names), backend, sizes, like, None, None, (), runner=runner)


def gradients(spec: _Spec, arrays: Sequence[Any], values: Sequence[Any], indices: Any, G: Any,
              wanted: list[int]) -> dict[int, Any]:
    """position -> gradient of the inputs ``wanted``, given the forward's saved value outputs,
    selected indices (selections) and the output gradient G: the backward's reductions."""
    if spec.req.definition.cotangents is not None:
        return _sum_like_backward(spec, arrays, values[0], G, wanted)
    return _selection_backward(spec, arrays, indices, G, wanted)


def batched(req: plan.Request, arrays: Sequence[Any], in_dims: Sequence[Any]) -> list:
    """The arrays of a vmapped call, the mapped dim first as the outermost batch dim."""
    return _vmapped(req, arrays, in_dims)
