"""lazymat inside compiled models: JAX-jit vs torch on the same reduction (CPU).

``python -m benchmarks.integration [--full]``: the Gaussian kernel sum
a = exp(-|x_i - y_j|²/2) @ b, D = 3, float32, and its gradient (of sum(a²) in x, y, b):

- lazymat.jax under ``jax.jit`` (the kernel called through XLA FFI),
- lazymat on torch tensors (eager: the same compiled kernel through ctypes),
- the dense peers of the same run: ``jax.jit`` of the broadcast formula (XLA fuses it,
  but materializes the M×N matrix) and eager torch,
- the per-call cost at M = N = 100 (what dispatch and launch cost, not the kernel).

Then the torch.compile rows (``--torch`` runs only these, without JAX):

- a log-domain Sinkhorn loop (LogSumExp reductions, 10 iterations, eps = 0.1) on lazymat,
  eager vs ``torch.compile(fullgraph=True, dynamic=True)`` (inductor) in the same run, and
  the one-time compile cost;
- the per-call cost of the ``lazymat::reduce`` custom op at M = N = 100 against the direct
  eager path that calls without it.
"""

from __future__ import annotations

import sys

import numpy as np

from .timing import median_time


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 3)).astype(np.float32),
            rng.standard_normal((n, 3)).astype(np.float32),
            rng.random((n, 1)).astype(np.float32))


def main(full: bool = False) -> None:
    import jax
    import jax.numpy as jnp
    import torch

    import lazymat as lm
    import lazymat.jax as lj
    from lazymat.backends.launch import num_threads

    def lj_forward(x, y, b):
        return ((-lj.Vi(x).sqdist(lj.Vj(y)) / 2).exp() * lj.Vj(b)).sum(dim=1)

    def lj_loss(x, y, b):
        return (lj_forward(x, y, b) ** 2).sum()

    def dense_jax(x, y, b):
        return jnp.exp(-((x[:, None] - y[None]) ** 2).sum(-1) / 2) @ b

    def lm_torch(x, y, b):
        return ((-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp() * lm.Vj(b)).sum(dim=1)

    def dense_torch(x, y, b):
        return torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1) / 2) @ b

    jit_fwd = jax.jit(lj_forward)
    jit_grad = jax.jit(jax.grad(lj_loss, (0, 1, 2)))
    jit_dense = jax.jit(dense_jax)
    print(f"\nGaussian kernel sum, D = 3, float32, CPU, {num_threads()} threads; "
          f"lazymat.jax FFI: {lj.ffi_unavailable_reason() or 'yes'}\n")
    print("| M = N | lazymat.jax jit | lazymat torch | jax.jit dense | torch dense | "
          "lazymat.jax jit grad | lazymat torch grad |")
    print("|---|---|---|---|---|---|---|")
    sizes = (1_000, 10_000, 100_000) if full else (1_000, 10_000)
    for n in sizes:
        x, y, b = _data(n)
        jx, jy, jb = (jnp.asarray(a) for a in (x, y, b))
        tx, ty, tb = (torch.from_numpy(a) for a in (x, y, b))
        repeat = 5 if n <= 10_000 else 3
        row = [median_time(lambda: jit_fwd(jx, jy, jb).block_until_ready(), repeat, True),
               median_time(lambda: lm_torch(tx, ty, tb), repeat, True)]
        dense_ok = n <= 10_000  # the M×N matrix: 40 GB at 1e5
        row.append(median_time(lambda: jit_dense(jx, jy, jb).block_until_ready(), repeat, True)
                   if dense_ok else None)
        row.append(median_time(lambda: dense_torch(tx, ty, tb), repeat, True)
                   if dense_ok else None)
        row.append(median_time(lambda: jax.block_until_ready(jit_grad(jx, jy, jb)), repeat,
                               True))
        gx, gy, gb = (t.clone().requires_grad_(True) for t in (tx, ty, tb))

        def torch_grad():
            a = lm_torch(gx, gy, gb)
            return torch.autograd.grad((a * a).sum(), [gx, gy, gb])

        row.append(median_time(torch_grad, repeat, True))
        cells = " | ".join("—" if t is None else f"{t * 1e3:.2f} ms" for t in row)
        print(f"| {n:,} | {cells} |")

    x, y, b = _data(100)
    jx, jy, jb = (jnp.asarray(a) for a in (x, y, b))
    tx, ty, tb = (torch.from_numpy(a) for a in (x, y, b))
    calls = [("lazymat.jax, jit", lambda: jit_fwd(jx, jy, jb).block_until_ready()),
             ("lazymat.jax, eager (a cached jit per reduction)",
              lambda: lj_forward(jx, jy, jb).block_until_ready()),
             ("lazymat, torch eager", lambda: lm_torch(tx, ty, tb)),
             ("lazymat, numpy", lambda: lm_torch(x, y, b))]
    print("\nPer call at M = N = 100 (median of 200 calls)\n")
    print("| path | µs per call |")
    print("|---|---|")
    for name, fn in calls:
        print(f"| {name} | {median_time(fn, 200, True) * 1e6:.0f} |")


def sinkhorn(x, y, eps: float = 0.1, iters: int = 10):
    """Log-domain Sinkhorn between uniform measures (the dual potentials)."""
    import torch

    import lazymat as lm

    C = lm.Vi(x).sqdist(lm.Vj(y)) / 2
    log_a = -torch.log(torch.tensor(float(x.shape[0])))
    log_b = -torch.log(torch.tensor(float(y.shape[0])))
    f, g = x.new_zeros(x.shape[0], 1), x.new_zeros(y.shape[0], 1)
    for _ in range(iters):
        f = -eps * ((lm.Vj(g) - C) / eps).logsumexp(dim=1) - eps * log_b
        g = -eps * ((lm.Vi(f) - C) / eps).logsumexp(dim=0) - eps * log_a
    return f, g


def torch_compile_rows(full: bool = False) -> None:
    import time

    import torch

    import lazymat as lm
    from lazymat.backends.launch import num_threads
    from lazymat.torch import ops

    compiled = torch.compile(sinkhorn, fullgraph=True, dynamic=True)
    print(f"\nLog-domain Sinkhorn, 10 iterations (20 LogSumExp), D = 3, float32, CPU, "
          f"{num_threads()} threads\n")
    print("| M = N | lazymat eager | lazymat torch.compile | compiled / eager |")
    print("|---|---|---|---|")
    start = time.perf_counter()
    x, y, _ = (torch.from_numpy(a) for a in _data(200))
    compiled(x, y)
    compile_s = time.perf_counter() - start
    for n in (1_000, 10_000, 100_000) if full else (1_000, 10_000):
        x, y, _ = (torch.from_numpy(a) for a in _data(n))
        repeat = 5 if n <= 10_000 else 3
        eager_t = median_time(lambda: sinkhorn(x, y), repeat, True)
        compiled_t = median_time(lambda: compiled(x, y), repeat, True)
        print(f"| {n:,} | {eager_t * 1e3:.2f} ms | {compiled_t * 1e3:.2f} ms | "
              f"{compiled_t / eager_t:.2f} |")
    print(f"\nFirst compiled call (Dynamo + inductor, once for every N): {compile_s:.1f} s")

    x, y, b = (torch.from_numpy(a) for a in _data(100))
    F, arrays = ((-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp() * lm.Vj(b)).bound()
    req = lm.plan.Request("Sum", F, axis=1)
    key = ops.register(req, ["x", "y", "b"], "auto")
    gauss = torch.compile(lambda x, y, b: ((-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp()
                                           * lm.Vj(b)).sum(dim=1), fullgraph=True,
                          backend="eager")
    calls = [("LazyTensor, eager (direct path)",
              lambda: ((-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp() * lm.Vj(b)).sum(dim=1)),
             ("plan.run of the bound request (what the op runs)",
              lambda: lm.plan.run(req, arrays)),
             ("torch.ops.lazymat.reduce, eager dispatch", lambda: ops.call(key, arrays)),
             ("torch.compile'd LazyTensor function (Dynamo graph)", lambda: gauss(x, y, b))]
    print("\nPer call at M = N = 100, Gaussian kernel sum (median of 200 calls)\n")
    print("| path | µs per call |")
    print("|---|---|")
    for name, fn in calls:
        print(f"| {name} | {median_time(fn, 200, True) * 1e6:.0f} |")


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--torch" not in args:
        main(full="--full" in args)
    torch_compile_rows(full="--full" in args)
