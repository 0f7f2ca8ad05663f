"""Tensor-core tiles of the CUDA target (``codegen/cuda_mma.py``), without a GPU.

1. The source: which formulas get MMA tiles (float32, dim >= 16, "tf32" / "3xtf32"), what
   is no longer staged, and a clear error for a bad mode.
2. The kernels compile with NVRTC and with ``nvcc -arch=sm_90`` (one translation unit per
   mode), and ptxas reports no spills for them.
3. The same CUDA source runs on the CPU (the OpenMP shim of ``test_cuda_codegen``, plus an
   emulation of ``mma.sync.m16n8k8`` that gathers the warp's 32 lanes' fragments in the
   PTX layout, and of ``cvt.rna.tf32``), against the reference backend: Gaussian sum,
   LogSumExp, ArgKMin/KMin and a wide K @ B, with batch dims and ranges, M, N, D not
   multiples of 16; 3xtf32 to float32 accuracy, tf32 measurably less accurate.

None of this runs on a GPU: the layout emulated is the one the PTX ISA documents.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading

import numpy as np
import pytest
from test_cuda_codegen import HOST, SHIM, _ranges, arg_dims, emulate_with

from lazymat import config
from lazymat.codegen import cuda, cuda_mma
from lazymat.codegen.cpu import KernelSpec
from lazymat.compile import compiler_info, nvrtc
from lazymat.formula import Scalprod, SqDist, Var, apply
from lazymat.plan import Request, run
from lazymat.reductions import get as get_reduction

NVCC = shutil.which("nvcc")
HAVE_NVRTC = nvrtc.available()
_HOST = compiler_info()
HAVE_EMULATION = _HOST is not None and _HOST.openmp
ARCH = "sm_90"
requires_emulation = pytest.mark.skipif(not HAVE_EMULATION, reason="no C++ compiler with OpenMP")

#: CUDA's tensor-core pieces on the CPU: a warp is 32 threads of the OpenMP team; an MMA
#: gathers the 32 lanes' registers (double-buffered: one barrier per MMA), and each lane
#: computes its own accumulators from the whole 16x8 A and 8x8 B.
MMA_SHIM = r"""
#define LM_MMA_HELPERS
static inline float __uint_as_float(unsigned v) { float r; memcpy(&r, &v, 4); return r; }
static inline unsigned lm_tf32(float x) {  // cvt.rna.tf32.f32: to nearest, ties away
  unsigned u; memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  return u;
}
static unsigned lm_mma_lanes[2][4][32][6];  // [parity][warp][lane]: a0..a3, b0, b1
static thread_local int lm_mma_parity;
static inline void lm_mma_tf32(float* c, const unsigned* a, const unsigned* b) {
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32, p = lm_mma_parity;
  lm_mma_parity ^= 1;
  for (int e = 0; e < 4; e++) lm_mma_lanes[p][w][lane][e] = a[e];
  lm_mma_lanes[p][w][lane][4] = b[0]; lm_mma_lanes[p][w][lane][5] = b[1];
  _Pragma("omp barrier")
  float A[16][8], B[8][8];
  for (int l = 0; l < 32; l++) {
    const int g = l / 4, t = l % 4;
    for (int e = 0; e < 4; e++)
      A[g + 8 * (e & 1)][t + 4 * (e >> 1)] = __uint_as_float(lm_mma_lanes[p][w][l][e]);
    B[t][g] = __uint_as_float(lm_mma_lanes[p][w][l][4]);
    B[t + 4][g] = __uint_as_float(lm_mma_lanes[p][w][l][5]);
  }
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; e++) {
    const int r = g + 8 * (e >> 1), n = 2 * t + (e & 1);
    float s = c[e];
    for (int k = 0; k < 8; k++) s += A[r][k] * B[k][n];
    c[e] = s;
  }
}
"""

WARP = 32  # rows per block in the emulation: one warp


# --------------------------------------------------------------------------- the kernels

def spec_of(reduction, formula, weight=None, K=None, dtype="float32", nargs=None):
    roots = [formula] + ([weight] if weight is not None else [])
    if nargs is None:
        nargs = 1 + max(v.params[0] for r in roots for v in _vars(r))
    return KernelSpec(get_reduction(reduction), formula, weight, K, dtype, arg_dims(roots, nargs))


def _vars(root):
    from lazymat.formula import variables

    return variables(root)


def cases(D: int, E: int) -> dict[str, tuple]:
    """name -> (reduction, formula, weight, K): the workloads of the tensor-core target."""
    x, y, b, s = Var(0, D, 0), Var(1, D, 1), Var(2, E, 1), Var(3, 1, 2)
    d2 = SqDist(x, y)
    return {
        "gauss": ("Sum", apply("Exp", -d2 * s), None, None),
        "lse": ("LogSumExp", -d2 * s + Scalprod(x, y) * s, b, None),
        "argkmin": ("ArgKMin", d2, None, 5),
        "kmin": ("KMin", SqDist(y, x), None, 3),  # the j-variable first
        "kb": ("Sum", apply("Exp", -d2 * s) * b, None, None),  # K @ B, B with E columns
        # the gradient's shape: x - y also by the formula (x copied, y staged)
        "grad": ("Sum", apply("Exp", -d2 * s) * (x - y), None, None),
    }


# --------------------------------------------------------------------------- the source

def test_bad_mode_is_a_clear_error(monkeypatch):
    red, f, w, K = cases(32, 4)["gauss"]
    with pytest.raises(ValueError, match="'off', 'tf32', '3xtf32'.*'fp8'"):
        cuda.render(spec_of(red, f, w, K, nargs=4), tensor_cores="fp8")
    monkeypatch.setenv("LAZYMAT_TENSOR_CORES", "half")
    with pytest.raises(ValueError, match="LAZYMAT_TENSOR_CORES must be one of off, tf32, "
                                         "3xtf32, got 'half'"):
        config.tensor_cores()
    monkeypatch.setenv("LAZYMAT_TENSOR_CORES", " TF32 ")
    assert config.tensor_cores() == "tf32"
    monkeypatch.delenv("LAZYMAT_TENSOR_CORES")
    assert config.tensor_cores() == "off"  # the default


def test_which_kernels_use_tensor_cores():
    red, f, w, K = cases(64, 4)["gauss"]
    spec = spec_of(red, f, w, K, nargs=4)
    on = cuda.render(spec, tensor_cores="3xtf32")
    assert on.count("lm_mma_tf32(mmc") == 3 and "mma.sync.aligned.m16n8k8" in on
    assert "__shared__ T ys1" not in on  # y is read by the MMA tiles only: not staged
    assert "xv0[" not in on  # nor copied per thread
    assert cuda.render(spec, tensor_cores="tf32").count("lm_mma_tf32(mmc") == 1
    for off in (cuda.render(spec), cuda.render(spec, tensor_cores="off"),
                cuda.render(spec_of(red, f, w, K, dtype="float64", nargs=4),
                            tensor_cores="3xtf32"),
                cuda.render(spec_of(*cases(cuda_mma.MIN_DIM - 1, 4)["gauss"], nargs=4),
                            tensor_cores="3xtf32")):
        assert "lm_mma_tf32" not in off and "mma.sync" not in off
    # A block of 16 threads is not whole warps: the formula computes every pair.
    assert "lm_mma_tf32(" not in cuda.render(spec, block=16, tensor_cores="3xtf32")
    # y also used outside the dot product: staged as before, the dot product on MMA tiles.
    g = SqDist(Var(0, 64, 0), Var(1, 64, 1)) + apply("Sum", Var(1, 64, 1))
    both = cuda.render(spec_of("Min", g, nargs=2), tensor_cores="tf32")
    assert "__shared__ T ys1" in both and "lm_mma_tf32(mmc" in both


def test_mma_shim_is_kept_in_sync():
    """The CPU shims define every CUDA name the tensor-core kernels use."""
    names = r"\b(__\w+__|__\w+|threadIdx|blockIdx|gridDim)\b"
    for red, f, w, K in cases(40, 3).values():
        src = cuda.render(spec_of(red, f, w, K, nargs=4), tensor_cores="3xtf32")
        src = src.replace(cuda_mma.MMA_HELPERS.split("#endif")[0], "")  # the PTX is skipped
        missing = set(re.findall(names, src)) - set(re.findall(names, SHIM + MMA_SHIM))
        assert not missing - {"__restrict__"}, f"the CPU shims lack {sorted(missing)}"


# --------------------------------------------------------------------------- compiling

#: The benchmark's workloads (D = 64..256, B of 64..1024 columns), a few per dim.
KERNELS = {"gauss_d64": (64, 1, "gauss"), "lse_d128": (128, 1, "lse"),
           "argkmin_d256": (256, 1, "argkmin"), "kb_d64": (64, 64, "kb"),
           "kb_d128": (128, 1024, "kb")}


def _module(mode: str) -> str:
    specs = {}
    for name, (D, E, case) in KERNELS.items():
        red, f, w, K = cases(D, E)[case]
        specs[name] = spec_of(red, f, w, K, nargs=4)
    return cuda.render_module(specs, tensor_cores=mode)


_builds: dict = {}
_lock = threading.Lock()


def _build_all(tmp) -> dict:
    with _lock:
        if _builds:
            return _builds
        jobs = []
        for mode in ("tf32", "3xtf32"):
            source = _module(mode)
            if HAVE_NVRTC:
                jobs.append(("nvrtc", mode, source))
            if NVCC:
                jobs.append(("nvcc", mode, source))

        def build(compiler, mode, source):
            if compiler == "nvrtc":
                try:
                    _builds[(compiler, mode)] = (True, "", nvrtc.compile_cubin(
                        source, arch=ARCH, name=f"mma_{mode}.cu", cache=False))
                except Exception as e:  # noqa: BLE001 - reported by the test
                    _builds[(compiler, mode)] = (False, str(e), b"")
                return
            path = tmp / f"mma_{mode}.cu"
            path.write_text(source)
            cubin = path.with_suffix(".cubin")
            res = subprocess.run([NVCC, f"-arch={ARCH}", "--cubin", "-std=c++17", "-Xptxas",
                                  "-v", "-o", str(cubin), str(path)],
                                 capture_output=True, text=True)
            ok = res.returncode == 0 and cubin.exists()
            _builds[(compiler, mode)] = (ok, res.stdout + res.stderr,
                                         cubin.read_bytes() if ok else b"")

        threads = [threading.Thread(target=build, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return _builds


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return _build_all(tmp_path_factory.mktemp("cuda_mma"))


COMPILERS = [pytest.param("nvrtc", marks=pytest.mark.skipif(not HAVE_NVRTC,
                                                            reason="NVRTC not importable")),
             pytest.param("nvcc", marks=pytest.mark.skipif(NVCC is None,
                                                           reason="nvcc not on PATH"))]


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("mode", ["tf32", "3xtf32"])
def test_tensor_core_kernels_compile(builds, compiler, mode):
    ok, log, cubin = builds[(compiler, mode)]
    assert ok, log[-4000:]
    for name in KERNELS:
        assert name.encode() + b"\0" in cubin, name
    assert "warning" not in log, log[-4000:]


#: K @ B with B of 1024 columns: its column does not fit the shared tile next to the MMA
#: tiles, so B is read in place (the MMA tiles still staged); the thread's accumulator row
#: (1024 doubles) and pair buffer (1024 floats) are local memory, 12 KiB of stack, with a
#: few spills. One row per thread makes that unavoidable: a second MMA (the tile's kernel
#: values times B) with B's columns split across blocks would be the fix.
LOCAL_MEMORY = {"kb_d128"}


@pytest.mark.parametrize("mode", ["tf32", "3xtf32"])
def test_benchmark_kernels_get_tiles(mode):
    for name, (D, E, case) in KERNELS.items():
        red, f, w, K = cases(D, E)[case]
        src = cuda.render(spec_of(red, f, w, K, nargs=4), tensor_cores=mode)
        assert "lm_mma_tf32(mmc" in src, name
        if case == "kb":  # B staged, unless too wide
            assert ("__shared__ T ys2" in src) == (E < 1024), name


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("mode", ["tf32", "3xtf32"])
def test_tensor_core_kernels_do_not_spill(builds, mode):
    """ptxas: no spills and no local memory in the MMA kernels (but the K-list of ArgKMin,
    64 bytes, and LOCAL_MEMORY)."""
    ok, log, _ = builds[("nvcc", mode)]
    assert ok, log[-4000:]
    found = re.findall(r"Function properties for (\w+)\n\s*(\d+) bytes stack frame, (\d+) "
                       r"bytes spill stores, (\d+) bytes spill loads", log)
    assert {name for name, *_ in found} == set(KERNELS), log[-4000:]
    local = {name for name, frame, stores, loads in found
             if int(frame) > 64 or int(stores) or int(loads)}
    assert local == LOCAL_MEMORY, found


# --------------------------------------------------------------------------- running on the CPU

@pytest.fixture
def emulate(monkeypatch):
    """The CPU backend runs the CUDA kernel rendered with tensor cores (``emulate.mode``),
    one warp per block, its tasks of 32 rows."""
    from lazymat.backends import cpu

    class Emulation:
        mode, block = "3xtf32", WARP

        @classmethod
        def use(cls, mode: str, block: int = WARP) -> None:
            cls.mode, cls.block = mode, block
            cpu.kernels.clear()  # the backend's kernels of the other mode
            cpu.LANES["float32"] = block  # tasks of a block's rows

    def source_of(spec: KernelSpec) -> str:
        block = Emulation.block
        source = (SHIM + MMA_SHIM + cuda.render(spec, name="lm_cuda", block=block,
                                                tensor_cores=Emulation.mode)
                  + HOST % {"block": block})
        assert "lm_mma_tf32(mmc" in source
        return source

    libs = emulate_with(monkeypatch, source_of, "cuda_mma_emulation")
    monkeypatch.setitem(cpu.LANES, "float32", WARP)
    yield Emulation
    assert all(lib.lm_emulation_ok() for lib in libs), "OpenMP gave a team of the wrong size"


def _data(D: int, E: int, M: int, N: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, M, D)).astype("float32"),
            rng.standard_normal((2, N, D)).astype("float32"),
            (rng.random((1, N, E)) + 0.1).astype("float32"),
            np.full((2, 1), 1.0 / D, dtype="float32")]


def _errors(got, want) -> list[float]:
    """The largest error of each float output, relative to the output's scale."""
    out = []
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape)
        if g.dtype == np.int64:
            continue
        finite = np.isfinite(w)
        assert np.array_equal(finite, np.isfinite(g))
        scale = max(1.0, float(np.abs(w[finite]).max(initial=0)))
        out.append(float(np.abs(g[finite] - w[finite]).max(initial=0)) / scale)
    return out


D, E, M, N = 20, 3, 37, 45  # ragged: 37 = 32 + 5 rows, 45 = 2 * 16 + 13 columns, D = 2*8 + 4


@requires_emulation
@pytest.mark.parametrize("case", ["gauss", "lse", "kmin", "kb", "grad"])
def test_mma_runs_like_reference(emulate, case):
    """3xtf32: float32 accuracy, with batch dims and with ranges."""
    red, f, w, K = cases(D, E)[case]
    arrays = _data(D, E, M, N)
    ref = [a.astype("float64") for a in arrays]
    req = Request(red, f, K=K, weight=w)
    for ranges in (None, _ranges(M, N, np.random.default_rng(2))):
        got = run(req, arrays, backend="cpu", ranges=ranges)
        want = [np.asarray(v).astype("float32") if np.asarray(v).dtype == np.float64 else v
                for v in run(req, ref, backend="reference", ranges=ranges)]
        assert max(_errors(got, want), default=0) < 2e-5, (case, _errors(got, want))


@requires_emulation
@pytest.mark.parametrize("dim,block", [(40, 32), (20, 64)])
def test_more_chunks_and_warps(emulate, dim, block):
    """D = 40: two chunks of x and y, the second one ragged; two warps per block."""
    emulate.use("3xtf32", block)
    red, f, w, K = cases(dim, E)["gauss"]
    arrays = _data(dim, E, 70, N)
    got = run(Request(red, f), arrays, backend="cpu")
    want = run(Request(red, f), [a.astype("float64") for a in arrays], backend="reference")
    assert _errors(got, [v.astype("float32") for v in want])[0] < 2e-5


@requires_emulation
def test_wide_b_read_in_place(emulate):
    """K @ B with B of 1024 columns: B read in place, the MMA tiles staged."""
    red, f, w, K = cases(D, 1024)["kb"]
    arrays = _data(D, 1024, M, N)
    assert "ys2" not in cuda.render(spec_of(red, f, w, K, nargs=4), block=WARP,
                                    tensor_cores="3xtf32")
    got = run(Request(red, f), arrays, backend="cpu")
    want = run(Request(red, f), [a.astype("float64") for a in arrays], backend="reference")
    assert _errors(got, [v.astype("float32") for v in want])[0] < 2e-5


@requires_emulation
def test_argkmin_selects_the_nearest(emulate):
    """The indices of the K nearest agree with float64 (well-separated data)."""
    red, f, w, K = cases(D, E)["argkmin"]
    x = np.random.default_rng(5).standard_normal((M, D)).astype("float32") * 3
    y = np.random.default_rng(6).standard_normal((N, D)).astype("float32") * 3
    arrays = [x, y, np.ones((N, E), "float32"), np.ones(1, "float32")]
    got = run(Request(red, f, K=K), arrays, backend="cpu")[0]
    want = np.argsort(((x[:, None].astype(float) - y[None]) ** 2).sum(-1), 1)[:, :K]
    assert (got == want).mean() > 0.99


@requires_emulation
def test_tf32_is_emulated_and_less_accurate(emulate):
    """tf32 rounds the operands to 10-bit mantissas (an error near 1e-3 of the dot
    products), 3xtf32 does not: the emulation shows the difference the modes promise."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((M, D)).astype("float32")
    y = rng.standard_normal((N, D)).astype("float32")
    arrays = [x, y, np.ones((N, 2), "float32"), np.ones(1, "float32")]
    req = Request("Sum", Scalprod(Var(0, D, 0), Var(1, D, 1)) * Var(2, 2, 1), K=None)
    want = x.astype(float) @ y.astype(float).T @ np.ones((N, 2))
    errors = {}
    for mode in ("tf32", "3xtf32"):
        emulate.use(mode)
        got = run(req, arrays, backend="cpu")[0]
        errors[mode] = float(np.abs(got - want).max() / np.abs(want).max())
    assert errors["3xtf32"] < 1e-5 < errors["tf32"] < 1e-2, errors

