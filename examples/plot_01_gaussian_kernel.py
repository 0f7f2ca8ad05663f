r"""
Gaussian kernel product and its gradient
========================================

The Gaussian kernel product :math:`a_i = \sum_j \exp(-\|x_i - y_j\|^2 / 2\sigma^2)\, b_j`
is the workhorse of kernel methods (kernel density estimates, RBF interpolation, MMD losses,
the gradient of a smoothed point-set energy). Written with dense torch it stores the M×N
kernel matrix (and the M×N×D differences of its broadcast form) and its backward pass stores
them again; lazymat streams over the symbolic matrix and stores nothing of size M×N.

We compute :math:`a` and :math:`\nabla_x \sum_i a_i` (the force that moves each point x_i)
three ways, with the same float32 torch tensors:

- **lazymat**: ``(-Vi(x).sqdist(Vj(y)) / (2σ²)).exp() @ b``, differentiated by torch autograd;
- **dense torch**: the kernel matrix ``torch.cdist(x, y)**2`` then ``exp`` then a matrix product;
- **torch.compile** of the broadcast form ``exp(-((x[:, None] - y[None]) ** 2).sum(-1)) ...``
  (inductor may fuse the whole expression into one loop).

and compare time (medians) and the peak memory each needs, as N grows.
"""

# %%
# Setup: points on a noisy spiral in 3-D, a weight per target point.

import numpy as np
import torch
from _gallery import (SMALL, check_close, format_bytes, header, median_time, peak_memory,
                      print_table, save_figure, sized)

import lazymat as lm

header("Gaussian kernel product and its gradient (float32, D = 3)")
torch.manual_seed(0)
D, SIGMA = 3, 0.25
SIZES = sized(small=[300, 1000], full=[1000, 3000, 10_000, 30_000])
DENSE_MAX = 10_000  # above this the dense forms need several GiB: lazymat only


def spiral(n: int) -> torch.Tensor:
    t = torch.rand(n, 1) * 4 * np.pi
    return torch.cat([torch.cos(t), torch.sin(t), t / (2 * np.pi)], 1) + 0.05 * torch.randn(n, D)


# %%
# The three implementations. Each returns the kernel product and the gradient of its sum with
# respect to x.


def with_lazymat(x, y, b):
    x = x.detach().requires_grad_(True)
    a = (-lm.Vi(x).sqdist(lm.Vj(y)) / (2 * SIGMA**2)).exp() @ b
    (g,) = torch.autograd.grad(a.sum(), x)
    return a.detach(), g


def with_dense_torch(x, y, b):
    x = x.detach().requires_grad_(True)
    a = torch.exp(-torch.cdist(x, y) ** 2 / (2 * SIGMA**2)) @ b
    (g,) = torch.autograd.grad(a.sum(), x)
    return a.detach(), g


def broadcast_form(x, y, b):
    d2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    return (torch.exp(-d2 / (2 * SIGMA**2)) * b[None, :, 0]).sum(1, keepdim=True)


compiled_form = None if SMALL else torch.compile(broadcast_form)  # compiling takes ~20 s on CPU


def with_torch_compile(x, y, b):
    x = x.detach().requires_grad_(True)
    a = compiled_form(x, y, b)
    (g,) = torch.autograd.grad(a.sum(), x)
    return a.detach(), g


# %%
# Correctness: lazymat against the dense computation in float64 (value and gradient).

n_check = sized(small=500, full=3000)
x, y, b = spiral(n_check), spiral(n_check), torch.rand(n_check, 1)
a_lm, g_lm = with_lazymat(x, y, b)
a_ref, g_ref = with_dense_torch(x.double(), y.double(), b.double())
check_close(a_lm, a_ref, 1e-4, "kernel product vs dense float64")
check_close(g_lm, g_ref, 1e-4, "gradient vs dense float64")
if compiled_form is not None:
    a_c, g_c = with_torch_compile(x, y, b)
    check_close(a_c, a_ref, 1e-4, "torch.compile value vs dense float64")

# %%
# Time and memory as M = N grows. Each time is the median of a few runs of value + gradient;
# memory is the peak growth of the process's resident memory during one call.

rows, curves = [], {"lazymat": [], "dense torch": [], "torch.compile": []}
methods = [("lazymat", with_lazymat), ("dense torch", with_dense_torch)]
if compiled_form is not None:
    methods.append(("torch.compile", with_torch_compile))
for n in SIZES:
    x, y, b = spiral(n), spiral(n), torch.rand(n, 1)
    for name, fn in methods:
        if name != "lazymat" and n > DENSE_MAX:
            # as measured at N = 10⁴: five N×N float32 matrices for dense torch (distances,
            # kernel, their gradients), one for torch.compile (saved for the backward)
            need = n * n * 4 * (5 if name == "dense torch" else 1)
            rows.append({"case": f"N={n}", "method": name, "seconds": None,
                         "peak memory": "needs ~" + format_bytes(need)})
            curves[name].append(np.nan)
            continue
        seconds, _ = median_time(lambda: fn(x, y, b), repeat=sized(1, 3 if n <= DENSE_MAX else 1))
        memory, _ = peak_memory(lambda: fn(x, y, b))
        rows.append({"case": f"N={n}", "method": name, "seconds": seconds,
                     "peak memory": format_bytes(memory),
                     "pairs/s": f"{n * n / seconds / 1e9:.3g} G"})
        curves[name].append(seconds)
print_table("Gaussian kernel product + gradient, M = N, D = 3, float32 "
            "(ratios to lazymat at the same N)", rows)

# %%
# The picture: time against N. The dense forms stop at N = 10⁴ (the next size would need
# tens of GiB); lazymat's time grows as N² with no memory cost.

import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(6, 4))
for name, ts in curves.items():
    if ts and not all(np.isnan(ts)):
        ax.loglog(SIZES, ts, "o-", label=name)
ax.set_xlabel("M = N (points)")
ax.set_ylabel("value + gradient (s, median)")
ax.set_title("Gaussian kernel product and gradient, D = 3")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
save_figure(fig, "timings")
