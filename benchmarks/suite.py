"""The workloads of the CPU benchmark suite, each against the peers that are installed.

``python -m benchmarks.suite [--full] [--only NAME ...]`` prints one Markdown
table per workload (median wall time, G pairs/s, and lazymat's speed-up over
the fastest peer measured in the same run), writes ``results/<name>.png``
(time against N, log-log, one line per library) and ``results/latest.md``.

A peer whose predicted time (from its time at the previous size) exceeds the
budget is marked "skipped (~T s)", never silently dropped; a peer that is not
installed is listed as such.
"""

from __future__ import annotations

import importlib
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import lazymat as lm

RESULTS = Path(__file__).parent / "results"
BUDGET_S = 30.0


def _try_import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a peer that fails to import is "not installed"
        return None


torch = _try_import("torch")
faiss = _try_import("faiss")
sklearn_neighbors = _try_import("sklearn.neighbors")
pykeops_numpy = None
if _try_import("pykeops") is not None:
    try:
        from pykeops.numpy import LazyTensor as KeOpsLazyTensor

        pykeops_numpy = KeOpsLazyTensor
    except Exception:  # noqa: BLE001
        pykeops_numpy = None


@dataclass
class Workload:
    name: str
    title: str
    sizes: list[tuple[int, int]]
    data: Callable[[int, int], dict]
    peers: dict[str, Callable[[dict], Any] | None] = field(default_factory=dict)


# ---------------------------------------------------------------------- data

def _points(M: int, N: int, D: int, scale: float = 1.0, E: int = 1) -> dict:
    rng = np.random.default_rng(0)
    d = {"x": (scale * rng.standard_normal((M, D))).astype(np.float32),
         "y": (scale * rng.standard_normal((N, D))).astype(np.float32),
         "b": rng.random((N, E)).astype(np.float32)}
    if torch is not None:
        d.update({f"t{k}": torch.from_numpy(v) for k, v in list(d.items())})
    return d


def _chunks(M: int, N: int) -> int:
    return max(1, min(M, (64 * 2**20) // (4 * N)))  # ~64 MB dense blocks


# ---------------------------------------------------------------------- Gaussian sums

def lm_gauss(d):
    return (-lm.Vi(d["x"]).sqdist(lm.Vj(d["y"])) / 2).exp() @ d["b"]


def torch_gauss(d):
    x, y, b = d["tx"], d["ty"], d["tb"]
    y2, out, rows = (y * y).sum(1), [], _chunks(len(x), len(y))
    for i0 in range(0, len(x), rows):
        xs = x[i0:i0 + rows]
        dist = ((xs * xs).sum(1)[:, None] + y2[None] - 2 * xs @ y.T).clamp_min(0)
        out.append(torch.exp(-dist / 2) @ b)
    return torch.cat(out)


def numpy_gauss(d):
    x, y, b = d["x"], d["y"], d["b"]
    y2, out, rows = (y * y).sum(1), [], _chunks(len(x), len(y))
    for i0 in range(0, len(x), rows):
        xs = x[i0:i0 + rows]
        dist = np.maximum((xs * xs).sum(1)[:, None] + y2[None] - 2 * xs @ y.T, 0)
        out.append(np.exp(-dist / 2) @ b)
    return np.concatenate(out)


def keops_gauss(d):
    K = (-pykeops_numpy(d["x"][:, None, :]).sqdist(pykeops_numpy(d["y"][None, :, :])) / 2).exp()
    return K @ d["b"]


def lm_gauss_grad(d):
    x = d["tx"].clone().requires_grad_(True)
    a = (-lm.Vi(x).sqdist(lm.Vj(d["ty"])) / 2).exp() @ d["tb"]
    return torch.autograd.grad(a.sum(), [x])


def torch_gauss_grad(d):
    x = d["tx"].clone().requires_grad_(True)
    return torch.autograd.grad(torch_gauss({**d, "tx": x}).sum(), [x])


# ---------------------------------------------------------------------- LogSumExp

def lm_lse(d):
    return (-lm.Vi(d["x"]).sqdist(lm.Vj(d["y"]))).logsumexp(dim=1)


def torch_lse(d):
    x, y = d["tx"], d["ty"]
    y2, out, rows = (y * y).sum(1), [], _chunks(len(x), len(y))
    for i0 in range(0, len(x), rows):
        xs = x[i0:i0 + rows]
        dist = ((xs * xs).sum(1)[:, None] + y2[None] - 2 * xs @ y.T).clamp_min(0)
        out.append(torch.logsumexp(-dist, 1, keepdim=True))
    return torch.cat(out)


def keops_lse(d):
    D = pykeops_numpy(d["x"][:, None, :]).sqdist(pykeops_numpy(d["y"][None, :, :]))
    return (-D).logsumexp(dim=1)


# ---------------------------------------------------------------------- k-NN

def lm_knn(d):
    return lm.Vi(d["x"]).sqdist(lm.Vj(d["y"])).argKmin(K=10, dim=1)


def faiss_knn(d):
    index = faiss.IndexFlatL2(d["y"].shape[1])
    index.add(d["y"])
    return index.search(d["x"], 10)[1]


def sklearn_brute(d):
    nn = sklearn_neighbors.NearestNeighbors(n_neighbors=10, algorithm="brute").fit(d["y"])
    return nn.kneighbors(d["x"], return_distance=False)


def sklearn_kdtree(d):
    nn = sklearn_neighbors.NearestNeighbors(n_neighbors=10, algorithm="kd_tree").fit(d["y"])
    return nn.kneighbors(d["x"], return_distance=False)


def torch_knn(d):
    x, y = d["tx"], d["ty"]
    out, rows = [], _chunks(len(x), len(y))
    for i0 in range(0, len(x), rows):
        out.append(torch.cdist(x[i0:i0 + rows], y).topk(10, largest=False).indices)
    return torch.cat(out)


def keops_knn(d):
    D = pykeops_numpy(d["x"][:, None, :]).sqdist(pykeops_numpy(d["y"][None, :, :]))
    return D.argKmin(K=10, dim=1)


# ---------------------------------------------------------------------- attention

def _attention_data(M: int, N: int) -> dict:
    d = _points(M, N, 64, scale=1.0 / 8 ** 0.5, E=64)
    d["b"] = np.random.default_rng(1).standard_normal((N, 64)).astype(np.float32)
    if torch is not None:
        d["tb"] = torch.from_numpy(d["b"])
    return d


def lm_attention(d):
    return (lm.Vi(d["x"]) | lm.Vj(d["y"])).sumsoftmaxweight(lm.Vj(d["b"]), dim=1)


def torch_sdpa(d):
    q, k, v = (d[n][None, None] for n in ("tx", "ty", "tb"))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)[0, 0]


def torch_manual_attention(d):
    return torch.softmax(d["tx"] @ d["ty"].T, 1) @ d["tb"]


def keops_attention(d):
    s = pykeops_numpy(d["x"][:, None, :]) | pykeops_numpy(d["y"][None, :, :])
    return s.sumsoftmaxweight(pykeops_numpy(d["b"][None, :, :]), dim=1)


def _peer(fn, module) -> Callable | None:
    return fn if module is not None else None


def workloads(full: bool) -> list[Workload]:
    big = [(100_000, 100_000)] if full else []
    return [
        Workload("gauss3", "Gaussian kernel sum, D = 3", [(1_000, 1_000), (10_000, 10_000)] + big,
                 lambda M, N: _points(M, N, 3),
                 {"lazymat": lm_gauss, "torch (chunked)": _peer(torch_gauss, torch),
                  "numpy (chunked)": numpy_gauss, "pykeops": _peer(keops_gauss, pykeops_numpy)}),
        Workload("gauss3_grad", "Gaussian kernel sum, D = 3, gradient w.r.t. x",
                 [(1_000, 1_000), (10_000, 10_000)] + big, lambda M, N: _points(M, N, 3),
                 {"lazymat": _peer(lm_gauss_grad, torch),
                  "torch autograd (chunked)": _peer(torch_gauss_grad, torch)}),
        Workload("gauss64", "Gaussian kernel sum, D = 64",
                 [(1_000, 1_000), (10_000, 10_000)] + big, lambda M, N: _points(M, N, 64, 0.15),
                 {"lazymat": lm_gauss, "torch (chunked)": _peer(torch_gauss, torch),
                  "numpy (chunked)": numpy_gauss, "pykeops": _peer(keops_gauss, pykeops_numpy)}),
        Workload("lse3", "LogSumExp of -|x_i - y_j|², D = 3",
                 [(1_000, 1_000), (10_000, 10_000)] + big, lambda M, N: _points(M, N, 3),
                 {"lazymat": lm_lse, "torch (chunked)": _peer(torch_lse, torch),
                  "pykeops": _peer(keops_lse, pykeops_numpy)}),
        Workload("knn3", "k-NN, K = 10, D = 3", [(10_000, 10_000), (10_000, 100_000)] + big,
                 lambda M, N: _points(M, N, 3),
                 {"lazymat": lm_knn, "faiss IndexFlatL2": _peer(faiss_knn, faiss),
                  "sklearn brute": _peer(sklearn_brute, sklearn_neighbors),
                  "sklearn kd-tree": _peer(sklearn_kdtree, sklearn_neighbors),
                  "torch cdist+topk": _peer(torch_knn, torch),
                  "pykeops": _peer(keops_knn, pykeops_numpy)}),
        Workload("knn64", "k-NN, K = 10, D = 64", [(1_000, 10_000), (10_000, 100_000)],
                 lambda M, N: _points(M, N, 64),
                 {"lazymat": lm_knn, "faiss IndexFlatL2": _peer(faiss_knn, faiss),
                  "sklearn brute": _peer(sklearn_brute, sklearn_neighbors),
                  "torch cdist+topk": _peer(torch_knn, torch),
                  "pykeops": _peer(keops_knn, pykeops_numpy)}),
        Workload("attention", "SumSoftMaxWeight (attention), D = 64",
                 [(1_000, 1_000), (10_000, 10_000)] + ([(30_000, 30_000)] if full else []),
                 _attention_data,
                 {"lazymat": lm_attention, "torch SDPA": _peer(torch_sdpa, torch),
                  "torch softmax(QKᵀ)V": _peer(torch_manual_attention, torch),
                  "pykeops": _peer(keops_attention, pykeops_numpy)}),
    ]


def measure(fn: Callable, data: dict) -> float:
    """Median wall time: 5 runs under 1 s, 3 under 10 s, else 1 (after one warm-up run)."""
    start = time.perf_counter()
    fn(data)
    first = time.perf_counter() - start
    repeat = 5 if first < 1 else 3 if first < 10 else 0
    times = [first]
    for _ in range(repeat):
        start = time.perf_counter()
        fn(data)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:] if repeat else times)


def run_workload(w: Workload) -> tuple[list[str], dict[str, list[tuple[int, float]]]]:
    lines = [f"\n### {w.title}\n",
             "| M × N | " + " | ".join(w.peers) + " | lazymat vs fastest peer |",
             "|---" * (len(w.peers) + 2) + "|"]
    history: dict[str, list[tuple[int, float]]] = {p: [] for p in w.peers}
    for M, N in w.sizes:
        data = w.data(M, N)
        cells, times = [], {}
        for peer, fn in w.peers.items():
            if fn is None:
                cells.append("not installed")
                continue
            past = history[peer]
            if past:
                (m_n, t) = past[-1]
                predicted = t * (M * N) / m_n
                if predicted > BUDGET_S:
                    cells.append(f"skipped (~{predicted:.0f} s)")
                    continue
            try:
                t = measure(fn, data)
            except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
                cells.append(f"failed: {type(e).__name__}")
                continue
            times[peer] = t
            history[peer].append((M * N, t))
            cells.append(f"{t:.3g} s ({M * N / t / 1e9:.2f})")
        others = [t for p, t in times.items() if p != "lazymat"]
        ratio = (f"{min(others) / times['lazymat']:.1f}×" if others and "lazymat" in times
                 else "–")
        lines.append(f"| {M:,} × {N:,} | " + " | ".join(cells) + f" | {ratio} |")
    lines.append("\nCells: median wall time (G pairs/s). Ratio > 1: lazymat is faster.")
    return lines, history


def plot(w: Workload, history: dict[str, list[tuple[int, float]]]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for peer, points in history.items():
        if points:
            ax.loglog([p for p, _ in points], [t for _, t in points], "o-", label=peer)
    ax.set_xlabel("M × N (pairs)")
    ax.set_ylabel("time (s)")
    ax.set_title(w.title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{w.name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def main(full: bool = False, only: list[str] | None = None) -> None:
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)
    header = [f"## lazymat {lm.__version__} CPU benchmarks",
              f"\n{platform.machine()}, {os.cpu_count()} cores, python "
              f"{sys.version.split()[0]}, numpy {np.__version__}, torch "
              f"{getattr(torch, '__version__', 'not installed')}, float32, "
              f"{time.strftime('%Y-%m-%d')}"]
    print("\n".join(header))
    report = list(header)
    for w in workloads(full):
        if only and w.name not in only:
            continue
        lines, history = run_workload(w)
        path = plot(w, history)
        if path:
            lines.append(f"\n![{w.title}]({Path(path).name})")
        print("\n".join(lines), flush=True)
        report += lines
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.md").write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    args = sys.argv[1:]
    only = [a for a in args if not a.startswith("--")]
    main(full="--full" in args, only=only or None)
