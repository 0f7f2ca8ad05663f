"""Tensor cores in the CUDA target: the dot products of a tile as one small GEMM.

A float32 formula that holds ``SqDist(x_i, y_j)`` or ``<x_i, y_j>`` (``Scalprod``,
``Sum(x * y)``: the dot products of matrix products and of Gaussian kernels) of an
i-variable ``x`` and a j-variable ``y`` of dim ``D >= MIN_DIM`` reads them from a
``BLOCK x JT`` tile that the block computes once per tile with tensor-core MMAs (PTX
``mma.sync.m16n8k8`` on TF32, sm_80 and later: no header, so NVRTC needs no toolkit); the
rest of the formula and the reduction run as before, one thread per row, reading the tile
from shared memory (the "epilogue"). ``SqDist`` is ``|x|^2 + |y|^2 - 2 <x, y>`` clamped
at 0, the norms summed in float32 from the same staged chunks.

Each of the ``BLOCK / 32`` warps owns 32 rows (two m16 tiles) and all ``JT`` columns
(``JT / 8`` n8 tiles); the block walks ``D`` in chunks of ``KC`` components staged in
shared memory (zero past the task's rows, the tile's columns and ``D``: ragged M, N, D
need no special case). The tiles take about 40 KiB of the block's 48 KiB of static shared
memory (``JT`` = 32 at ``BLOCK`` = 128); j-variables too wide to be staged beside them
(``K @ B`` with B of 1024 columns) are read in place. ptxas (sm_90): 124 registers and no
local memory for the D = 64 Gaussian sum in 3xtf32 (96 without tensor cores).

Not done: the sum of ``K @ B`` itself (kernel values times B's columns) is still one row
per thread, its accumulator row in registers or, for wide B, local memory; a second MMA
with B's columns split across blocks would be its tensor-core form.

The option ``tensor_cores`` (:data:`MODES`; the CUDA backend reads it from
``LAZYMAT_TENSOR_CORES``, :func:`lazymat.config.tensor_cores`):

- ``"off"`` (the default): no tensor cores; every pair by the formula, in float32.
- ``"tf32"``: one MMA on TF32 operands (10-bit mantissas): each dot product has a
  relative error of about ``2**-11`` per term, ``|err| <~ 1e-3 * sum_k |x_k y_k|``.
- ``"3xtf32"``: each operand split into a TF32 high part and a TF32 residual, three MMAs
  (``lo*hi + hi*lo + hi*hi``): float32-like dot products (``|err| <~ 1e-6 * sum_k
  |x_k y_k|``).

In both, ``SqDist`` by the expansion has an absolute error of about that of the dot
product times 2 plus ``1e-7 * (|x|^2 + |y|^2)``, not relative to ``|x - y|^2``: close
pairs (a point and itself) get small positive distances instead of 0, and an infinite
coordinate gives NaN (inf - inf) where the formula gives inf. That, and that this
code has been compiled (NVRTC, nvcc) and run in the CPU emulation of the tests but not yet
on a GPU, is why the default is ``"off"``. float64 formulas never use tensor cores;
float16 and bfloat16 inputs are reduced in float32, so they take the TF32 path.

>>> from lazymat.formula import Var, SqDist, apply
>>> from lazymat.reductions import REDUCTIONS
>>> from lazymat.codegen import cuda
>>> f = apply("Exp", -SqDist(Var(0, 64, 0), Var(1, 64, 1)))
>>> spec = KernelSpec(REDUCTIONS["Sum"], f, None, None, "float32", ((64, 0), (64, 1)))
>>> "mma.sync.aligned.m16n8k8" in cuda.render(spec, tensor_cores="3xtf32")
True
"""

from __future__ import annotations

from ..config import TENSOR_CORE_MODES as MODES
from ..formula import Node
from .c_like import KernelSpec
from .scaffold import Kernel, TileNodes

__all__ = ["MIN_DIM", "MODES", "MMA_HELPERS", "GramTiles", "KernelSpec", "check_mode",
           "gram_tiles"]

#: Dot products shorter than this stay on the CUDA cores (an MMA has K = 8; the staging and
#: the extra barriers cost more than they save on short vectors).
MIN_DIM = 16
#: Components of x and y staged per chunk (at most; a multiple of the MMA's K = 8).
CHUNK = 32
_PAD = 4  # floats added to a staged row: the fragment loads of a warp hit 32 distinct banks


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else a ValueError naming them."""
    if mode not in MODES:
        raise ValueError(f"tensor_cores must be one of {', '.join(map(repr, MODES))}, "
                         f"got {mode!r}")
    return mode


#: The PTX helpers (sm_80+). A host emulation of the kernels defines ``LM_MMA_HELPERS`` and
#: its own ``lm_tf32`` and ``lm_mma_tf32`` (the warp's 32 lanes hold one MMA's operands
#: together, in the layout of the PTX ISA's "mma.m16n8k8 .tf32" fragments).
MMA_HELPERS = r"""#ifndef LM_MMA_HELPERS
// x rounded to TF32 (10-bit mantissa, to nearest, ties away), as the bits of a float.
__device__ __forceinline__ unsigned lm_tf32(float x) {
  unsigned r; asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x)); return r;
}
// c += a * b on a warp's m16n8k8 fragments (a: 16x8 row-major, b: 8x8 column-major).
__device__ __forceinline__ void lm_mma_tf32(float* c, const unsigned* a, const unsigned* b) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, "
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif
// x as a TF32 high part and a TF32 residual (x - hi is exact in float32).
__device__ __forceinline__ void lm_tf32_split(float x, unsigned& hi, unsigned& lo) {
  hi = lm_tf32(x); lo = lm_tf32(x - __uint_as_float(hi));
}
"""


class _Pair:
    """The dot products of one (x, y) pair of variables, shared by its nodes."""

    def __init__(self, k: int, x: Node, y: Node):
        self.k, self.x, self.y = k, x.params[0], y.params[0]
        self.D = x.params[1]
        self.norms = False  # a SqDist reads |x|^2 and |y|^2


def _operands(a: Node, b: Node) -> tuple[Node, Node] | None:
    """(x, y) when ``a``, ``b`` are an i- and a j-variable of one dim (either order)."""
    if a.op != "Var" or b.op != "Var" or a.dim != b.dim:
        return None
    cats = (a.params[2], b.params[2])
    return (a, b) if cats == (0, 1) else (b, a) if cats == (1, 0) else None


def _match(node: Node) -> tuple[str, tuple[Node, Node]] | None:
    """("sqdist" | "dot", (x, y)) for ``Sum(Square(x - y))`` and ``Sum(x * y)``."""
    if node.op != "Sum" or node.deps != 3:
        return None
    (a,) = node.args
    if a.op == "Square" and a.args[0].op == "Subtract":
        found = _operands(*a.args[0].args)
        return ("sqdist", found) if found else None
    if a.op == "Mult":
        found = _operands(*a.args)
        return ("dot", found) if found else None
    return None


class GramTiles(TileNodes):
    """The tensor-core tiles of one kernel (see the module docstring)."""

    def __init__(self, kern: Kernel, mode: str, pairs: dict, kinds: dict[int, tuple]):
        self.mode, self.pairs, self.kinds = mode, list(pairs.values()), kinds
        self.nodes = frozenset(kinds)
        self.variables = frozenset(v for p in self.pairs for v in (p.x, p.y))
        block = kern.target.block
        self.chunk = min(CHUNK, -(-max(p.D for p in self.pairs) // 8) * 8)
        ld = self.chunk + _PAD
        self.min_columns = 16
        # Staged chunks of x (BLOCK rows) and y (JT columns); per pair a tile of BLOCK rows
        # of JT + 1 columns (odd: the epilogue's reads of a warp hit distinct banks), and the
        # norms.
        self.shared_bytes = 4 * (block * ld + sum(block * (1 + p.norms) for p in self.pairs))
        self.column_bytes = 4 * (ld + sum(block + p.norms for p in self.pairs))

    def shared(self, kern: Kernel) -> list[str]:
        ld = self.chunk + _PAD
        lines = [f"__shared__ float mmxc[BLOCK * {ld}];  // a chunk of x, then of y",
                 f"__shared__ float mmyc[JT * {ld}];"]
        for p in self.pairs:
            lines.append(f"__shared__ float mmg{p.k}[BLOCK * (JT + 1)];  "
                         f"// <x_i, y_j> of the tile, a{p.x} . a{p.y}")
            if p.norms:
                lines.append(f"__shared__ float mmxn{p.k}[BLOCK], mmyn{p.k}[JT];")
        return lines

    def tile(self, kern: Kernel) -> list[str]:
        lines: list[str] = []
        for p in self.pairs:
            lines += self._pair(p)
        return lines

    def _pair(self, p: _Pair) -> list[str]:
        KC, ld, D = self.chunk, self.chunk + _PAD, p.D
        three = self.mode == "3xtf32"
        split = ("lm_tf32_split({v}, {hi}, {lo});" if three else "{hi} = lm_tf32({v});")
        a_load = split.format(
            v=f"mmxc[(mmw + 16 * r + mmq + 8 * (e & 1)) * {ld} + kk + mmt + 4 * (e >> 1)]",
            hi="mah[r][e]", lo="mal[r][e]")
        b_load = split.format(v=f"mmyc[(8 * s + mmq) * {ld} + kk + mmt + 4 * e]",
                              hi="mbh[e]", lo="mbl[e]")
        mmas = (["lm_mma_tf32(mmc[r][s], mal[r], mbh);",
                 "lm_mma_tf32(mmc[r][s], mah[r], mbl);"] if three else [])
        mmas.append("lm_mma_tf32(mmc[r][s], mah[r], mbh);")
        norms = [f"for (int k = 0; k < {KC}; k++) {{ const float v = "
                 f"mmxc[threadIdx.x * {ld} + k]; mmx2 += v * v; }}",
                 f"if ((int)threadIdx.x < JT) for (int k = 0; k < {KC}; k++) {{ const float v = "
                 f"mmyc[threadIdx.x * {ld} + k]; mmy2 += v * v; }}"]
        lo = ", mal[2][4]" if three else ""
        blo = ", mbl[2]" if three else ""
        return [
            f"{{  // tensor cores ({self.mode}): <a{p.x}_i, a{p.y}_j> of the tile's BLOCK x JT "
            "pairs",
            "  const int mmw = threadIdx.x / 32 * 32;  // this warp's 32 rows",
            "  const int mmq = threadIdx.x % 32 / 4, mmt = threadIdx.x % 4;  "
            "// the lane's group and place in it",
            "  float mmc[2][JT / 8][4];",
            "  for (int r = 0; r < 2; r++) for (int s = 0; s < JT / 8; s++) "
            "for (int e = 0; e < 4; e++) mmc[r][s][e] = 0.0f;",
            "  float mmx2 = 0.0f, mmy2 = 0.0f;  (void)mmx2; (void)mmy2;",
            f"  for (int k0 = 0; k0 < {D}; k0 += {KC}) {{",
            "    __syncthreads();  // the chunk buffers are free",
            f"    for (int e = threadIdx.x; e < BLOCK * {KC}; e += BLOCK) {{",
            f"      const int r = e / {KC}, k = e % {KC};",
            f"      mmxc[r * {ld} + k] = r < nl && k0 + k < {D} ? "
            f"a{p.x}[(i0 + r) * {D} + k0 + k] : 0.0f;",
            "    }",
            f"    for (int e = threadIdx.x; e < JT * {KC}; e += BLOCK) {{",
            f"      const int r = e / {KC}, k = e % {KC};",
            f"      mmyc[r * {ld} + k] = r < nj && k0 + k < {D} ? "
            f"a{p.y}[(jb + r) * {D} + k0 + k] : 0.0f;",
            "    }",
            "    __syncthreads();  // (mma.sync: the warp's lanes converged here)",
            f"    for (int kk = 0; kk < {KC}; kk += 8) {{",
            f"      unsigned mah[2][4]{lo};",
            f"      for (int r = 0; r < 2; r++) for (int e = 0; e < 4; e++) {a_load}",
            "      for (int s = 0; s < JT / 8; s++) {",
            f"        unsigned mbh[2]{blo};",
            f"        for (int e = 0; e < 2; e++) {b_load}",
            "        for (int r = 0; r < 2; r++) {",
            *["          " + s for s in mmas],
            "        }",
            "      }",
            "    }",
            *(["    " + s for s in norms] if p.norms else []),
            "  }",
            "  for (int r = 0; r < 2; r++) for (int s = 0; s < JT / 8; s++) "
            "for (int e = 0; e < 4; e++)",
            f"    mmg{p.k}[(mmw + 16 * r + mmq + 8 * (e >> 1)) * (JT + 1) + 8 * s + 2 * mmt "
            "+ (e & 1)] = mmc[r][s][e];",
            *([f"  mmxn{p.k}[threadIdx.x] = mmx2;",
               f"  if ((int)threadIdx.x < JT) mmyn{p.k}[threadIdx.x] = mmy2;"] if p.norms
              else []),
            "  __syncthreads();",
            "}"]

    def value(self, kern: Kernel, node: Node) -> str:
        kind, p = self.kinds[id(node)]
        dot = f"mmg{p.k}[threadIdx.x * (JT + 1) + jt + jj]"
        if kind == "dot":
            return dot
        d = f"(mmxn{p.k}[threadIdx.x] + mmyn{p.k}[jt + jj] - 2.0f * {dot})"
        return f"({d} < 0.0f ? 0.0f : {d})"  # rounding can go below 0; NaN stays NaN


def gram_tiles(kern: Kernel, mode: str) -> GramTiles | None:
    """The tensor-core tiles of ``kern`` under ``mode`` (None: none to compute: mode "off",
    not float32, no dot product of dim >= MIN_DIM, or a block that is not whole warps)."""
    if check_mode(mode) == "off" or kern.spec.dtype != "float32" or kern.target.block % 32:
        return None
    from ..formula import walk

    pairs: dict[tuple[int, int], _Pair] = {}
    kinds: dict[int, tuple[str, _Pair]] = {}
    seen: set[int] = set()
    for root in kern.roots:
        for n in walk(root):
            if id(n) in seen:
                continue
            seen.add(id(n))
            found = _match(n)
            if found is None or found[1][0].dim < MIN_DIM:
                continue
            kind, (x, y) = found
            key = (x.params[0], y.params[0])
            p = pairs.get(key)
            if p is None:
                p = pairs[key] = _Pair(len(pairs), x, y)
            p.norms |= kind == "sqdist"
            kinds[id(n)] = (kind, p)
    return GramTiles(kern, mode, pairs, kinds) if kinds else None
