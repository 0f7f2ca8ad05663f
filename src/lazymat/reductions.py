"""Every reduction, defined once: its outputs, its reference rules and its C code.

A reduction folds the values F_ij of one output row i over j. Each one here
gives, side by side:

- ``out_dims``: the shapes of its outputs (values and/or int64 indices);
- the reference rules on arrays: ``block`` (the state of a dense block of
  values, j starting at ``j0``), ``merge`` (two states of the same rows, the
  second one holding larger j), ``finalize`` (state -> outputs). Tiles,
  threads, chunks and distributed runs all combine partial states with
  ``merge``;
- the C code of the lane kernel: ``c_decl``/``c_init`` (per block of rows),
  ``c_tile`` (fold one tile of values), ``c_store`` (finalize and write).

>>> REDUCTIONS["Sum"].out_dims(fdim=3, K=None, wdim=None)
[('value', (3,))]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .formula import Node, make

INF = float("inf")


@dataclass(frozen=True)
class ReductionDef:
    name: str
    needs_k: bool
    weight: str  # "none", "optional" or "required": whether formula2 (G) is used
    scalar_formula: bool  # F must have dim 1 (LogSumExp, SumSoftMaxWeight)
    out_dims: Callable[..., list[tuple[str, tuple[int, ...]]]]
    identity: tuple[float, ...]  # what each output holds when nothing is reduced (N = 0)
    block: Callable[..., Any]
    merge: Callable[..., Any]
    finalize: Callable[..., tuple]
    c_decl: Callable[[Any], list[str]]
    c_tile: Callable[[Any], list[str]]
    c_store: Callable[[Any], list[str]]
    doc: str = ""
    # Gradient rule. Sum-like reductions give ``cotangents(F, W, G, O, L)``: the cotangents
    # of the formula F and the weight W, from the output cotangent G, the saved output O and
    # (softmax) the log-normalizer L, all formulas in the output index. Selection reductions
    # (Min, KMin, ...) name ``selects_with``, the reduction that also returns the selected
    # indices: the gradient flows to those pairs only. Neither: no gradient (Arg*).
    cotangents: Callable[..., tuple[Node, Node | None]] | None = None
    selects_with: str | None = None
    needs_log_normalizer: bool = False
    # Splitting the columns (the CUDA backend does, when there are too few rows to fill the
    # GPU): each part runs the reduction ``split_with``, ``state_of(xp, outputs)`` turns its
    # outputs into a state of this reduction, and ``merge`` then ``finalize`` combine the
    # parts. None: the outputs do not hold enough to combine (SumSoftMaxWeight).
    split_with: str | None = None
    state_of: Callable[[Any, tuple], Any] | None = None


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


# --------------------------------------------------------------------------- Sum

def _sum_block(xp, values, weights, j0, K=None):
    return xp.sum(values, 1)


def _sum_decl(rc):
    lines = [rc.array(rc.acc, "acc", rc.D, "LANES"),
             _loop("k", rc.D, _loop("l", "LANES", "acc[k][l] = 0;"))]
    if rc.scheme == "kahan":
        lines += [rc.array(rc.acc, "comp", rc.D, "LANES"),
                  _loop("k", rc.D, _loop("l", "LANES", "comp[k][l] = 0;"))]
    return lines


def _sum_tile(rc):
    if rc.scheme == "direct":  # every term straight into the accumulator
        return ["for (int jj = 0; jj < tj; jj++)",
                f"  for (int k = 0; k < {rc.D}; k++) {{",
                *["    " + s for s in _lanes(f"acc[k][l] += ({rc.acc}){rc.V('k')};")],
                "  }"]
    if rc.scheme == "kahan":  # compensated: the rounding error of each addition is kept
        return ["for (int jj = 0; jj < tj; jj++)",
                f"  for (int k = 0; k < {rc.D}; k++) {{",
                *["    " + s for s in _lanes(
                    f"{rc.acc} v = ({rc.acc}){rc.V('k')} - comp[k][l]; "
                    f"{rc.acc} t = acc[k][l] + v; comp[k][l] = (t - acc[k][l]) - v; "
                    "acc[k][l] = t;")],
                "  }"]
    # Block sums (the default): tile partial sums in T, accumulated into the accumulator
    # (double by default) once per tile: float32 sums over millions of terms keep ~1e-7
    # relative error. Lanes outside, columns inside, so that each partial sum stays in a
    # register; full tiles get a loop of TJ columns, whose fixed count lets the compiler
    # vectorize the outer loop.
    def tile(count: str) -> list[str]:
        return _lanes(f"{rc.T} t = 0; for (int jj = 0; jj < {count}; jj++) t += {rc.V('k')}; "
                      "acc[k][l] += t;")
    return [f"for (int k = 0; k < {rc.D}; k++) {{",
            "  if (tj == TJ) {", *["    " + s for s in tile("TJ")], "  } else {",
            *["    " + s for s in tile("tj")], "  }", "}"]


def _sum_store(rc):
    return [_loop("k", rc.D, f"{rc.out(0)}[row * {rc.D} + k] = ({rc.T})acc[k][l];")]


REDUCTIONS["Sum"] = ReductionDef(
    "Sum", False, "none", False,
    out_dims=lambda fdim, K, wdim: [("value", (fdim,))], identity=(0.0,),
    block=_sum_block, merge=lambda xp, a, b, K=None: a + b, finalize=lambda xp, s: (s,),
    c_decl=_sum_decl, c_tile=_sum_tile, c_store=_sum_store,
    doc="Σ_j F_ij, per component",
    cotangents=lambda F, W, G, O, L: (G, None),
    split_with="Sum", state_of=lambda xp, outs: outs[0])


# --------------------------------------------------------------------------- Min / Max and arg

def _extremum(name: str, smaller: bool, outputs: tuple[str, ...]):
    op = "<" if smaller else ">"
    xp_pick = "amin" if smaller else "amax"
    arg_pick = "argmin" if smaller else "argmax"
    init = "INFINITY_T" if smaller else "-INFINITY_T"
    worst = INF if smaller else -INF

    def block(xp, values, weights, j0, K=None):
        idx = getattr(xp, arg_pick)(values, 1)
        return getattr(xp, xp_pick)(values, 1), idx + j0

    def merge(xp, a, b, K=None):
        (va, ia), (vb, ib) = a, b
        # b holds larger j: take it only when strictly better (first index on ties).
        take_b = (vb < va) if smaller else (vb > va)
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
        return [f"for (int k = 0; k < {rc.D}; k++) for (int jj = 0; jj < tj; jj++) {{",
                *["  " + s for s in _lanes(
                    f"{rc.T} v = {rc.V('k')}; bool b = (v {op} best[k][l]) | (arg[k][l] < 0); "
                    f"best[k][l] = b ? v : best[k][l]; arg[k][l] = b ? j0 + jj : arg[k][l];")],
                "}"]

    def store(rc):
        lines = []
        for o, name in enumerate(outputs):  # output o of the kernel: values or indices
            src = "best" if name == "value" else "arg"
            lines.append(_loop("k", rc.D, f"{rc.out(o)}[row * {rc.D} + k] = {src}[k][l];"))
        return lines

    REDUCTIONS[name] = ReductionDef(
        name, False, "none", False,
        out_dims=lambda fdim, K, wdim: [(o, (fdim,)) for o in outputs],
        identity=tuple(worst if o == "value" else -1 for o in outputs),
        block=block, merge=merge, finalize=finalize, c_decl=decl, c_tile=tile, c_store=store,
        doc=f"{'min' if smaller else 'max'}_j F_ij per component ({', '.join(outputs)})",
        selects_with=(("Min_ArgMin" if smaller else "Max_ArgMax") if "value" in outputs
                      else None),
        split_with="Min_ArgMin" if smaller else "Max_ArgMax",
        state_of=lambda xp, outs: tuple(outs))


_extremum("Min", True, ("value",))
_extremum("Max", False, ("value",))
_extremum("ArgMin", True, ("index",))
_extremum("ArgMax", False, ("index",))
_extremum("Min_ArgMin", True, ("value", "index"))
_extremum("Max_ArgMax", False, ("value", "index"))


# --------------------------------------------------------------------------- K-min

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
        v, i = xp.concat([va, vb], 1), xp.concat([ia, ib], 1)
        order = xp.stable_argsort(v, 1)[:, :K, :]
        return xp.take_along(v, order, 1), xp.take_along(i, order, 1)

    def finalize(xp, state):
        v, i = state
        return tuple(v if o == "value" else i for o in outputs)

    def decl(rc):
        # Index -1 marks an empty slot, larger than any value (+inf included): rows whose
        # values are +inf keep their first columns, slots of an empty row stay -1.
        return [rc.array(rc.T, "kv", rc.D, rc.K, "LANES"),
                rc.array("long long", "ki", rc.D, rc.K, "LANES"),
                _loop("k", rc.D, _loop("r", rc.K, _loop(
                    "l", "LANES", "{ kv[k][r][l] = INFINITY_T; ki[k][r][l] = -1; }")))]

    def tile(rc):
        # Cheap threshold test against the current K-th value; sorted insertion only
        # for the rare candidates that pass it.
        # The test runs on all lanes at once (vectorized); most columns end there.
        K = rc.K
        return [f"for (int k = 0; k < {rc.D}; k++) for (int jj = 0; jj < tj; jj++) {{",
                "  int pass = 0;",
                "  LM_SIMD_OR(pass)",
                f"  for (int l = 0; l < LANES; l++) pass |= ({rc.V('k')} < kv[k][{K - 1}][l]) "
                f"| (ki[k][{K - 1}][l] < 0);",
                "  if (!pass) continue;",
                "  for (int l = 0; l < LANES; l++) {",
                f"    {rc.T} v = {rc.V('k')};",
                f"    if (!(v < kv[k][{K - 1}][l]) && ki[k][{K - 1}][l] >= 0) continue;",
                f"    int r = {K - 1};",
                "    while (r > 0 && (v < kv[k][r - 1][l] || ki[k][r - 1][l] < 0)) {",
                "      kv[k][r][l] = kv[k][r - 1][l]; ki[k][r][l] = ki[k][r - 1][l]; r--; }",
                "    kv[k][r][l] = v; ki[k][r][l] = j0 + jj;",
                "  }",
                "}"]

    def store(rc):
        lines = []
        for o, name in enumerate(outputs):  # output o of the kernel: values or indices
            src = "kv" if name == "value" else "ki"
            lines.append(_loop("r", rc.K, _loop(
                "k", rc.D, f"{rc.out(o)}[(row * {rc.K} + r) * {rc.D} + k] = {src}[k][r][l];")))
        return lines

    REDUCTIONS[name] = ReductionDef(
        name, True, "none", False,
        out_dims=lambda fdim, K, wdim: [(o, (K, fdim)) for o in outputs],
        identity=tuple(INF if o == "value" else -1 for o in outputs),
        block=block, merge=merge, finalize=finalize,
        c_decl=decl, c_tile=tile, c_store=store,
        doc=f"the K smallest F_ij over j, ascending ({', '.join(outputs)})",
        selects_with="KMin_ArgKMin" if "value" in outputs else None,
        split_with="KMin_ArgKMin", state_of=lambda xp, outs: tuple(outs))


_kmin("KMin", ("value",))
_kmin("ArgKMin", ("index",))
_kmin("KMin_ArgKMin", ("value", "index"))


# --------------------------------------------------------------------------- LogSumExp family

def _shifted_exp_block(xp, values, weights, j0, K=None):
    # values (m, n, 1), weights (m, n, E) or None: (max, Σ exp(F - max) [G])
    mx = xp.amax(values, 1)  # (m, 1)
    safe = xp.where(xp.isneginf(mx), 0.0, mx)  # a row of -inf values shifts by 0, not NaN
    e = xp.exp(values - xp.expand_dims(safe, 1))
    s = xp.sum(e if weights is None else e * weights, 1)
    s0 = xp.sum(e, 1)
    return mx, s0, s


def _shifted_exp_merge(xp, a, b, K=None):
    (ma, s0a, sa), (mb, s0b, sb) = a, b
    m = xp.maximum(ma, mb)
    safe = xp.where(xp.isneginf(m), 0.0, m)
    fa, fb = xp.exp(ma - safe), xp.exp(mb - safe)
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
    # compensated (kahan).
    acc = rc.acc
    rescale = f"s0[l] *= sc; for (int e = 0; e < {rc.E}; e++) s[e][l] *= sc;"
    if rc.scheme == "kahan":
        rescale += f" kc0[l] *= sc; for (int e = 0; e < {rc.E}; e++) kc[e][l] *= sc;"
    lines = [f"{rc.T} tm[LANES];",
             "for (int l = 0; l < LANES; l++) tm[l] = mx[l];",
             "for (int jj = 0; jj < tj; jj++) {",
             *["  " + s for s in _lanes(f"{rc.T} v = {rc.V(0)}; tm[l] = v > tm[l] ? v : tm[l];")],
             "}",
             "for (int l = 0; l < LANES; l++) {",
             f"  {acc} sc = (mx[l] == tm[l]) ? ({acc})1 : lm_exp(({acc})mx[l] - ({acc})tm[l]);",
             f"  {rescale} mx[l] = tm[l]; }}"]
    shifted = f"{rc.T} x = (mx[l] == -INFINITY_T) ? ({rc.T})0 : lm_exp({rc.V(0)} - mx[l]);"
    if rc.scheme == "block":
        return lines + [f"{rc.T} ts0[LANES] = {{0}};",
                        "for (int jj = 0; jj < tj; jj++) {",
                        *["  " + s for s in _lanes(f"{shifted} ex[jj][l] = x; ts0[l] += x;")],
                        "}",
                        "for (int l = 0; l < LANES; l++) s0[l] += ts0[l];",
                        *_weighted_sums(rc)]
    if rc.scheme == "direct":
        add0 = f"s0[l] += ({acc})x;"
        add = f"s[e][l] += ({acc})x * ({acc}){rc.W('e')};"
    else:
        add0 = f"{acc} y = ({acc})x - kc0[l], t = s0[l] + y; kc0[l] = (t - s0[l]) - y; s0[l] = t;"
        add = (f"{acc} y = ({acc})x * ({acc}){rc.W('e')} - kc[e][l], t = s[e][l] + y; "
               "kc[e][l] = (t - s[e][l]) - y; s[e][l] = t;")
    return lines + ["for (int jj = 0; jj < tj; jj++) {",
                    *["  " + s for s in _lanes(f"{shifted} ex[jj][l] = x; {add0}")],
                    "}",
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
            return _lanes(f"{rc.T} " + ", ".join(f"w{u} = 0" for u in copies) + "; "
                          f"for (int jj = 0; jj < {count}; jj++) {{ {rc.T} x = ex[jj][l]; "
                          f"{update} }} "
                          + " ".join(f"s[e0 + {u}][l] += w{u};" for u in copies))

        lines += [f"for (int e0 = {first}; e0 < {last}; e0 += {w}) {{",
                  "  if (tj == TJ) {", *["    " + t for t in body("TJ")], "  } else {",
                  *["    " + t for t in body("tj")], "  }", "}"]
    return lines


def _lse_cotangents(F, W, G, O):
    # out_e = log Σ_j exp(F) W_e: ∂out_e/∂F = exp(F - out_e) W_e, ∂out_e/∂W_e = exp(F - out_e).
    p = make("Exp", (F - O,))
    if W is None:
        return G * p, None
    return make("Sum", (G * p * W,)), G * p


def _softmax_cotangents(F, W, G, O, L):
    # out = Σ_j s_j W_j with s = softmax(F): ∂out/∂W_j = s_j, ∂<G, out>/∂F_j = s_j <G, W_j - out>.
    s = make("Exp", (F - L,))
    return s * make("Sum", (G * (W - O),)), s * G


def _lse_finalize(xp, state):
    m, s0, s = state
    safe = xp.where(xp.isneginf(m), 0.0, m)
    with xp.errstate():
        return (xp.where(xp.isneginf(m), m + s * 0, safe + xp.log(s)),)


def _lse_store(rc):
    return [_loop("e", rc.E, f"{rc.out(0)}[row * {rc.E} + e] = "
                             "mx[l] == -INFINITY_T ? -INFINITY_T : "
                             f"({rc.T})((double)mx[l] + lm_log(s[e][l]));")]


REDUCTIONS["LogSumExp"] = ReductionDef(
    "LogSumExp", False, "optional", True,
    out_dims=lambda fdim, K, wdim: [("value", (wdim or 1,))], identity=(-INF,),
    block=_shifted_exp_block, merge=_shifted_exp_merge, finalize=_lse_finalize,
    c_decl=_lse_decl, c_tile=_lse_tile, c_store=_lse_store,
    doc="log Σ_j exp(F_ij) [G_ij], computed with a running max (stable)",
    cotangents=lambda F, W, G, O, L: _lse_cotangents(F, W, G, O),
    # log Σ over a part, per component: a state whose max is that value and sums are 1
    split_with="LogSumExp",
    state_of=lambda xp, outs: (outs[0], xp.full(outs[0].shape, 1.0, like=outs[0]),
                               xp.full(outs[0].shape, 1.0, like=outs[0])))


def _softmax_finalize(xp, state):
    m, s0, s = state
    with xp.errstate():
        return (xp.where(s0 > 0, s / xp.where(s0 > 0, s0, s0 + 1), s * 0),)


def _softmax_store(rc):
    return [_loop("e", rc.E, f"{rc.out(0)}[row * {rc.E} + e] = "
                             f"s0[l] > 0 ? ({rc.T})(s[e][l] / s0[l]) : "
                             f"({rc.T})0;")]


REDUCTIONS["SumSoftMaxWeight"] = ReductionDef(
    "SumSoftMaxWeight", False, "required", True,
    out_dims=lambda fdim, K, wdim: [("value", (wdim,))], identity=(0.0,),
    block=_shifted_exp_block, merge=_shifted_exp_merge, finalize=_softmax_finalize,
    c_decl=_lse_decl, c_tile=_lse_tile, c_store=_softmax_store,
    doc="Σ_j exp(F_ij) G_ij / Σ_j exp(F_ij) (attention)",
    cotangents=lambda F, W, G, O, L: _softmax_cotangents(F, W, G, O, L),
    needs_log_normalizer=True)
