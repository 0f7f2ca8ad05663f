"""The shared C renderer: turns formula nodes into C statements.

Backends differ in their scaffold (loops, threads, memory), not in how an op
is spelled: every op's C comes from its one definition in ``formula/ops.py``.

Each node lives at a *level*: which of the two indices its value varies with
(0: neither, parameters only; 1: the output index i; 2: the reduced index j;
3: both). A node is computed once per level, so e.g. ``|x_i|²`` is computed
once per row, not once per pair. A materialized node at level ``lv`` has the
buffer ``T name[dim][JJ][W]``, with JJ = TJ if the level varies with j else 1
and W = LANES if it varies with i else 1, read at ``[k][jj][l]``. Single-use
elementwise nodes are inlined into their consumer instead.

>>> from lazymat.formula import Var, SqDist
>>> em = Emitter([SqDist(Var(0, 3, 0), Var(1, 3, 1))], "float", lambda v, k: f"v{v.params[0]}[{k}]")
>>> len(em.materialized)
1
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from ..formula import OPS, Node, walk
from ..reductions import ReductionDef


def c_number(value: Fraction | float, T: str) -> str:
    """A C literal of type T for a Python number."""
    if isinstance(value, Fraction):
        if value.denominator == 1:
            return f"(({T}){value.numerator})"
        return f"(({T}){value.numerator} / ({T}){value.denominator})"
    if math.isnan(value):
        return f"(({T})__builtin_nan(\"\"))"
    if math.isinf(value):
        return f"(({T}){'-' if value < 0 else ''}__builtin_inf())"
    return f"(({T}){value!r})"


_JJ = re.compile(r"\bjj\b")


def _shift_column(text: str, u: int) -> str:
    """The same expression ``u`` columns further (for unroll-and-jam over j)."""
    return text if u == 0 else _JJ.sub(f"(jj + {u})", text)


class _OpContext:
    """What a structural op's renderer sees: its operands and its output slot.

    ``copies`` > 1 asks a jam-capable renderer for that many consecutive columns;
    copy ``u`` reads and writes column ``jj + u``.
    """

    def __init__(self, em: "Emitter", node: Node, copies: int = 1):
        self.em, self.node, self.T, self.copies = em, node, em.T, copies

    def arg(self, i: int, k: int | str, u: int = 0) -> str:
        return _shift_column(self.em.expr(self.node.args[i], k), u)

    def out(self, k: int | str, u: int = 0) -> str:
        return _shift_column(self.em.access(self.node, k), u)


class Emitter:
    """Plans and renders the nodes of one or more formulas (the reduction's F and G).

    ``var_access(var, k)`` gives the C expression of component ``k`` of a variable
    at the current pair; the scaffold defines where variables live.
    """

    def __init__(self, roots: list[Node], T: str, var_access: Callable[[Node, str], str]):
        self.T, self.var_access = T, var_access
        self.nodes: list[Node] = []
        seen: set[int] = set()
        for r in roots:
            for n in walk(r):
                if id(n) not in seen:
                    seen.add(id(n))
                    self.nodes.append(n)
        uses: dict[int, int] = {}
        consumer_level: dict[int, int] = {}
        broadcast: set[int] = set()
        for n in self.nodes:
            for a in n.args:
                uses[id(a)] = uses.get(id(a), 0) + 1
                consumer_level[id(a)] = n.deps
                if a.dim < n.dim:  # inlined, a would be recomputed for each of n's components
                    broadcast.add(id(a))
        roots_ids = {id(r) for r in roots}
        self.materialized: dict[int, str] = {}
        for n in self.nodes:
            if n.op in ("Var", "Const"):
                continue
            if (id(n) in roots_ids or not OPS[n.op].elementwise or uses.get(id(n), 0) > 1
                    or consumer_level.get(id(n)) != n.deps or id(n) in broadcast):
                self.materialized[id(n)] = f"t{len(self.materialized)}"

    # ------------------------------------------------------------------ expressions
    def access(self, node: Node, k: int | str) -> str:
        """C lvalue of component k of a materialized node at the current pair."""
        k = 0 if node.dim == 1 else k
        jj = "jj" if node.deps & 2 else "0"
        lane = "l" if node.deps & 1 else "0"
        return f"{self.materialized[id(node)]}[{k}][{jj}][{lane}]"

    def expr(self, node: Node, k: int | str) -> str:
        """C expression of component k of ``node`` at the current pair."""
        k = 0 if node.dim == 1 else k
        if node.op == "Var":
            return self.var_access(node, str(k))
        if node.op == "Const":
            return c_number(node.value, self.T)
        if id(node) in self.materialized:
            return self.access(node, k)
        return self._inline(node, k)

    def _inline(self, node: Node, k: int | str) -> str:
        opdef = OPS[node.op]
        args = [self.expr(a, k) for a in node.args]
        params = {f"p{i}": p for i, p in enumerate(node.params)}
        return opdef.c.format(*args, T=self.T, **params)

    # ------------------------------------------------------------------ statements
    def jam_width(self, node: Node) -> int:
        """How many columns a pair-level node computes at once (long dot products, sums)."""
        opdef = OPS[node.op]
        return 4 if opdef.jam and node.deps == 3 and node.args[0].dim >= 8 else 1

    def body(self, node: Node, copies: int = 1) -> list[str]:
        """Statements computing a materialized node at the current pair (or ``copies``
        consecutive pairs, for a jam-capable op)."""
        opdef = OPS[node.op]
        if opdef.render is not None:
            lines = opdef.render(_OpContext(self, node, copies), node)
        elif node.dim == 1:
            lines = [f"{self.access(node, 0)} = {self._inline(node, 0)};"]
        else:
            lines = [f"for (int k = 0; k < {node.dim}; k++) "
                     f"{self.access(node, 'k')} = {self._inline(node, 'k')};"]
        return ["{ " + " ".join(lines) + " }"]

    def at_level(self, level: int) -> list[Node]:
        """Materialized nodes of one level, in evaluation order."""
        return [n for n in self.nodes if id(n) in self.materialized and n.deps == level]

    def declaration(self, node: Node, TJ: int | str, lanes: int | str) -> str:
        jj = TJ if node.deps & 2 else 1
        w = lanes if node.deps & 1 else 1
        return f"{self.T} {self.materialized[id(node)]}[{node.dim}][{jj}][{w}];"

@dataclass(frozen=True)
class KernelSpec:
    """Everything that determines a kernel's source (and so its cache key).

    ``formula`` and ``weight`` use category 0 for the output index and 1 for the
    reduced index (an axis=0 reduction has its categories swapped before this).
    """

    reduction: ReductionDef
    formula: Node
    weight: Node | None
    K: int | None
    dtype: str  # "float32" or "float64"
    arg_dims: tuple[tuple[int, int], ...]  # (dim, cat) of each argument, by position
    # Sums: the accumulator's C type and the scheme ("block", "direct" or "kahan").
    accumulation: tuple[str, str] = ("double", "block")

    @property
    def value_row_size(self) -> dict[str, int]:
        """Numbers per output row of the value output and of the index output."""
        wdim = self.weight.dim if self.weight is not None else None
        sizes = {"value": 0, "index": 0}
        for kind, shape in self.reduction.out_dims(self.formula.dim, self.K, wdim):
            sizes[kind] = math.prod(shape)
        return sizes


class ReductionContext:
    """What a reduction's C code (``c_decl``, ``c_tile``, ``c_store`` in reductions.py)
    is given: ``T`` (the data's C type), ``K``, ``D`` (the formula's dim), ``E`` (the
    weight's), ``acc``/``scheme`` (sums' accumulation), and ``V(k)``/``W(e)``: the C
    expressions of component k of the formula and e of the weight at the current pair.

    The scaffold (CPU or CUDA) around that code provides these C names, and nothing else
    may be assumed: ``T``, ``LANES`` (rows per block; 1 on CUDA), ``TJ`` (the most columns
    in one stage pass, a constant) and ``tj`` (the columns of this pass), ``l`` (the lane,
    in ``for (int l = 0; l < LANES; l++)`` loops the reduction writes itself), ``jj`` (the
    column in the pass, in loops the reduction writes itself), ``j0`` (the global index
    of the pass's first column), ``row`` (in ``c_store``: the row of lane ``l``), ``out``
    and ``out_idx`` (the batch's outputs, rows of ``value_row_size``), ``INFINITY_T`` and
    the prelude's ``lm_*`` helpers. ``#pragma omp`` lines are dropped on CUDA. Its own
    declarations must not reuse the scaffolds' names: ``b``, ``c``, ``t``, ``q``, ``i0``,
    ``nl``, ``jb``, ``jt``, ``nj``, ``task``, ``part``, ``a<n>``, ``xv<n>``, ``ys<n>``.
    """

    def __init__(self, spec: KernelSpec, em: Emitter, T: str):
        self.T, self.K = T, spec.K
        self.acc, self.scheme = spec.accumulation
        self.D = spec.formula.dim
        self.E = spec.weight.dim if spec.weight is not None else 1
        self._em, self._f, self._g = em, spec.formula, spec.weight

    def V(self, k) -> str:
        return self._em.expr(self._f, k)

    def W(self, e) -> str:
        return "1" if self._g is None else self._em.expr(self._g, e)


def _math_declarations(vector_math: bool) -> str:
    """libm functions for the kernels. With glibc's libmvec, declaring them ``simd`` lets
    the compiler call the vector versions (8 floats at once) inside the lane loops."""
    if not vector_math:
        return "#define LM_F(name) __builtin_##name##f\n#define LM_D(name) __builtin_##name"
    attrs = '__attribute__((simd("notinbranch"), const, nothrow))'
    lines = ["#define LM_F(name) name##f", "#define LM_D(name) name"]
    for name, args in _LIBM_FUNCTIONS:
        # Older glibc (< 2.35) has no vector acos/asin/atan/atan2: plain scalar calls then.
        fn_attrs = attrs if _has_vector_variant(name, args) else "__attribute__((const, nothrow))"
        for T, suffix in (("float", "f"), ("double", "")):
            params = ", ".join([T] * args)
            lines.append(f'extern "C" {T} {name}{suffix}({params}) {fn_attrs};')
    return "\n".join(lines)


#: libm functions called through LM_F / LM_D: (name, number of arguments).
_LIBM_FUNCTIONS = (("sin", 1), ("cos", 1), ("log", 1), ("pow", 2),
                   ("acos", 1), ("asin", 1), ("atan", 1), ("atan2", 2))
_ALWAYS_VECTOR = {"sin", "cos", "log", "pow"}  # in every libmvec (glibc >= 2.22)
_vector_variants: dict[str, bool] = {}


def _has_vector_variant(name: str, args: int) -> bool:
    """Whether libmvec exports the vector versions of ``name`` (acos & co: glibc >= 2.35)."""
    if name in _ALWAYS_VECTOR:
        return True
    found = _vector_variants.get(name)
    if found is None:
        import ctypes
        import ctypes.util

        found = False
        path = ctypes.util.find_library("mvec")
        if path is not None:
            try:
                # The SSE variant's symbol; glibc adds every ISA's variant at once.
                found = hasattr(ctypes.CDLL(path), f"_ZGVbN2{'v' * args}_{name}")
            except OSError:
                found = False
        _vector_variants[name] = found
    return found


_vector_math: bool | None = None


def has_vector_math() -> bool:
    """Whether glibc's vector math library (libmvec) can be linked."""
    global _vector_math
    if _vector_math is None:
        import ctypes.util
        import platform

        _vector_math = (platform.machine() in ("x86_64", "AMD64")
                        and ctypes.util.find_library("mvec") is not None)
    return _vector_math


def prelude(vector_math: bool = False, target: str = "cpu") -> str:
    """Math helpers for generated kernels: no headers, overloaded for float and double.

    On the CPU, ``lm_exp`` is our own: range reduction by ln 2 (two constants), a
    polynomial, and the exponent set by integer addition; it vectorizes, has no slow
    path for large negative arguments, and gives 0 below the smallest normal number.
    For ``target="cuda"`` the helpers are ``__device__`` functions, libm names are
    CUDA's, and ``lm_exp`` is CUDA's own (a few instructions around the hardware exp2).
    """
    if target == "cuda":
        return _PRELUDE.format(
            inline="__device__ __forceinline__", exp=_CUDA_EXP,
            math="#define LM_F(name) name##f\n#define LM_D(name) name")
    if target != "cpu":
        raise ValueError(f"unknown target {target!r}: 'cpu' or 'cuda'")
    taylor = ", ".join(repr(1.0 / math.factorial(n)) for n in range(13, -1, -1))
    return _PRELUDE.format(inline="static inline __attribute__((always_inline))",
                           exp=_CPU_EXP.replace("TAYLOR", taylor),
                           math=_math_declarations(vector_math))


_CUDA_EXP = """LM_INLINE float lm_exp(float x) { return expf(x); }
LM_INLINE double lm_exp(double x) { return exp(x); }"""
_CPU_EXP = """LM_INLINE float lm_exp(float x) {
  float xc = x < -87.5f ? -87.5f : (x > 88.75f ? 88.75f : x);
  float n = __builtin_rintf(xc * 1.44269504088896341f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  int bits = __builtin_bit_cast(int, p) + (int)((unsigned)(int)n << 23);
  float y = __builtin_bit_cast(float, bits);
  y = x < -87.33654f ? 0.0f : y;
  y = x > 88.72283f ? __builtin_inff() : y;
  return x != x ? x : y;
}

LM_INLINE double lm_exp(double x) {
  const double c[14] = {TAYLOR};
  double xc = x < -708.0 ? -708.0 : (x > 709.7 ? 709.7 : x);
  double n = __builtin_rint(xc * 1.4426950408889634);
  double r = xc - n * 6.93147180369123816490e-01;
  r = r - n * 1.90821492927058770002e-10;
  double p = c[0];
  for (int q = 1; q < 14; q++) p = p * r + c[q];
  long long bits = __builtin_bit_cast(long long, p)
                   + (long long)((unsigned long long)(long long)n << 52);
  double y = __builtin_bit_cast(double, bits);
  y = x < -708.0 ? 0.0 : y;
  y = x > 709.78 ? __builtin_inf() : y;
  return x != x ? x : y;
}"""
_PRELUDE = """
#define LM_INLINE {inline}
typedef long long i64;

{exp}

{math}
LM_INLINE float lm_log(float x) {{ return LM_F(log)(x); }}
LM_INLINE double lm_log(double x) {{ return LM_D(log)(x); }}
LM_INLINE float lm_sqrt(float x) {{ return __builtin_sqrtf(x); }}
LM_INLINE double lm_sqrt(double x) {{ return __builtin_sqrt(x); }}
LM_INLINE float lm_rsqrt(float x) {{ return x == 0.0f ? 0.0f : 1.0f / __builtin_sqrtf(x); }}
LM_INLINE double lm_rsqrt(double x) {{ return x == 0.0 ? 0.0 : 1.0 / __builtin_sqrt(x); }}
LM_INLINE float lm_abs(float x) {{ return __builtin_fabsf(x); }}
LM_INLINE double lm_abs(double x) {{ return __builtin_fabs(x); }}
LM_INLINE float lm_sin(float x) {{ return LM_F(sin)(x); }}
LM_INLINE double lm_sin(double x) {{ return LM_D(sin)(x); }}
LM_INLINE float lm_cos(float x) {{ return LM_F(cos)(x); }}
LM_INLINE double lm_cos(double x) {{ return LM_D(cos)(x); }}
LM_INLINE float lm_pow(float x, float y) {{ return LM_F(pow)(x, y); }}
LM_INLINE double lm_pow(double x, double y) {{ return LM_D(pow)(x, y); }}
LM_INLINE float lm_round(float x) {{ return __builtin_rintf(x); }}
LM_INLINE double lm_round(double x) {{ return __builtin_rint(x); }}
template <typename F> LM_INLINE F lm_clamp(F x, F lo, F hi) {{
  x = x < lo ? lo : x; return x > hi ? hi : x;
}}
template <typename F> LM_INLINE F lm_powi(F x, int n) {{
  F base = n < 0 ? (F)1 / x : x; unsigned e = n < 0 ? -n : n; F r = 1;
  while (e) {{ if (e & 1) r *= base; base *= base; e >>= 1; }}
  return r;
}}
LM_INLINE float lm_floor(float x) {{ return __builtin_floorf(x); }}
LM_INLINE double lm_floor(double x) {{ return __builtin_floor(x); }}
LM_INLINE float lm_acos(float x) {{ return LM_F(acos)(x); }}
LM_INLINE double lm_acos(double x) {{ return LM_D(acos)(x); }}
LM_INLINE float lm_asin(float x) {{ return LM_F(asin)(x); }}
LM_INLINE double lm_asin(double x) {{ return LM_D(asin)(x); }}
LM_INLINE float lm_atan(float x) {{ return LM_F(atan)(x); }}
LM_INLINE double lm_atan(double x) {{ return LM_D(atan)(x); }}
LM_INLINE float lm_atan2(float y, float x) {{ return LM_F(atan2)(y, x); }}
LM_INLINE double lm_atan2(double y, double x) {{ return LM_D(atan2)(y, x); }}
template <typename F> LM_INLINE F lm_round_dec(F x, int d) {{
  F s = lm_powi((F)10, d < 0 ? -d : d);
  return d < 0 ? lm_round(x / s) * s : lm_round(x * s) / s;
}}
template <typename F> LM_INLINE F lm_mod(F x, F n, F d) {{ return x - n * lm_floor((x - d) / n); }}
template <typename F> LM_INLINE F lm_xlogx(F x) {{ return x == (F)0 ? (F)0 : x * lm_log(x); }}
template <typename F> LM_INLINE F lm_sinxdivx(F x) {{ return x == (F)0 ? (F)1 : lm_sin(x) / x; }}
template <typename F> LM_INLINE F lm_softmin3(F a, F b, F c, F g) {{
  F m = a < b ? a : b; m = m < c ? m : c;
  return m - g * lm_log(lm_exp((m - a) / g) + lm_exp((m - b) / g) + lm_exp((m - c) / g));
}}
"""
