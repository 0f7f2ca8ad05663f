"""GPU benchmarks: lazymat's CUDA backend against pykeops and torch on the same GPU.

``python -m benchmarks.gpu [--quick] [--no-pykeops] [--no-compile] [--blocks] [--tensor-cores]``
prints a Markdown
table: for each workload and size, the median time of each peer (after a warm-up call,
with ``torch.cuda.synchronize()`` around the timed calls), the first call of lazymat and
pykeops (which includes their compilation), and lazymat's speed-up over each peer.

Workloads (float32, M = N, points uniform in the unit cube):

- Gaussian kernel sum, D = 3: a_i = Σ_j exp(-|x_i - y_j|² / 2σ²) b_j, N = 10⁴, 10⁵, 10⁶;
- k-nearest neighbours, K = 10, D = 3 and D = 64 (indices);
- LogSumExp of -|x_i - y_j|² / 2σ², D = 3;
- the gradient of Σ_i a_i · c_i with respect to x (the Gaussian sum's backward).

Peers: pykeops (``LazyTensor``), torch dense (the M×N matrix, when it fits in 16 GB), torch
chunked (blocks of rows, at most 2.5·10⁸ matrix entries at a time) and ``torch.compile`` of
the chunked function. A peer predicted to take more than the budget at a size (from its
time at the previous size) is skipped and marked with its predicted time. ``--blocks``
first times the Gaussian sum against the CUDA kernel's threads per block.

``--tensor-cores`` times lazymat alone with ``LAZYMAT_TENSOR_CORES`` = off, tf32 and 3xtf32
in the same run (the target of issue 17: at least 3x over "off"): the Gaussian sum,
LogSumExp and k-NN (K = 10) at D = 64, 128, 256, and K @ B (the D = 64 Gaussian kernel
times B with 64, 256 and 1024 columns), M = N = 10^5 (10^4 with ``--quick``); each mode's
largest difference from "off", relative to the output's largest value (k-NN: the share of
indices that differ), is printed beside its time.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

SIGMA = 0.1
BUDGET_S = 20.0  # a peer predicted to need more than this per call is skipped
DENSE_BYTES = 16e9
CHUNK_ENTRIES = 250_000_000


def _timed(fn: Callable[[], object], torch, repeat: int) -> tuple[float, float]:
    """(first call, median of ``repeat`` calls), seconds, synchronised."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def _chunks(M: int, N: int) -> int:
    return max(1, min(M, CHUNK_ENTRIES // max(N, 1)))


# --------------------------------------------------------------------------- workloads

def gauss_peers(torch, lm, keops, x, y, b, c):
    g = 1 / (2 * SIGMA ** 2)

    def dense():
        return torch.exp(-torch.cdist(x, y) ** 2 * g) @ b

    def block(xs):
        return torch.exp(-((xs[:, None, :] - y[None, :, :]) ** 2).sum(-1) * g) @ b

    def chunked(fn=block):
        step = _chunks(len(x), len(y))
        return torch.cat([fn(x[k:k + step]) for k in range(0, len(x), step)])

    compiled = torch.compile(block, dynamic=False)
    peers = {"lazymat": lambda: ((-lm.Vi(x).sqdist(lm.Vj(y)) * g).exp() * lm.Vj(b)).sum(1),
             "torch dense": dense, "torch chunked": chunked,
             "torch.compile": lambda: chunked(compiled)}
    if keops is not None:
        peers["pykeops"] = lambda: ((-keops.Vi(x).sqdist(keops.Vj(y)) * g).exp()
                                    * keops.Vj(b)).sum(1)
    return peers


def grad_peers(torch, lm, keops, x, y, b, c):
    g = 1 / (2 * SIGMA ** 2)
    xg = x.detach().clone().requires_grad_(True)

    def backward(out):
        return torch.autograd.grad((out * c).sum(), [xg])[0]

    def chunked():
        step = _chunks(len(x), len(y))
        grads = []
        for k in range(0, len(x), step):
            xs = x[k:k + step].detach().clone().requires_grad_(True)
            out = torch.exp(-((xs[:, None, :] - y[None, :, :]) ** 2).sum(-1) * g) @ b
            grads.append(torch.autograd.grad((out * c[k:k + step]).sum(), [xs])[0])
        return torch.cat(grads)

    peers = {"lazymat": lambda: backward(((-lm.Vi(xg).sqdist(lm.Vj(y)) * g).exp()
                                          * lm.Vj(b)).sum(1)),
             "torch chunked": chunked}
    if keops is not None:
        peers["pykeops"] = lambda: backward(((-keops.Vi(xg).sqdist(keops.Vj(y)) * g).exp()
                                             * keops.Vj(b)).sum(1))
    return peers


def lse_peers(torch, lm, keops, x, y, b, c):
    g = 1 / (2 * SIGMA ** 2)

    def block(xs):
        return torch.logsumexp(-((xs[:, None, :] - y[None, :, :]) ** 2).sum(-1) * g, 1)

    def chunked(fn=block):
        step = _chunks(len(x), len(y))
        return torch.cat([fn(x[k:k + step]) for k in range(0, len(x), step)])

    compiled = torch.compile(block, dynamic=False)
    peers = {"lazymat": lambda: (-lm.Vi(x).sqdist(lm.Vj(y)) * g).logsumexp(1),
             "torch chunked": chunked, "torch.compile": lambda: chunked(compiled)}
    if keops is not None:
        peers["pykeops"] = lambda: (-keops.Vi(x).sqdist(keops.Vj(y)) * g).logsumexp(1)
    return peers


def knn_peers(torch, lm, keops, x, y, b, c):
    def block(xs):
        return torch.topk(torch.cdist(xs, y), 10, dim=1, largest=False).indices

    def chunked():
        step = _chunks(len(x), len(y))
        return torch.cat([block(x[k:k + step]) for k in range(0, len(x), step)])

    peers = {"lazymat": lambda: lm.Vi(x).sqdist(lm.Vj(y)).argKmin(10, dim=1),
             "torch chunked": chunked}
    if keops is not None:
        peers["pykeops"] = lambda: keops.Vi(x).sqdist(keops.Vj(y)).argKmin(10, dim=1)
    return peers


WORKLOADS = [  # (name, D, sizes, peers)
    ("Gaussian sum", 3, (10_000, 100_000, 1_000_000), gauss_peers),
    ("gradient of the Gaussian sum", 3, (10_000, 100_000), grad_peers),
    ("LogSumExp", 3, (10_000, 100_000), lse_peers),
    ("k-NN, K = 10", 3, (10_000, 100_000), knn_peers),
    ("k-NN, K = 10", 64, (10_000, 100_000), knn_peers),
]
PEERS = ("lazymat", "pykeops", "torch dense", "torch chunked", "torch.compile")


def _pykeops_problem() -> str | None:
    """None when pykeops runs a small reduction on the GPU; else what went wrong. Tried in a
    subprocess first: a pykeops that crashes (e.g. with a CUDA newer than it knows) must not
    take the benchmark down with it."""
    import subprocess

    code = ("import torch, pykeops.torch as k; x = torch.rand(1000, 3, device='cuda'); "
            "print(float((-k.Vi(x).sqdist(k.Vj(x))).exp().sum(1).sum()))")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired:
        return "a first reduction took more than 300 s"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return f"exit status {done.returncode}: " + " / ".join(tail)
    return None


def block_sizes(torch, lm) -> None:
    """Gaussian sum time against the CUDA kernel's threads per block (rows per task)."""
    from lazymat.codegen import cuda

    print("\n| threads per block | " + " | ".join(f"N = {n:,}" for n in (10**4, 10**5, 10**6))
          + " |\n|---|---|---|---|")
    default = cuda.BLOCK
    for block in (32, 64, 128, 256):
        cuda.BLOCK = block
        cells = []
        for n in (10**4, 10**5, 10**6):
            x = torch.rand(n, 3, device="cuda")
            b = torch.randn(n, 1, device="cuda")
            fn = lambda: ((-lm.Vi(x).sqdist(lm.Vj(x)) * 50).exp() * lm.Vj(b)).sum(1)  # noqa
            cells.append(f"{_timed(fn, torch, 3)[1] * 1e3:.2f} ms")
        print(f"| {block} | " + " | ".join(cells) + " |", flush=True)
    cuda.BLOCK = default


def tensor_core_cases(torch, lm, n: int):
    """(name, D, function of the inputs) of the ``--tensor-cores`` table."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = []
    for D in (64, 128, 256):
        x = torch.rand(n, D, device="cuda", generator=gen)
        y = torch.rand(n, D, device="cuda", generator=gen)
        b = torch.randn(n, 1, device="cuda", generator=gen)
        g = 6.0 / D  # |x - y|^2 is about D / 6 for uniform points: exp(-1) on average
        cases += [
            ("Gaussian sum", D,
             lambda x=x, y=y, b=b, g=g: ((-lm.Vi(x).sqdist(lm.Vj(y)) * g).exp()
                                         * lm.Vj(b)).sum(1)),
            ("LogSumExp", D, lambda x=x, y=y, g=g: (-lm.Vi(x).sqdist(lm.Vj(y)) * g)
             .logsumexp(1)),
            ("k-NN, K = 10", D, lambda x=x, y=y: lm.Vi(x).sqdist(lm.Vj(y)).argKmin(10, dim=1)),
        ]
    x = torch.rand(n, 64, device="cuda", generator=gen)
    for E in (64, 256, 1024):
        B = torch.randn(n, E, device="cuda", generator=gen)
        cases.append((f"K @ B, B of {E} columns", 64,
                      lambda x=x, B=B: ((-lm.Vi(x).sqdist(lm.Vj(x)) * (6.0 / 64)).exp()
                                        * lm.Vj(B)).sum(1)))
    return cases


def tensor_cores(quick: bool = False) -> None:
    """The ``--tensor-cores`` table (see the module docstring)."""
    import os

    import torch

    import lazymat as lm

    n = 10_000 if quick else 100_000
    modes = ("off", "tf32", "3xtf32")
    print(f"\nTensor cores on {torch.cuda.get_device_name(0)}, float32, M = N = {n:,}; "
          "median of 5 calls after a warm-up; in brackets: difference from 'off'\n")
    print("| workload | D | " + " | ".join(modes) + " | speed-up tf32 | speed-up 3xtf32 |")
    print("|---|---|" + "---|" * (len(modes) + 2))
    before = os.environ.get("LAZYMAT_TENSOR_CORES")
    try:
        for name, D, fn in tensor_core_cases(torch, lm, n):
            times, outs, cells = {}, {}, []
            for mode in modes:
                os.environ["LAZYMAT_TENSOR_CORES"] = mode
                try:
                    times[mode] = _timed(fn, torch, repeat=5)[1]
                    outs[mode] = fn()
                except Exception as e:  # noqa: BLE001 - report, go on with the others
                    cells.append(f"error: {type(e).__name__}: {str(e)[:60]}")
                    continue
                diff = ""
                if mode != "off" and "off" in outs:
                    a, b = outs[mode], outs["off"]
                    if a.dtype == torch.int64:
                        diff = f" [{(a != b).double().mean().item():.1e} of indices]"
                    else:
                        diff = (f" [{((a - b).abs().max() / b.abs().max()).item():.1e}]")
                cells.append(f"{times[mode] * 1e3:.2f} ms{diff}")
            ratios = [f"{times['off'] / times[m]:.1f}×" if "off" in times and m in times
                      else "-" for m in modes[1:]]
            print(f"| {name} | {D} | " + " | ".join(cells) + " | " + " | ".join(ratios)
                  + " |", flush=True)
            del outs
            torch.cuda.empty_cache()
    finally:
        if before is None:
            os.environ.pop("LAZYMAT_TENSOR_CORES", None)
        else:
            os.environ["LAZYMAT_TENSOR_CORES"] = before


def main(quick: bool = False, use_pykeops: bool = True, use_compile: bool = True) -> None:
    import torch

    import lazymat as lm

    keops = None
    if use_pykeops:
        problem = _pykeops_problem()
        if problem is None:
            import pykeops.torch as keops
        else:
            print(f"(pykeops left out: {problem})")
    device = torch.device("cuda")
    print(f"\nGPU benchmarks on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"float32; median of 5 calls after a warm-up; 'first' = first call (compiles)\n")
    print("| workload | N | " + " | ".join(PEERS) + " | lazymat first | pykeops first | "
          "lazymat speed-up |")
    print("|---|---|" + "---|" * (len(PEERS) + 3))
    for name, D, sizes, make in WORKLOADS:
        previous: dict[str, float] = {}
        for n in sizes[:2] if quick else sizes:
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.rand(n, D, device=device, generator=gen)
            y = torch.rand(n, D, device=device, generator=gen)
            b = torch.randn(n, 1, device=device, generator=gen)
            c = torch.randn(n, 1, device=device, generator=gen)
            peers = make(torch, lm, keops, x, y, b, c)
            if not use_compile:
                peers.pop("torch.compile", None)
            cells, firsts = {}, {}
            for peer, fn in peers.items():
                guess = previous.get(peer, 0) * 100  # sizes grow tenfold: pairs hundredfold
                if peer == "torch dense" and n * n * 4 > DENSE_BYTES:
                    cells[peer] = f"({n * n * 4 / 1e9:.0f} GB)"
                    continue
                if guess > BUDGET_S:
                    cells[peer] = f"skipped (~{guess:.0f} s)"
                    continue
                try:
                    first, median = _timed(fn, torch, repeat=3 if n >= 1_000_000 else 5)
                except Exception as e:  # noqa: BLE001 - report, go on with the others
                    cells[peer] = f"error: {type(e).__name__}: {str(e)[:60]}"
                    torch.cuda.empty_cache()
                    continue
                previous[peer] = median
                firsts[peer] = first
                cells[peer] = f"{median * 1e3:.2f} ms"
            ours = previous.get("lazymat") if "lazymat" in firsts else None
            ratios = [f"{p}: {previous[p] / ours:.1f}×" for p in PEERS[1:]
                      if ours and p in firsts and p in previous]
            print(f"| {name}, D = {D} | {n:,} | "
                  + " | ".join(cells.get(p, "-") for p in PEERS)
                  + f" | {firsts.get('lazymat', 0):.2f} s | "
                  + (f"{firsts['pykeops']:.2f} s" if "pykeops" in firsts else "-")
                  + f" | {', '.join(ratios)} |", flush=True)
            del x, y, b, c, peers
            torch.cuda.empty_cache()


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--blocks" in args:
        import torch

        import lazymat

        block_sizes(torch, lazymat)
    if "--tensor-cores" in args:
        tensor_cores(quick="--quick" in args)
        sys.exit(0)
    main(quick="--quick" in args, use_pykeops="--no-pykeops" not in args,
         use_compile="--no-compile" not in args)
