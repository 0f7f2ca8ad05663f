"""Forward + backward of the Gaussian kernel sum against the forward alone and torch autograd.

``python -m benchmarks.autodiff [--full]``: D = 3, float32, gradient of
sum(a²) with a = exp(-|x_i - y_j|²/2) @ b, with respect to x, y and b.
Target (issue 17): forward + backward ≤ 2.2× forward at M = N = 10⁵ (issue 3's was 3×).
Two passes over the pairs are the floor (the backward over i needs the output's gradient):
the forward with Σ_j e b y for ∂x, then Σ_i g e and Σ_i g e x for ∂y and ∂b
(``autograd.FACTOR_SUMS``), each a little more than a plain forward.
"""

from __future__ import annotations

import sys

import torch

import lazymat as lm

from .timing import median_time


def lazymat_forward(x, y, b):
    return (-lm.Vi(x).sqdist(lm.Vj(y)) / 2).exp() @ b


def lazymat_backward(x, y, b):
    a = lazymat_forward(x, y, b)
    return torch.autograd.grad((a * a).sum(), [x, y, b])


def torch_backward(x, y, b, rows: int = 2048):
    """Dense torch autograd, by blocks of rows so that memory stays bounded."""
    grads = [torch.zeros_like(t) for t in (x, y, b)]
    for i0 in range(0, x.shape[0], rows):
        xs = x[i0:i0 + rows]
        d = ((xs[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        a = torch.exp(-d / 2) @ b
        for g, t in zip(grads, torch.autograd.grad((a * a).sum(), [x, y, b])):
            g += t
    return grads


def main(full: bool = False) -> None:
    print("\nGaussian kernel sum, D = 3, float32: forward vs forward + backward (x, y, b)\n")
    print("| M = N | lazymat fwd | lazymat fwd+bwd | ratio | torch autograd (dense blocks) | "
          "lazymat speed-up |")
    print("|---|---|---|---|---|---|")
    sizes = (10_000, 100_000) if full else (10_000,)
    for n in sizes:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
        b = torch.rand(n, 1, generator=g)
        for t in (x, y, b):
            t.requires_grad_(True)
        lazymat_backward(x, y, b)  # compile
        repeat = 5 if n <= 10_000 else 3  # (the 10⁵ ratio swings 2.0-3.2× from one run to the next)
        t_fwd = median_time(lambda: lazymat_forward(x.detach(), y.detach(), b.detach()), repeat)
        t_all = median_time(lambda: lazymat_backward(x, y, b), repeat)
        t_torch = median_time(lambda: torch_backward(x, y, b), 1) if n <= 10_000 else None
        torch_cell = f"{t_torch:.2f} s" if t_torch else "not run (~15 min)"
        speed = f"{t_torch / t_all:.0f}×" if t_torch else "–"
        print(f"| {n:,} | {t_fwd:.3f} s | {t_all:.3f} s | {t_all / t_fwd:.2f}× | {torch_cell} | "
              f"{speed} |")
    if not full:
        print("| 100,000 | not run (--full: ~30 s) | | | | |")


if __name__ == "__main__":
    main(full="--full" in sys.argv[1:])
