"""The README's lazymat figures for two (or more) source trees, measured in one run.

``python -m benchmarks.revisions OLD_SRC NEW_SRC [--rounds 3]`` runs every figure once per
tree and round, alternating the trees (so that load on this shared machine hits both
alike), each in a fresh subprocess with ``PYTHONPATH=<tree>``, and prints a Markdown table
of the medians and the ratio new / old. A tree is a ``src`` folder holding ``lazymat``
(``git worktree add /tmp/old <rev>`` gives one). Float32, the sizes of the README.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

# Each figure: (name, unit, Python code that prints one number). The code runs after PRELUDE.
PRELUDE = """
import time, statistics, os, tempfile, numpy as np, lazymat as lm
def med(fn, n):
    fn(); ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)
rng = np.random.default_rng(0)
def pts(n, d): return rng.standard_normal((n, d)).astype(np.float32)
"""

FIGURES = [
    ("Gaussian sum D=3, 1e4", "s", """
x, y, b = pts(10**4, 3), pts(10**4, 3), pts(10**4, 1)
print(med(lambda: (-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp() @ b, 7))"""),
    ("Gaussian sum D=3, 1e5", "s", """
x, y, b = pts(10**5, 3), pts(10**5, 3), pts(10**5, 1)
print(med(lambda: (-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp() @ b, 3))"""),
    ("Gaussian sum D=64, 1e4", "s", """
x, y, b = pts(10**4, 64) / 8, pts(10**4, 64) / 8, pts(10**4, 1)
print(med(lambda: (-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp() @ b, 5))"""),
    ("LogSumExp D=3, 1e4", "s", """
x, y = pts(10**4, 3), pts(10**4, 3)
print(med(lambda: (-lm.Vi(x).sqdist(lm.Vj(y))).logsumexp(dim=1), 7))"""),
    ("k-NN K=10 D=3, 1e4 x 1e5", "s", """
x, y = pts(10**4, 3), pts(10**5, 3)
print(med(lambda: lm.Vi(x).sqdist(lm.Vj(y)).argKmin(K=10, dim=1), 5))"""),
    ("k-NN K=10 D=64, 1e4 x 1e5", "s", """
x, y = pts(10**4, 64), pts(10**5, 64)
print(med(lambda: lm.Vi(x).sqdist(lm.Vj(y)).argKmin(K=10, dim=1), 3))"""),
    ("attention D=64, 1e4", "s", """
q, k, v = pts(10**4, 64) / 8, pts(10**4, 64) / 8, pts(10**4, 64)
print(med(lambda: (lm.Vi(q) | lm.Vj(k)).sumsoftmaxweight(lm.Vj(v), dim=1), 5))"""),
    ("ArgMin D=3, 1e4 x 1e5", "s", """
x, y = pts(10**4, 3), pts(10**5, 3)
print(med(lambda: lm.Vi(x).sqdist(lm.Vj(y)).argmin(dim=1), 5))"""),
    ("gradient wrt x, D=3, 1e4", "s", """
import torch
x = torch.from_numpy(pts(10**4, 3)).requires_grad_()
y, b = torch.from_numpy(pts(10**4, 3)), torch.from_numpy(pts(10**4, 1))
def f():
    a = (-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp() @ b
    return torch.autograd.grad(a.sum(), [x])
print(med(f, 5))"""),
    ("cold compile", "s", """
os.environ["LAZYMAT_CACHE_DIR"] = tempfile.mkdtemp()
x, y = pts(10, 3), pts(10, 3)
ts = []
for k in range(5):
    t = time.perf_counter(); (-(lm.Vi(x).sqdist(lm.Vj(y)) * (k + 2))).exp().sum(dim=1)
    ts.append(time.perf_counter() - t)
print(statistics.median(ts))"""),
    ("warm Genred call, 100", "us", """
x, y, b = pts(100, 3), pts(100, 3), pts(100, 1)
g = lm.Genred("Exp(-SqDist(x,y)/IntCst(2))*b", ["x=Vi(3)", "y=Vj(3)", "b=Vj(1)"], axis=1)
print(med(lambda: g(x, y, b), 2000) * 1e6)"""),
    ("warm K.sum(1) on a built LazyTensor, 100", "us", """
x, y = pts(100, 3), pts(100, 3)
K = (-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp()
print(med(lambda: K.sum(dim=1), 2000) * 1e6)"""),
    ("warm LazyTensor built each call, 100", "us", """
x, y, b = pts(100, 3), pts(100, 3), pts(100, 1)
print(med(lambda: (-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp() @ b, 2000) * 1e6)"""),
]


def _measure(tree: str, code: str, cache: str) -> float:
    env = dict(os.environ, PYTHONPATH=tree, LAZYMAT_CACHE_DIR=cache)
    out = subprocess.run([sys.executable, "-c", PRELUDE + code], env=env, capture_output=True,
                         text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: {out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    rounds = 3
    if "--rounds" in argv:
        k = argv.index("--rounds")
        rounds = int(argv[k + 1])
        argv = argv[:k] + argv[k + 2:]
    only = None
    if "--only" in argv:
        k = argv.index("--only")
        only = argv[k + 1]
        argv = argv[:k] + argv[k + 2:]
    trees = argv
    caches = {t: tempfile.mkdtemp(prefix="lazymat-rev-") for t in trees}
    results: dict[str, dict[str, list[float]]] = {}
    for name, unit, code in FIGURES:
        if only and only not in name:
            continue
        results[name] = {t: [] for t in trees}
        for _ in range(rounds):
            for t in trees:
                results[name][t].append(_measure(t, code, caches[t]))
        row = [statistics.median(results[name][t]) for t in trees]
        scale = 1.0 if unit == "us" else 1e3
        shown = " | ".join(f"{v * scale:.3g}" for v in row)
        ratio = f"{row[-1] / row[0]:.2f}" if len(row) > 1 else ""
        print(f"| {name} ({'µs' if unit == 'us' else 'ms'}) | {shown} | {ratio} |", flush=True)
    print(json.dumps({n: {t: v for t, v in r.items()} for n, r in results.items()}))


if __name__ == "__main__":
    trees = [a for a in sys.argv[1:] if not a.startswith("-") and not a.isdigit()]
    print("| figure | " + " | ".join(trees) + " | new/old |")
    main(sys.argv[1:])
