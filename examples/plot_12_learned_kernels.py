"""
Learned formulas: an anisotropic kernel and a tiny MLP inside F
================================================================

A formula's parameters can be learned like any torch weight: the reductions are
differentiable in them, and their backward passes are lazymat reductions too, so nothing of
size M × N is ever stored — not in the forward pass, not in autograd's graph.

1. **Anisotropic kernel.** A Nadaraya–Watson regressor
   :math:`\\hat t(x) = \\sum_j w_j(x) t_j` with the softmax weights of
   :math:`-(x - y_j)^\\top A (x - y_j)` (a ``SumSoftMaxWeight`` reduction of
   ``weightedsqdist`` with the full D × D matrix :math:`A = L L^\\top`) learns *which
   directions matter*: the target depends on two of six input directions, and gradient
   descent on the validation error finds them.
2. **A neural network as the formula.** A point convolution
   :math:`a_i = \\sum_j \\mathrm{MLP}_\\theta(x_i - y_j)\\, f_j` whose filter is a
   2 → 16 → 1 ReLU network written with LazyTensor ops (``matvecmult``, ``relu``, ``|``); its
   weights are fitted to recover an unknown filter from input/output pairs.

Both are checked against dense torch (values and gradients), and one training step is timed
against dense torch autograd.
"""

# %%
# Setup
# -----
import torch
from _gallery import header, median_time, print_table, save_figure, sized

import lazymat as lm

header("Learned formulas: anisotropic kernel and an MLP filter (float32, torch autograd)")
torch.manual_seed(0)
D = 6

# %%
# 1. The anisotropic kernel
# -------------------------
# The target varies along two directions u, v of R⁶ only; the other four are noise to ignore.
directions = torch.linalg.qr(torch.randn(D, D))[0][:, :2]


def target(x):
    p = x @ directions.to(x.dtype)
    return torch.sin(2 * p[:, :1]) + 0.5 * p[:, 1:] ** 2


def data(n):
    x = torch.randn(n, D)
    return x, target(x) + 0.05 * torch.randn(n, 1)


def nadaraya_watson(x, x_train, t_train, L):
    """sum_j softmax_j(-(x - y_j)^T A (x - y_j)) t_j with A = L L^T (lazymat)."""
    A = (L @ L.T).reshape(-1)
    return (-lm.Vi(x).weightedsqdist(lm.Vj(x_train), lm.Pm(A))).sumsoftmaxweight(
        lm.Vj(t_train), dim=1)


def nadaraya_watson_dense(x, x_train, t_train, L):
    d = x[:, None, :] - x_train[None, :, :]
    q = torch.einsum("ijd,de,ije->ij", d, L @ L.T, d)
    return torch.softmax(-q, 1) @ t_train


n_train, n_val = sized(small=(400, 200), full=(8000, 2000))
x_train, t_train = data(n_train)
x_val, t_val = data(n_val)

# Correctness: values and the gradient in L against dense torch (float64).
L = (0.5 * torch.eye(D) + 0.1 * torch.randn(D, D)).double().requires_grad_(True)
xs, xt, tt = x_val[:100].double(), x_train[:300].double(), t_train[:300].double()
ours = nadaraya_watson(xs, xt, tt, L)
(g_ours,) = torch.autograd.grad(((ours - target(xs)) ** 2).mean(), L)
dense = nadaraya_watson_dense(xs, xt, tt, L)
(g_dense,) = torch.autograd.grad(((dense - target(xs)) ** 2).mean(), L)
assert torch.allclose(ours, dense, rtol=1e-8, atol=1e-10), "kernel regression values differ"
assert torch.allclose(g_ours, g_dense, rtol=1e-6, atol=1e-10), "gradients in A differ"


def train_metric(steps, predict):
    L = (0.5 * torch.eye(D)).requires_grad_(True)
    optimizer = torch.optim.Adam([L], lr=0.05)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((predict(x_val, x_train, t_train, L) - t_val) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return L.detach(), losses


def one_step(predict):
    L = (0.5 * torch.eye(D)).requires_grad_(True)
    ((predict(x_val, x_train, t_train, L) - t_val) ** 2).mean().backward()
    return L.grad


t_ours, _ = median_time(lambda: one_step(nadaraya_watson), repeat=sized(1, 3))
t_dense, _ = median_time(lambda: one_step(nadaraya_watson_dense), repeat=1)  # seconds a step
L_learned, losses_A = train_metric(sized(8, 120), nadaraya_watson)
A = L_learned @ L_learned.T
eigenvalues, eigenvectors = torch.linalg.eigh(A)
# How much of the two strongest directions of A lies in span(u, v): 1 = all of it.
captured = float((directions.T @ eigenvectors[:, -2:]).pow(2).sum() / 2)
if not sized(True, False):
    assert losses_A[-1] < 0.5 * losses_A[0], "training the metric did not lower the error"
    assert captured > 0.8, f"the learned metric misses the relevant directions ({captured:.2f})"
print_table(f"Anisotropic Nadaraya-Watson, one training step (forward + backward in A), "
            f"{n_val:,} x {n_train:,} pairs, D = {D}", [
                {"method": "lazymat SumSoftMaxWeight + autograd", "seconds": t_ours,
                 "check": "values 1e-8, grad 1e-6 vs dense"},
                {"method": "dense torch (einsum + softmax)", "seconds": t_dense,
                 "check": "reference"}])
print(f"  validation MSE {losses_A[0]:.4f} -> {losses_A[-1]:.4f}; the two strongest "
      f"eigenvectors of A hold {captured:.0%} of the relevant plane")

# %%
# 2. A tiny MLP as the formula
# ----------------------------
H = 16


def init_mlp():
    torch.manual_seed(1)
    # A small last layer: the initial filter is near 0, so the first loss is the data's scale.
    return [(torch.randn(H, 2) * 2).requires_grad_(True),
            (torch.rand(H) * 2 - 1).requires_grad_(True),
            (torch.randn(H) * 0.01).requires_grad_(True), torch.zeros(1).requires_grad_(True)]


def mlp_conv(x, y, f, params):
    """a_i = sum_j MLP(x_i - y_j) f_j, the MLP written with LazyTensor ops (lazymat)."""
    W1, b1, w2, b2 = params
    d = lm.Vi(x) - lm.Vj(y)                                   # (2,) per pair
    hidden = (lm.Pm(W1.reshape(-1)).matvecmult(d) + lm.Pm(b1)).relu()   # (H,) per pair
    return (((hidden | lm.Pm(w2)) + lm.Pm(b2)) * lm.Vj(f)).sum(dim=1)


def mlp_conv_dense(x, y, f, params):
    W1, b1, w2, b2 = params
    d = x[:, None, :] - y[None, :, :]
    return (torch.relu(d @ W1.T + b1) @ w2 + b2) @ f


def true_filter(d):
    """The filter to recover: a Gabor-like bump."""
    return torch.exp(-(d**2).sum(-1) / 0.5) * torch.cos(3 * d[..., 0])


n = sized(small=200, full=2000)
x, y = torch.rand(n, 2) * 4 - 2, torch.rand(n, 2) * 4 - 2
f = torch.randn(n, 1)
observed = true_filter(x[:, None] - y[None]) @ f            # small enough to build densely once

params = init_mlp()
xs, ys, fs = x[:150].double(), y[:170].double(), f[:170].double()
p64 = [p.detach().double().requires_grad_(True) for p in params]
ours = mlp_conv(xs, ys, fs, p64)
g_ours = torch.autograd.grad(ours.pow(2).sum(), p64)
dense = mlp_conv_dense(xs, ys, fs, p64)
g_dense = torch.autograd.grad(dense.pow(2).sum(), p64)
assert torch.allclose(ours, dense, rtol=1e-9, atol=1e-9), "MLP formula differs from dense"
for a, b in zip(g_ours, g_dense):
    assert torch.allclose(a, b, rtol=1e-7, atol=1e-8), "MLP gradients differ from dense"


def train_mlp(steps, conv):
    params = init_mlp()
    optimizer = torch.optim.Adam(params, lr=0.02)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((conv(x, y, f, params) - observed) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return params, losses


def mlp_step(conv):
    params = init_mlp()
    ((conv(x, y, f, params) - observed) ** 2).mean().backward()
    return params[0].grad


t_ours, _ = median_time(lambda: mlp_step(mlp_conv), repeat=sized(1, 3))
t_dense, _ = median_time(lambda: mlp_step(mlp_conv_dense), repeat=1)  # seconds a step
learned, losses_mlp = train_mlp(sized(5, 150), mlp_conv)
if not sized(True, False):
    assert losses_mlp[-1] < 0.5 * losses_mlp[0], "training the MLP filter did not lower the error"
print_table(f"MLP filter convolution, one training step (forward + backward in 4 weight "
            f"tensors), {n:,} x {n:,} pairs, 2 -> {H} -> 1", [
                {"method": "lazymat (formula of LazyTensor ops)", "seconds": t_ours,
                 "check": "values 1e-9, grads 1e-7 vs dense"},
                {"method": "dense torch (M x N x H activations)", "seconds": t_dense,
                 "check": "reference"}])
grid = torch.stack(torch.meshgrid(torch.linspace(-2, 2, 81), torch.linspace(-2, 2, 81),
                                  indexing="xy"), -1)
with torch.no_grad():
    W1, b1, w2, b2 = learned
    filt = torch.relu(grid @ W1.T + b1) @ w2 + b2
# The observations fix the filter only through its convolutions with f: a 16-unit ReLU
# network fits them well long before it matches the filter everywhere.
print(f"  training MSE {losses_mlp[0]:.4f} -> {losses_mlp[-1]:.4f}; learned filter vs the "
      f"true one: max |diff| {float((filt - true_filter(grid)).abs().max()):.2f} (peak 1)")

# %%
# What was learned
# ----------------
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, 4, figsize=(17, 4))
P = directions @ directions.T
axes[0].imshow(P, cmap="RdBu_r", vmin=-1, vmax=1)
axes[0].set_title("projector on the relevant plane")
axes[1].imshow(A / A.abs().max(), cmap="RdBu_r", vmin=-1, vmax=1)
axes[1].set_title("learned A (scaled)")
axes[2].imshow(true_filter(grid), extent=(-2, 2, -2, 2), cmap="RdBu_r", vmin=-1, vmax=1)
axes[2].set_title("true filter")
axes[3].imshow(filt, extent=(-2, 2, -2, 2), cmap="RdBu_r", vmin=-1, vmax=1)
axes[3].set_title(f"learned MLP filter ({len(losses_mlp)} Adam steps)")
fig.tight_layout()
save_figure(fig, "learned")
