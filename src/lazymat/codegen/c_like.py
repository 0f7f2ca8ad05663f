"""The shared C renderer: turns formula nodes into C statements.

Backends differ in their scaffold (loops, threads, memory), not in how an op
is spelled: every op's C comes from its one registration in ``formula/ops/``.

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

from ..errors import ShapeError
from ..formula import OPS, Node, walk
from ..reductions import ReductionDef


def c_number(value: Fraction | float, T: str) -> str:
    """A C literal of type T for a Python number: exact integers and ratios of small
    integers as such, anything else (2**64, 10**30, big ratios) as the nearest T, spelled
    as a floating literal (C integer literals stop at 2**63, and gcc only warns).

    >>> c_number(Fraction(1, 3), "float"), c_number(Fraction(2**64), "double")
    ('((float)1 / (float)3)', '((double)1.8446744073709552e+19)')
    """
    if isinstance(value, Fraction):
        p, q = value.numerator, value.denominator
        exact = 1 << (24 if T == "float" else 53)  # integers exact in T: one rounding
        if q == 1 and abs(p) < exact:
            return f"(({T}){p})"
        if abs(p) < exact and q < exact:
            return f"(({T}){p} / ({T}){q})"
        value = _nearest(value, T)
    if math.isnan(value):
        return f"(({T})LM_NAN_F)"
    if math.isinf(value):
        return f"(({T}){'-' if value < 0 else ''}LM_INF_F)"
    return f"(({T}){value!r})"


def _nearest(value: Fraction, T: str) -> float:
    """The T nearest to ``value`` (ties to even), as a Python float; +-inf beyond range."""
    try:
        d = float(value)  # correctly rounded to double
    except OverflowError:
        return math.inf if value > 0 else -math.inf
    if T != "float":
        return d
    import numpy as np

    with np.errstate(over="ignore"):
        f = np.float32(d)  # may be a double rounding: settle it exactly
    if math.isinf(f) or Fraction(float(f)) == value:
        return float(f)
    toward = np.float32(math.inf if value > Fraction(float(f)) else -math.inf)
    g = np.nextafter(f, toward)
    if math.isinf(g):
        return float(f)
    df, dg = abs(Fraction(float(f)) - value), abs(Fraction(float(g)) - value)
    if dg < df or (dg == df and int(g.view(np.int32)) % 2 == 0):
        return float(g)
    return float(f)


def c_int(n: int, what: str) -> str:
    """A C integer literal for an op's integer parameter (64-bit; beyond: a clear error)."""
    if -(1 << 31) <= n < (1 << 31):
        return str(n)
    if -(1 << 63) <= n < (1 << 63):
        return f"{n}LL"
    raise ShapeError(f"{what}: the integer parameter {n} is beyond the 64-bit range of the "
                     "C kernels")


_JJ = re.compile(r"\bjj\b")


def _shift_column(text: str, u: int) -> str:
    """The same expression ``u`` columns further (for unroll-and-jam over j)."""
    return text if u == 0 else _JJ.sub(f"(jj + {u})", text)


class _OpContext:
    """What a structural op's renderer sees: its operands and its output slot.

    ``copies`` > 1 asks a jam-capable renderer for that many consecutive columns;
    copy ``u`` reads and writes column ``jj + u``. ``lanes``: None, or the header of the
    lane loop the renderer must put inside its own loops (see ``Target.inner_lanes``).
    """

    def __init__(self, em: "Emitter", node: Node, copies: int = 1):
        self.em, self.node, self.T, self.copies = em, node, em.T, copies
        self.lanes = em.inner_lane_loop(node)

    def arg(self, i: int, k: int | str, u: int = 0) -> str:
        return _shift_column(self.em.expr(self.node.args[i], k), u)

    def out(self, k: int | str, u: int = 0) -> str:
        return _shift_column(self.em.access(self.node, k), u)


#: The deepest nesting of inlined node expressions.
MAX_INLINE_DEPTH = 24


class Emitter:
    """Plans and renders the nodes of one or more formulas (the reduction's F and G).

    ``var_access(var, k)`` gives the C expression of component ``k`` of a variable
    at the current pair; the scaffold defines where variables live.
    """

    def __init__(self, roots: list[Node], T: str, var_access: Callable[[Node, str], str],
                 read_once: bool = False):
        self.T, self.var_access = T, var_access
        self._levels: dict[int, list[Node]] | None = None
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
        # A root Concat (the parts of a gradient, the Jacobian sums of a forward) is never
        # copied into a buffer: component k reads its part directly (:meth:`expr`), and the
        # parts are the materialized roots.
        self.virtual: set[int] = set()
        pending = [r for r in roots if r.op == "Concat"]
        while pending:
            n = pending.pop()
            if id(n) not in self.virtual:
                self.virtual.add(id(n))
                pending += [a for a in n.args if a.op == "Concat"]
        roots_ids |= {id(a) for n in self.nodes if id(n) in self.virtual for a in n.args}
        # ``read_once``: the reduction reads each component of the first root once per pair
        # (a Sum). A part of it that is one elementwise op of stored nodes and variables
        # (e_ij b_j * y_j) is then computed where the sum reads it: no buffer to write and
        # read back.
        read_in_place: set[int] = set()
        if read_once and roots:
            consumed = {id(a) for n in self.nodes if id(n) not in self.virtual for a in n.args}
            parts = [roots[0]]
            while parts:
                n = parts.pop()
                if id(n) in self.virtual:
                    parts += n.args
                elif (n.op not in ("Var", "Const") and OPS[n.op].elementwise
                      and n.deps == 3 and id(n) not in consumed
                      and all(r is not n for r in roots[1:])):
                    read_in_place.add(id(n))
        self.materialized: dict[int, str] = {}
        # Inlined expressions nest at most MAX_INLINE_DEPTH deep: a longer chain (Sin of Sin
        # ... 1000 deep, a sum of 400 terms) is cut by materialized nodes, so rendering
        # recurses a bounded depth and the C compiler sees short expressions.
        depth: dict[int, int] = {}
        for n in self.nodes:  # children before parents
            if n.op in ("Var", "Const"):
                depth[id(n)] = 0
                continue
            d = 1 + max((depth[id(a)] for a in n.args), default=0)
            if id(n) in self.virtual:
                depth[id(n)] = 0
                continue
            if id(n) in read_in_place and all(
                    a.op in ("Var", "Const") or id(a) in self.materialized for a in n.args):
                depth[id(n)] = d
                continue
            if (id(n) in roots_ids or not OPS[n.op].elementwise or uses.get(id(n), 0) > 1
                    or consumer_level.get(id(n)) != n.deps or id(n) in broadcast
                    or d > MAX_INLINE_DEPTH):
                self.materialized[id(n)] = f"t{len(self.materialized)}"
                d = 0
            depth[id(n)] = d

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
        if id(node) in self.virtual:  # [a, b]: component k of a, else k - dim(a) of b
            a, b = node.args
            if isinstance(k, int) or str(k).isdigit():
                k = int(k)
                return self.expr(a, k) if k < a.dim else self.expr(b, k - a.dim)
            return f"({k} < {a.dim} ? {self.expr(a, k)} : {self.expr(b, f'{k} - {a.dim}')})"
        return self._inline(node, k)

    def parts(self, node: Node, at: int = 0) -> list[tuple[int, Node]]:
        """(first component, node) of the parts of a root concatenation, in order."""
        if id(node) not in self.virtual:
            return [(at, node)]
        a, b = node.args
        return self.parts(a, at) + self.parts(b, at + a.dim)

    def _inline(self, node: Node, k: int | str) -> str:
        opdef = OPS[node.op]
        args = [self.expr(a, k) for a in node.args]
        params = {f"p{i}": c_int(p, node.op) if isinstance(p, int) and not isinstance(p, bool)
                  else p for i, p in enumerate(node.params)}
        return opdef.c.format(*args, T=self.T, **params)

    # ------------------------------------------------------------------ statements
    def jam_width(self, node: Node) -> int:
        """How many columns a pair-level node computes at once (long dot products, sums)."""
        opdef = OPS[node.op]
        return 4 if opdef.jam and node.deps == 3 and node.args[0].dim >= 8 else 1

    def lanes_innermost(self) -> bool:
        """Whether loops over the lanes must be innermost (the CPU scaffold decides)."""
        return False

    def inner_lane_loop(self, node: Node) -> str | None:
        """The lane loop a jam-capable op puts inside its own loops (None: the caller
        wraps the op in the lane loop); the CPU scaffold's emitter decides."""
        return None

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
        if self._levels is None:
            self._levels = {lv: [] for lv in range(4)}
            for n in self.nodes:
                if id(n) in self.materialized:
                    self._levels[n.deps].append(n)
        return self._levels[level]

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
    # What the kernel writes: the reduction's finalized outputs ("output") or its raw
    # partial state ("state"), for the caller to merge column parts.
    store: str = "output"

    def __post_init__(self):
        if self.store not in ("output", "state"):
            raise ValueError(f"KernelSpec.store is 'output' or 'state', not {self.store!r}")

    @property
    def stored(self) -> list[tuple[str, tuple[int, ...]]]:
        """(kind, shape per row) of each array the kernel writes, in ``outs`` order:
        kinds "value" (T), "acc" (the accumulator type) and "index" (long long)."""
        red = self.reduction
        wdim = self.weight.dim if self.weight is not None else None
        if self.store == "state":
            return red.state(self.formula.dim, self.K, wdim)
        return red.outputs(self.formula.dim, self.K, wdim)


class ReductionContext:
    """What a reduction's C code (``c_decl``, ``c_tile``, ``c_store``, ``c_state_store`` in
    reductions.py) is given: ``T`` (the data's C type), ``K``, ``D`` (the formula's dim),
    ``E`` (the weight's), ``acc``/``scheme`` (sums' accumulation), ``V(k)``/``W(e)``: the C
    expressions of component k of the formula and e of the weight at the current pair, and
    ``out(k)``: the C name of the kernel's output pointer k (``KernelSpec.stored`` order),
    typed and offset to the current batch, so that a store writes
    ``{rc.out(0)}[row * D + k] = ...``.

    The scaffold (CPU or CUDA) around that code provides these C names, and nothing else
    may be assumed: ``T``, ``LANES`` (rows per block; 1 on CUDA), ``TJ`` (the most columns
    in one stage pass, a constant) and ``tj`` (the columns of this pass), ``l`` (the lane,
    in ``for (int l = 0; l < LANES; l++)`` loops the reduction writes itself), ``jj`` (the
    column in the pass, in loops the reduction writes itself), ``j0`` (the global index
    of the pass's first column), ``row`` (in the stores: the row of lane ``l``),
    ``INFINITY_T``, the prelude's ``lm_*`` helpers, and the target's macros ``LM_SIMD``
    (before a lane loop to vectorize) and ``LM_SIMD_OR(v)`` (the same, OR-reducing ``v``),
    empty where a thread has one row. Buffers that scale with D, E or K are declared with
    ``array`` (the scaffold may put them on the heap). Its own declarations must not reuse
    the scaffolds' names: ``b``, ``c``, ``t``, ``q``, ``i0``, ``nl``, ``jb``, ``jt``,
    ``nj``, ``task``, ``part``, ``row``, ``lm_heap``, ``a<n>``, ``xv<n>``, ``ys<n>``,
    ``out<n>``, ``t<n>``.
    """

    def __init__(self, spec: KernelSpec, em: Emitter, T: str,
                 array: Callable[..., str] | None = None):
        self.T, self.K = T, spec.K
        self._array = array
        self.acc, self.scheme = spec.accumulation
        self.D = spec.formula.dim
        self.E = spec.weight.dim if spec.weight is not None else 1
        self._em, self._f, self._g = em, spec.formula, spec.weight
        #: loops over the lanes go innermost (clang; see ``Target.inner_lanes``)
        self.lanes_innermost = em.lanes_innermost()
        self._nout = len(spec.stored)

    def V(self, k) -> str:
        return self._em.expr(self._f, k)

    def parts(self) -> list[tuple[int, int, Callable[[str], str]]]:
        """(first component, dim, ``V``-like accessor) of each part of the formula: its
        concatenated parts when it is a concatenation (read in place), else itself."""
        return [(at, n.dim, lambda k, n=n: self._em.expr(n, k))
                for at, n in self._em.parts(self._f)]

    def W(self, e) -> str:
        return "1" if self._g is None else self._em.expr(self._g, e)

    def array(self, ctype: str, name: str, *dims: int | str) -> str:
        """Declaration of a per-row-block buffer ``ctype name[dims...]`` (dims: numbers or
        ``"LANES"``/``"TJ"``), indexed ``name[a][b]...`` as a C array: the scaffold puts it
        on the stack, or on the thread's heap when it is large."""
        if self._array is not None:
            return self._array(ctype, name, *dims)
        return f"{ctype} {name}{''.join(f'[{d}]' for d in dims)};"

    def out(self, k: int) -> str:
        """The C name of output pointer ``k``."""
        if not 0 <= k < self._nout:
            raise IndexError(f"the kernel stores {self._nout} arrays; there is no output {k}")
        return f"out{k}"


def output_pointers(spec: KernelSpec, T: str, outs: str, first_row: str) -> list[str]:
    """C declarations of ``out<k>`` (see ``ReductionContext.out``): pointer ``{outs}[k]``,
    typed by kind and advanced by ``first_row`` rows of its width."""
    types = {"value": T, "acc": spec.accumulation[0], "index": "long long"}
    lines = []
    for k, (kind, shape) in enumerate(spec.stored):
        lines.append(f"{types[kind]}* out{k} = ({types[kind]}*){outs}[{k}] + "
                     f"({first_row}) * {math.prod(shape)}; (void)out{k};")
    return lines


#: What a target defines for the prelude's helpers (the helper text itself, in each op's
#: registration, is the same for every target). A target gives:
#:
#: - ``LM_INLINE``: the qualifiers of a helper function;
#: - ``LM_F(name)`` / ``LM_D(name)``: the float / double libm function ``name`` (sin, log,
#:   tanh, erf, ...: those the ops list in ``libm``);
#: - ``LM_BF(name)`` / ``LM_BD(name)``: the float / double functions the compiler inlines
#:   (sqrt, fabs, rint, floor);
#: - ``LM_AS_INT(x)``, ``LM_AS_FLOAT(x)``, ``LM_AS_I64(x)``, ``LM_AS_DOUBLE(x)``: bit casts
#:   float -> int, int -> float, double -> long long, long long -> double;
#: - ``LM_INF_F``, ``LM_INF_D``, ``LM_NAN_F``, ``LM_NAN_D``: +inf and a quiet NaN;
#: - optionally ``LM_NATIVE_EXP``: ``lm_exp`` calls the target's exp instead of our polynomial.
#:
#: The CPU's ``LM_F``/``LM_D`` come from :func:`_math_declarations` (libmvec or builtins).
TARGET_MACROS: dict[str, str] = {
    "cpu": """#define LM_INLINE static inline __attribute__((always_inline))
#define LM_BF(name) __builtin_##name##f
#define LM_BD(name) __builtin_##name
#define LM_AS_INT(x) __builtin_bit_cast(int, x)
#define LM_AS_FLOAT(x) __builtin_bit_cast(float, x)
#define LM_AS_I64(x) __builtin_bit_cast(long long, x)
#define LM_AS_DOUBLE(x) __builtin_bit_cast(double, x)
#define LM_INF_F __builtin_inff()
#define LM_INF_D __builtin_inf()
#define LM_NAN_F __builtin_nanf("")
#define LM_NAN_D __builtin_nan("")""",
    "cuda": """#define LM_INLINE __device__ __forceinline__
#define LM_F(name) name##f
#define LM_D(name) name
#define LM_BF(name) name##f
#define LM_BD(name) name
#define LM_AS_INT(x) __float_as_int(x)
#define LM_AS_FLOAT(x) __int_as_float(x)
#define LM_AS_I64(x) __double_as_longlong(x)
#define LM_AS_DOUBLE(x) __longlong_as_double(x)
#define LM_INF_F __int_as_float(0x7f800000)
#define LM_INF_D __longlong_as_double(0x7ff0000000000000LL)
#define LM_NAN_F __int_as_float(0x7fffffff)
#define LM_NAN_D __longlong_as_double(0x7ff8000000000000LL)
#define LM_NATIVE_EXP 1""",
}


def libm_functions() -> tuple[tuple[str, int], ...]:
    """The libm functions the registered ops' helpers call: (name, number of arguments)."""
    seen: dict[str, int] = {}
    for op in OPS.values():
        for name, args in op.libm:
            seen.setdefault(name, args)
    return tuple(seen.items())


def helpers() -> str:
    """The C helpers of every registered op, in registration order (a helper may call the
    helpers before it), in the target-neutral dialect of :data:`TARGET_MACROS`."""
    return "\n".join(op.c_helper for op in OPS.values() if op.c_helper)


def _math_declarations(vector_math: bool) -> str:
    """libm functions for the CPU kernels. With glibc's libmvec, declaring them ``simd`` lets
    the compiler call the vector versions (8 floats at once) inside the lane loops."""
    if not vector_math:
        return "#define LM_F(name) __builtin_##name##f\n#define LM_D(name) __builtin_##name"
    attrs = '__attribute__((simd("notinbranch"), const, nothrow))'
    lines = ["#define LM_F(name) name##f", "#define LM_D(name) name"]
    for name, args in libm_functions():
        # Older glibc (< 2.35) has no vector acos, tanh, erf & co: plain scalar calls then.
        fn_attrs = attrs if _has_vector_variant(name, args) else "__attribute__((const, nothrow))"
        for T, suffix in (("float", "f"), ("double", "")):
            params = ", ".join([T] * args)
            lines.append(f'extern "C" {T} {name}{suffix}({params}) {fn_attrs};')
    return "\n".join(lines)


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

    The target's macros (:data:`TARGET_MACROS`; on the CPU also the libm declarations,
    vector ones with ``vector_math``), then every op's helper (:func:`helpers`). On the CPU,
    ``lm_exp`` is our own (see the Exp op); CUDA defines ``LM_NATIVE_EXP``: its own exp.
    """
    if target not in TARGET_MACROS:
        raise ValueError(f"unknown target {target!r}: 'cpu' or 'cuda'")
    parts = ["", TARGET_MACROS[target]]
    if target == "cpu":
        parts.append(_math_declarations(vector_math))
    parts += ["typedef long long i64;", "", helpers(), ""]
    return "\n".join(parts)
