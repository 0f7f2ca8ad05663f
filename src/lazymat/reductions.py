"""Every reduction, defined once: its outputs, its partial state, its rules and its C code.

A reduction folds the values F_ij of one output row i over j. Each one here
gives, side by side:

- ``outputs(fdim, K, wdim)``: the kinds and shapes of its outputs ("value" or
  int64 "index"), and ``identity``: what they hold for a row that saw no column;
- ``state(fdim, K, wdim)``: the kinds and shapes of its raw partial state
  ("value", "acc": the accumulator type, "index"), and ``state_fill``: the
  state of a row that saw no column. Kernels store it with ``store="state"``;
- the reference rules on arrays: ``block`` (the state of a dense block of
  values, j starting at ``j0``), ``merge`` (two states of the same rows, the
  second one holding larger j, its indices already global), ``finalize``
  (state -> outputs). Column splits (CUDA, CPU threads, Dask) combine the
  states of their parts with ``merge``;
- the C code of the kernel: ``c_decl`` (per block of rows), ``c_tile`` (fold
  one tile of values), ``c_store`` (finalize and write the outputs),
  ``c_state_store`` (write the raw state);
- the gradient facts: ``cotangents`` (reverse mode) and ``tangents`` (forward
  mode) of sum-like reductions, ``selects_with`` of selections.

NaN and inf follow numpy and torch (the README's "NaN and inf"): Min/Max return
NaN and ArgMin/ArgMax the first NaN's index; KMin sorts NaN last (after +inf,
as ``numpy.sort`` and ``torch.topk`` do); LogSumExp of a row with NaN is NaN,
else of a row with +inf +inf; SumSoftMaxWeight of a row with NaN is NaN, of a
row with +inf the mean of the weights at the +inf entries (the limit).

>>> REDUCTIONS["Sum"].outputs(fdim=3, K=None, wdim=None)
[('value', (3,))]
>>> REDUCTIONS["Min_ArgMin"].state(fdim=3, K=None, wdim=None)
[('value', (3,)), ('index', (3,))]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .formula import Node, make

INF = float("inf")

Shapes = list[tuple[str, tuple[int, ...]]]  # (kind, shape per row) of each array


@dataclass(frozen=True, kw_only=True)
class ReductionDef:
    """One reduction's facts (see the module docstring).

    >>> REDUCTIONS["KMin_ArgKMin"].outputs(fdim=2, K=3, wdim=None)
    [('value', (3, 2)), ('index', (3, 2))]
    """

    name: str
    doc: str
    output_kinds: tuple[str, ...]  # "value" | "index", in output order
    out_shape: Callable[[int, int | None, int | None], tuple[int, ...]]  # each output, per row
    identity: tuple[float, ...]  # what each output holds when nothing is reduced (N = 0)
    state: Callable[[int, int | None, int | None], Shapes]
    state_fill: tuple[float, ...]  # each state array of a row that saw no column
    block: Callable[..., tuple]
    merge: Callable[..., tuple]
    finalize: Callable[..., tuple]
    c_decl: Callable[[Any], list[str]]
    c_tile: Callable[[Any], list[str]]
    c_store: Callable[[Any], list[str]]
    c_state_store: Callable[[Any], list[str]]
    needs_k: bool = False
    weight: str = "none"  # "none", "optional" or "required": whether formula2 (G) is used
    scalar_formula: bool = False  # F must have dim 1 (LogSumExp, SumSoftMaxWeight)
    # Gradient rules. Sum-like reductions give ``cotangents(F, W, G, O, L)``: the cotangents
    # of the formula F and the weight W, from the output cotangent G, the saved output O and
    # (softmax) the log-normalizer L, all formulas in the output index; and
    # ``tangents(F, W, dF, dW, O, L)``: the term T_ij whose sum over j is the output's
    # tangent, from the directional derivatives dF and dW (dW None without a weight).
    # Selection reductions (Min, KMin, ...) name ``selects_with``, the reduction that also
    # returns the selected indices: the gradient flows to those pairs only. Neither: no
    # gradient (Arg*).
    cotangents: Callable[..., tuple[Node, Node | None]] | None = None
    tangents: Callable[..., Node] | None = None
    # Linear in F with no weight (Sum): the output cotangent G_i factors out of the reduced
    # index, ∂L/∂x_i = G_iᵀ Σ_j ∂F_ij/∂x_i, so the Jacobian sums of the output-index
    # variables and parameters can be reduced in the forward pass itself (autograd.py).
    jacobian_in_forward: bool = False
    # ``fuses(dim, scheme, lanes_innermost)``: whether ``c_tile`` folds all ``dim``
    # components in one loop over the tile's columns, reading each value once (Sum, few
    # components): the scaffold then computes a formula part that is one elementwise op of
    # stored values (e_ij b_j * y_j) where the loop reads it, not in a buffer.
    fuses: Callable[[int, str, bool], bool] | None = None
    selects_with: str | None = None
    needs_log_normalizer: bool = False

    def outputs(self, fdim: int, K: int | None, wdim: int | None) -> Shapes:
        """(kind, shape per row) of each output, in order."""
        shape = self.out_shape(fdim, K, wdim)
        return [(kind, shape) for kind in self.output_kinds]


REDUCTIONS: dict[str, ReductionDef] = {}

# Alternative spellings accepted from users.
ALIASES = {"LogSumExpWeight": "LogSumExp", "SoftMax": "SumSoftMaxWeight",
           "MinArgMin": "Min_ArgMin", "MaxArgMax": "Max_ArgMax",
           "KMinArgKMin": "KMin_ArgKMin", "Kmin": "KMin", "ArgKmin": "ArgKMin",
           "Kmin_ArgKmin": "KMin_ArgKMin"}


def get(name: str) -> ReductionDef:
    return REDUCTIONS[ALIASES.get(name, name)]


def _loop(var: str, n: Any, body: str) -> str:
    return f"for (int {var} = 0; {var} < {n}; {var}++) {body}"


def _lanes(body: str) -> list[str]:
    """A loop over the lanes (rows) of the block, which the compiler vectorizes (LM_SIMD:
    the target's vectorization hint, empty where a thread has one row)."""
    return ["LM_SIMD", f"for (int l = 0; l < LANES; l++) {{ {body} }}"]


def _isnan(a: Any) -> Any:
    return a != a  # numpy and torch alike


# --------------------------------------------------------------------------- Sum

def _sum_block(xp, values, weights, j0, K=None):
    return (xp.sum(values, 1),)


def _sum_decl(rc):
    lines = [rc.array(rc.acc, "acc", rc.D, "LANES"),
             _loop("k", rc.D, _loop("l", "LANES", "acc[k][l] = 0;"))]
    if rc.scheme == "kahan":
        lines += [rc.array(rc.acc, "comp", rc.D, "LANES"),
                  _loop("k", rc.D, _loop("l", "LANES", "comp[k][l] = 0;"))]
    return lines


#: The most components a Sum tile folds in one loop (one partial sum each, in registers).
SUM_FUSED_COMPONENTS = 8


def _sum_fuses(dim: int, scheme: str, lanes_innermost: bool) -> bool:
    return 2 <= dim <= SUM_FUSED_COMPONENTS and scheme == "block" and not lanes_innermost


def _sum_tile(rc):
    if _sum_fuses(rc.D, rc.scheme, rc.lanes_innermost):
        return _sum_tile_fused(rc)
    # One loop per part of the formula (a concatenation's parts are read where they are,
    # not copied): accumulator row `at + k` takes component k of the part.
    lines = []
    for at, dim, V in rc.parts():
        lines += _sum_tile_part(rc, dim, V, f"{at} + k" if at else "k")
    return lines


def _sum_tile_part(rc, dim: int, V, row: str) -> list[str]:
    if rc.scheme == "direct":  # every term straight into the accumulator
        return ["for (int jj = 0; jj < tj; jj++)",
                f"  for (int k = 0; k < {dim}; k++) {{",
                *["    " + s for s in _lanes(f"acc[{row}][l] += ({rc.acc}){V('k')};")],
                "  }"]
    if rc.scheme == "kahan":  # compensated: the rounding error of each addition is kept
        return ["for (int jj = 0; jj < tj; jj++)",
                f"  for (int k = 0; k < {dim}; k++) {{",
                *["    " + s for s in _lanes(
                    f"{rc.acc} v = ({rc.acc}){V('k')} - comp[{row}][l]; "
                    f"{rc.acc} t = acc[{row}][l] + v; comp[{row}][l] = (t - acc[{row}][l]) - v; "
                    f"acc[{row}][l] = t;")],
                "  }"]
    # Block sums (the default): tile partial sums in T, accumulated into the accumulator
    # (double by default) once per tile: float32 sums over millions of terms keep ~1e-7
    # relative error. Lanes outside, columns inside, so that each partial sum stays in a
    # register; full tiles get a loop of TJ columns, whose fixed count lets the compiler
    # vectorize the outer loop.
    def tile(count: str) -> list[str]:
        if rc.lanes_innermost:  # clang vectorizes innermost loops only: a partial sum per lane
            return [f"{rc.T} t[LANES];", *_lanes("t[l] = 0;"),
                    f"for (int jj = 0; jj < {count}; jj++) {{",
                    *["  " + s for s in _lanes(f"t[l] += {V('k')};")], "}",
                    *_lanes(f"acc[{row}][l] += t[l];")]
        return _lanes(f"{rc.T} t = 0; for (int jj = 0; jj < {count}; jj++) t += {V('k')}; "
                      f"acc[{row}][l] += t;")
    return [f"for (int k = 0; k < {dim}; k++) {{",
            "  if (tj == TJ) {", *["    " + s for s in tile("TJ")], "  } else {",
            *["    " + s for s in tile("tj")], "  }", "}"]


def _sum_tile_fused(rc):
    # Few components (a gradient's parts, a forward with its Jacobian sums): one loop over
    # the columns with a partial sum per component, so that each value is read once and a
    # part computed where it is read (e_ij b_j * y_j) needs no buffer; measured 1.08x a
    # one-column Sum for [e b, e b y] at D = 3, against 1.3x with a loop per component.
    names = [f"s{k}" for k in range(rc.D)]
    terms = [(at + k, V(k)) for at, dim, V in rc.parts() for k in range(dim)]
    adds = " ".join(f"s{c} += {v};" for c, v in terms)
    stores = " ".join(f"acc[{c}][l] += s{c};" for c in range(rc.D))

    def tile(count: str) -> list[str]:
        return _lanes(f"{rc.T} {' = 0, '.join(names)} = 0; "
                      f"for (int jj = 0; jj < {count}; jj++) {{ {adds} }} {stores}")
    return ["if (tj == TJ) {", *["  " + s for s in tile("TJ")], "} else {",
            *["  " + s for s in tile("tj")], "}"]


def _sum_store(rc):
    return [_loop("k", rc.D, f"{rc.out(0)}[row * {rc.D} + k] = ({rc.T})acc[k][l];")]


def _sum_state_store(rc):
    return [_loop("k", rc.D, f"{rc.out(0)}[row * {rc.D} + k] = acc[k][l];")]


REDUCTIONS["Sum"] = ReductionDef(
    name="Sum", doc="Σ_j F_ij, per component",
    output_kinds=("value",), out_shape=lambda fdim, K, wdim: (fdim,), identity=(0.0,),
    state=lambda fdim, K, wdim: [("acc", (fdim,))], state_fill=(0.0,),
    block=_sum_block, merge=lambda xp, a, b, K=None: (a[0] + b[0],),
    finalize=lambda xp, s: s,
    c_decl=_sum_decl, c_tile=_sum_tile, c_store=_sum_store, c_state_store=_sum_state_store,
    cotangents=lambda F, W, G, O, L: (G, None),
    tangents=lambda F, W, dF, dW, O, L: dF, jacobian_in_forward=True, fuses=_sum_fuses)


# --------------------------------------------------------------------------- Min / Max and arg

def _extremum(name: str, smaller: bool, outputs: tuple[str, ...]):
    xp_pick = "amin" if smaller else "amax"
    arg_pick = "argmin" if smaller else "argmax"
    init = "INFINITY_T" if smaller else "-INFINITY_T"
    worst = INF if smaller else -INF
    # "v is better than best, or v is NaN", false once best is NaN: NaN propagates and the
    # first NaN (or the first of equal values) is kept. One unordered compare.
    better_or_nan = "!(v >= best[k][l])" if smaller else "!(v <= best[k][l])"

    def block(xp, values, weights, j0, K=None):
        # numpy and torch: amin/amax propagate NaN, argmin/argmax give the first NaN.
        return getattr(xp, xp_pick)(values, 1), getattr(xp, arg_pick)(values, 1) + j0

    def merge(xp, a, b, K=None):
        (va, ia), (vb, ib) = a, b
        # b holds larger j: take it only when strictly better (first index on ties), when
        # it is the first NaN, or when a saw no column.
        better = (vb < va) if smaller else (vb > va)
        take_b = (better | _isnan(vb) | (ia < 0)) & ~_isnan(va)
        return xp.where(take_b, vb, va), xp.where(take_b, ib, ia)

    def finalize(xp, state):
        v, i = state
        return tuple(v if o == "value" else i for o in outputs)

    def decl(rc):
        # Index -1 = nothing seen yet: the first value seen is always taken, so a row whose
        # values are all +inf (-inf) gets its first column, and an empty row keeps -1.
        return [rc.array(rc.T, "best", rc.D, "LANES"),
                rc.array("long long", "arg", rc.D, "LANES"),
                _loop("k", rc.D, _loop("l", "LANES",
                                       f"{{ best[k][l] = {init}; arg[k][l] = -1; }}"))]

    def tile(rc):
        # A row's first column is taken once per tile, outside the pair loop (so a row of
        # +inf gets its first index); the pair loop then needs no test of the index.
        return [f"for (int k = 0; k < {rc.D}; k++) {{",
                "  const int jj = 0;",
                f"  for (int l = 0; l < LANES; l++) if (arg[k][l] < 0) {{ "
                f"best[k][l] = {rc.V('k')}; arg[k][l] = j0; }}",
                "}",
                f"for (int k = 0; k < {rc.D}; k++) for (int jj = 0; jj < tj; jj++) {{",
                *["  " + s for s in _lanes(
                    f"{rc.T} v = {rc.V('k')}; "
                    f"bool take = {better_or_nan} & (best[k][l] == best[k][l]); "
                    "best[k][l] = take ? v : best[k][l]; arg[k][l] = take ? j0 + jj : arg[k][l];")],
                "}"]

    def store(rc):
        lines = []
        for n, o in enumerate(outputs):
            src = "best" if o == "value" else "arg"
            lines.append(_loop("k", rc.D, f"{rc.out(n)}[row * {rc.D} + k] = {src}[k][l];"))
        return lines

    def state_store(rc):
        return [_loop("k", rc.D, f"{rc.out(0)}[row * {rc.D} + k] = best[k][l];"),
                _loop("k", rc.D, f"{rc.out(1)}[row * {rc.D} + k] = arg[k][l];")]

    REDUCTIONS[name] = ReductionDef(
        name=name,
        doc=f"{'min' if smaller else 'max'}_j F_ij per component ({', '.join(outputs)})",
        output_kinds=outputs, out_shape=lambda fdim, K, wdim: (fdim,),
        identity=tuple(worst if o == "value" else -1 for o in outputs),
        state=lambda fdim, K, wdim: [("value", (fdim,)), ("index", (fdim,))],
        state_fill=(worst, -1),
        block=block, merge=merge, finalize=finalize,
        c_decl=decl, c_tile=tile, c_store=store, c_state_store=state_store,
        selects_with=(("Min_ArgMin" if smaller else "Max_ArgMax") if "value" in outputs
                      else None))


_extremum("Min", True, ("value",))
_extremum("Max", False, ("value",))
_extremum("ArgMin", True, ("index",))
_extremum("ArgMax", False, ("index",))
_extremum("Min_ArgMin", True, ("value", "index"))
_extremum("Max_ArgMax", False, ("value", "index"))


# --------------------------------------------------------------------------- K-min

def _kmin_sorted(xp, v, i, K):
    """The first K slots of (v, i) along axis 1 in KMin's order: values ascending, NaN after
    +inf (numpy's and torch's sorts), empty slots (index -1) last; stable, so the first
    index wins ties."""
    order = xp.stable_argsort(v, 1)
    v, i = xp.take_along(v, order, 1), xp.take_along(i, order, 1)
    order = xp.stable_argsort((i < 0) * 1, 1)[:, :K]
    return xp.take_along(v, order, 1), xp.take_along(i, order, 1)


def _kmin(name: str, outputs: tuple[str, ...]):
    def block(xp, values, weights, j0, K):
        # values (m, n, D): the K smallest along n, ascending, first index on ties.
        order = xp.stable_argsort(values, 1)[:, :K, :]
        v, i = xp.take_along(values, order, 1), order + j0
        short = K - v.shape[1]
        if short > 0:  # fewer columns than K (ranges): empty slots hold +inf and index -1
            v = xp.concat([v, xp.full((v.shape[0], short, v.shape[2]), INF, like=v)], 1)
            i = xp.concat([i, xp.full((i.shape[0], short, i.shape[2]), -1, like=i)], 1)
        return v, i

    def merge(xp, a, b, K):
        (va, ia), (vb, ib) = a, b
        return _kmin_sorted(xp, xp.concat([va, vb], 1), xp.concat([ia, ib], 1), K)

    def finalize(xp, state):
        v, i = state
        return tuple(v if o == "value" else i for o in outputs)

    def decl(rc):
        # Index -1 marks an empty slot, larger than any value (+inf and NaN included): rows
        # whose values are +inf keep their first columns, slots of an empty row stay -1.
        return [rc.array(rc.T, "kv", rc.D, rc.K, "LANES"),
                rc.array("long long", "ki", rc.D, rc.K, "LANES"),
                _loop("k", rc.D, _loop("r", rc.K, _loop(
                    "l", "LANES", "{ kv[k][r][l] = INFINITY_T; ki[k][r][l] = -1; }")))]

    def tile(rc):
        # Cheap threshold test against the current K-th value; sorted insertion only
        # for the rare candidates that pass it.
        # The test runs on all lanes at once (vectorized); most columns end there.
        # "v before w" in KMin's order: !(v >= w) & (v == v) is v < w, or w NaN and v not
        # (one unordered compare): NaN goes after every number, after earlier NaN.
        K = rc.K

        def before(v: str, r: str) -> str:
            return f"((!({v} >= kv[k][{r}][l]) & ({v} == {v})) | (ki[k][{r}][l] < 0))"

        return [f"for (int k = 0; k < {rc.D}; k++) for (int jj = 0; jj < tj; jj++) {{",
                "  int pass = 0;",
                "  LM_SIMD_OR(pass)",
                # (a superset of "before": a NaN passes here, the exact test below drops it)
                f"  for (int l = 0; l < LANES; l++) pass |= !({rc.V('k')} >= kv[k][{K - 1}][l]) "
                f"| (ki[k][{K - 1}][l] < 0);",
                "  if (!pass) continue;",
                "  for (int l = 0; l < LANES; l++) {",
                f"    {rc.T} v = {rc.V('k')};",
                f"    if (!{before('v', str(K - 1))}) continue;",
                f"    int r = {K - 1};",
                f"    while (r > 0 && {before('v', 'r - 1')}) {{",
                "      kv[k][r][l] = kv[k][r - 1][l]; ki[k][r][l] = ki[k][r - 1][l]; r--; }",
                "    kv[k][r][l] = v; ki[k][r][l] = j0 + jj;",
                "  }",
                "}"]

    def write(rc, n: int, src: str) -> str:
        return _loop("r", rc.K, _loop(
            "k", rc.D, f"{rc.out(n)}[(row * {rc.K} + r) * {rc.D} + k] = {src}[k][r][l];"))

    def store(rc):
        return [write(rc, n, "kv" if o == "value" else "ki") for n, o in enumerate(outputs)]

    REDUCTIONS[name] = ReductionDef(
        name=name, doc=f"the K smallest F_ij over j, ascending ({', '.join(outputs)})",
        output_kinds=outputs, out_shape=lambda fdim, K, wdim: (K, fdim),
        identity=tuple(INF if o == "value" else -1 for o in outputs),
        state=lambda fdim, K, wdim: [("value", (K, fdim)), ("index", (K, fdim))],
        state_fill=(INF, -1),
        block=block, merge=merge, finalize=finalize,
        c_decl=decl, c_tile=tile, c_store=store,
        c_state_store=lambda rc: [write(rc, 0, "kv"), write(rc, 1, "ki")],
        needs_k=True,
        selects_with="KMin_ArgKMin" if "value" in outputs else None)


_kmin("KMin", ("value",))
_kmin("ArgKMin", ("index",))
_kmin("KMin_ArgKMin", ("value", "index"))


# --------------------------------------------------------------------------- LogSumExp family
#
# State (m, s0, s): m the running max of F (NaN once a NaN is seen), s0 = Σ_j r(F_j, m) and
# s_e = Σ_j r(F_j, m) W_je with r(v, m) = 1 if v == m, else exp(v - m). For a finite m that
# is exp(v - m); for m = +inf it counts the +inf entries (their softmax limit); for m = -inf
# (all F = -inf) the sums are not used: finalize gives -inf and 0.

def _rel(xp, v, m):
    with xp.errstate():
        return xp.where(v == m, 1.0, xp.exp(v - m))


def _shifted_exp_block(xp, values, weights, j0, K=None):
    # values (m, n, 1), weights (m, n, E) or None
    mx = xp.amax(values, 1)  # (m, 1); NaN propagates
    e = _rel(xp, values, xp.expand_dims(mx, 1))
    s = xp.sum(e if weights is None else e * weights, 1)
    return mx, xp.sum(e, 1), s


def _shifted_exp_merge(xp, a, b, K=None):
    (ma, s0a, sa), (mb, s0b, sb) = a, b
    m = xp.maximum(ma, mb)  # NaN propagates
    fa, fb = _rel(xp, ma, m), _rel(xp, mb, m)
    return m, s0a * fa + s0b * fb, sa * fa + sb * fb


def _lse_decl(rc):
    lines = [f"{rc.T} mx[LANES]; {rc.acc} s0[LANES]; {rc.T} ex[TJ][LANES];",
             rc.array(rc.acc, "s", rc.E, "LANES"),
             _loop("l", "LANES", "{ mx[l] = -INFINITY_T; s0[l] = 0; }"),
             _loop("e", rc.E, _loop("l", "LANES", "s[e][l] = 0;"))]
    if rc.scheme == "kahan":  # the compensations, rescaled with the sums
        lines += [f"{rc.acc} kc0[LANES];", rc.array(rc.acc, "kc", rc.E, "LANES"),
                  _loop("l", "LANES", "kc0[l] = 0;"),
                  _loop("e", rc.E, _loop("l", "LANES", "kc[e][l] = 0;"))]
    return lines


def _lse_tile(rc):
    # Two passes over the tile: its max (rescale the running sums once), then the
    # shifted exponentials, stored once and reused for every weight component. The sums
    # follow the accumulation options as Sum does: per-tile partial sums in T added to
    # the accumulator (block, the default), every term straight into it (direct), or
    # compensated (kahan). A NaN needs no test: exp(NaN - max) is NaN, and so are the
    # sums from then on (the C max ignores it; the reference's is NaN: both finalize to
    # NaN). An infinite max (rare: +inf values, rows of -inf) takes the pass that applies
    # r(v, m) = 1 where v == m.
    acc = rc.acc
    rescale = f"s0[l] *= sc; for (int e = 0; e < {rc.E}; e++) s[e][l] *= sc;"
    if rc.scheme == "kahan":
        rescale += f" kc0[l] *= sc; for (int e = 0; e < {rc.E}; e++) kc[e][l] *= sc;"
    lines = [f"{rc.T} tm[LANES];",
             "for (int l = 0; l < LANES; l++) tm[l] = mx[l];",
             "for (int jj = 0; jj < tj; jj++) {",
             *["  " + s for s in _lanes(f"{rc.T} v = {rc.V(0)}; tm[l] = v > tm[l] ? v : tm[l];")],
             "}",
             "int inf_lanes = 0;",
             "for (int l = 0; l < LANES; l++) {",
             f"  {acc} sc = (mx[l] == tm[l]) ? ({acc})1 : lm_exp(({acc})mx[l] - ({acc})tm[l]);",
             f"  {rescale} mx[l] = tm[l];",
             "  inf_lanes |= (tm[l] == INFINITY_T) | (tm[l] == -INFINITY_T); }"]
    fast = f"{rc.T} x = lm_exp({rc.V(0)} - mx[l]);"
    slow = f"{rc.T} v = {rc.V(0)}; {rc.T} x = (v == mx[l]) ? ({rc.T})1 : lm_exp(v - mx[l]);"

    def both(body: str) -> list[str]:
        """The loop over the tile's columns, with the usual or the infinite-max shift."""
        return ["if (!inf_lanes) {", "  for (int jj = 0; jj < tj; jj++) {",
                *["    " + t for t in _lanes(f"{fast} {body}")], "  }",
                "} else {", "  for (int jj = 0; jj < tj; jj++) {",
                *["    " + t for t in _lanes(f"{slow} {body}")], "  }", "}"]

    if rc.scheme == "block":
        return lines + [f"{rc.T} ts0[LANES] = {{0}};",
                        *both("ex[jj][l] = x; ts0[l] += x;"),
                        "for (int l = 0; l < LANES; l++) s0[l] += ts0[l];",
                        *_weighted_sums(rc)]
    if rc.scheme == "direct":
        add0 = f"s0[l] += ({acc})x;"
        add = f"s[e][l] += ({acc})x * ({acc}){rc.W('e')};"
    else:
        add0 = f"{acc} y = ({acc})x - kc0[l], t = s0[l] + y; kc0[l] = (t - s0[l]) - y; s0[l] = t;"
        add = (f"{acc} y = ({acc})x * ({acc}){rc.W('e')} - kc[e][l], t = s[e][l] + y; "
               "kc[e][l] = (t - s[e][l]) - y; s[e][l] = t;")
    return lines + [*both(f"ex[jj][l] = x; {add0}"),
                    f"for (int e = 0; e < {rc.E}; e++) for (int jj = 0; jj < tj; jj++) {{",
                    *["  " + s for s in _lanes(f"{rc.T} x = ex[jj][l]; {add}")],
                    "}"]


def _weighted_sums(rc) -> list[str]:
    """s[e] += Σ_jj ex[jj] W_e over the tile, WIDTH weight components at a time. The lanes
    are the outer (vectorized) loop and the columns the inner one, so that the WIDTH
    accumulators of each lane stay in registers; full tiles get a loop of TJ columns, whose
    fixed count lets the compiler vectorize the outer loop."""
    lines = []
    width = 8
    for w, first, last in ((width, "0", f"{rc.E} - {rc.E} % {width}"),
                           (1, f"{rc.E} - {rc.E} % {width}", str(rc.E))):
        copies = range(w)
        update = " ".join(f"w{u} += x * {rc.W(f'(e0 + {u})')};" for u in copies)

        def body(count: str) -> list[str]:
            if rc.lanes_innermost:  # clang vectorizes innermost loops only
                inner = update.replace("+=", "[l] +=")
                return [f"{rc.T} " + ", ".join(f"w{u}[LANES]" for u in copies) + ";",
                        *_lanes(" ".join(f"w{u}[l] = 0;" for u in copies)),
                        f"for (int jj = 0; jj < {count}; jj++) {{",
                        *["  " + t for t in _lanes(f"{rc.T} x = ex[jj][l]; {inner}")], "}",
                        *_lanes(" ".join(f"s[e0 + {u}][l] += w{u}[l];" for u in copies))]
            return _lanes(f"{rc.T} " + ", ".join(f"w{u} = 0" for u in copies) + "; "
                          f"for (int jj = 0; jj < {count}; jj++) {{ {rc.T} x = ex[jj][l]; "
                          f"{update} }} "
                          + " ".join(f"s[e0 + {u}][l] += w{u};" for u in copies))

        lines += [f"for (int e0 = {first}; e0 < {last}; e0 += {w}) {{",
                  "  if (tj == TJ) {", *["    " + t for t in body("TJ")], "  } else {",
                  *["    " + t for t in body("tj")], "  }", "}"]
    return lines


def _shifted_exp_state_store(rc):
    return [f"{rc.out(0)}[row] = mx[l];", f"{rc.out(1)}[row] = s0[l];",
            _loop("e", rc.E, f"{rc.out(2)}[row * {rc.E} + e] = s[e][l];")]


def _lse_cotangents(F, W, G, O):
    # out_e = log Σ_j exp(F) W_e: ∂out_e/∂F = exp(F - out_e) W_e, ∂out_e/∂W_e = exp(F - out_e).
    p = make("Exp", (F - O,))
    if W is None:
        return G * p, None
    return make("Sum", (G * p * W,)), G * p


def _lse_tangents(F, W, dF, dW, O, L):
    # d log Σ exp(F) W = Σ exp(F - O) (W dF + dW)
    p = make("Exp", (F - O,))
    return p * (dF if W is None else W * dF + (dW if dW is not None else W * 0))


def _softmax_cotangents(F, W, G, O, L):
    # out = Σ_j s_j W_j with s = softmax(F): ∂out/∂W_j = s_j, ∂<G, out>/∂F_j = s_j <G, W_j - out>.
    s = make("Exp", (F - L,))
    return s * make("Sum", (G * (W - O),)), s * G


def _softmax_tangents(F, W, dF, dW, O, L):
    # O = Σ p W with p = exp(F - L): dO = Σ p (dF (W - O) + dW)
    return make("Exp", (F - L,)) * (dF * (W - O) + (dW if dW is not None else W * 0))


def _lse_finalize(xp, state):
    m, s0, s = state
    with xp.errstate():
        # m = -inf: every F is -inf (or no column): -inf, NaN if a weight is NaN.
        return (xp.where(m == -INF, xp.where(_isnan(s), s, m), m + xp.log(s)),)


def _lse_store(rc):
    return [_loop("e", rc.E, f"{rc.out(0)}[row * {rc.E} + e] = mx[l] == -INFINITY_T ? "
                             f"(s[e][l] != s[e][l] ? ({rc.T})s[e][l] : -INFINITY_T) : "
                             f"({rc.T})((double)mx[l] + lm_log(s[e][l]));")]


REDUCTIONS["LogSumExp"] = ReductionDef(
    name="LogSumExp", doc="log Σ_j exp(F_ij) [G_ij], computed with a running max (stable)",
    output_kinds=("value",), out_shape=lambda fdim, K, wdim: (wdim or 1,), identity=(-INF,),
    state=lambda fdim, K, wdim: [("value", (1,)), ("acc", (1,)), ("acc", (wdim or 1,))],
    state_fill=(-INF, 0.0, 0.0),
    block=_shifted_exp_block, merge=_shifted_exp_merge, finalize=_lse_finalize,
    c_decl=_lse_decl, c_tile=_lse_tile, c_store=_lse_store,
    c_state_store=_shifted_exp_state_store,
    weight="optional", scalar_formula=True,
    cotangents=lambda F, W, G, O, L: _lse_cotangents(F, W, G, O),
    tangents=_lse_tangents)


def _softmax_finalize(xp, state):
    m, s0, s = state
    with xp.errstate():
        # m = -inf: every F is -inf (or no column): 0, NaN if a weight is NaN.
        masked = xp.where(_isnan(s), s, 0.0)
        return (xp.where(m == -INF, masked, s / xp.where(m == -INF, 1.0, s0)),)


def _softmax_store(rc):
    return [_loop("e", rc.E, f"{rc.out(0)}[row * {rc.E} + e] = mx[l] == -INFINITY_T ? "
                             f"(s[e][l] != s[e][l] ? ({rc.T})s[e][l] : ({rc.T})0) : "
                             f"({rc.T})(s[e][l] / s0[l]);")]


REDUCTIONS["SumSoftMaxWeight"] = ReductionDef(
    name="SumSoftMaxWeight", doc="Σ_j exp(F_ij) G_ij / Σ_j exp(F_ij) (attention)",
    output_kinds=("value",), out_shape=lambda fdim, K, wdim: (wdim,), identity=(0.0,),
    state=lambda fdim, K, wdim: [("value", (1,)), ("acc", (1,)), ("acc", (wdim,))],
    state_fill=(-INF, 0.0, 0.0),
    block=_shifted_exp_block, merge=_shifted_exp_merge, finalize=_softmax_finalize,
    c_decl=_lse_decl, c_tile=_lse_tile, c_store=_softmax_store,
    c_state_store=_shifted_exp_state_store,
    weight="required", scalar_formula=True,
    cotangents=lambda F, W, G, O, L: _softmax_cotangents(F, W, G, O, L),
    tangents=_softmax_tangents,
    needs_log_normalizer=True)
