"""
Inside compiled models: torch.compile and jax.jit
=================================================

A lazymat reduction is one operation of a compiled program. Under ``torch.compile`` every
reduction is one custom op, ``lazymat::reduce``, with its shape, autograd and vmap rules, so
a model that builds LazyTensors in its ``forward`` compiles with ``fullgraph=True`` and no
graph break; under ``jax.jit`` every reduction is one JAX primitive that lowers to an XLA
custom call of the compiled kernel, differentiable to any order.

Two training problems, each checked against the dense formula and timed against the dense
formula compiled by the same tool (the peer a user of ``torch.compile`` or JAX would write):

1. a Gaussian-kernel regression layer with a learnt length scale, trained by a compiled
   torch step (forward and backward);
2. the same loss and its gradient in x, y and b with ``jax.jit(jax.value_and_grad(...))``.

The dense formulas store the M×N matrix (and autograd keeps it for the backward pass);
lazymat never does, so the dense peers stop at a few ten thousand points.
"""

# %%
# Setup
# -----
import numpy as np
import torch
from _gallery import check_close, header, median_time, need, peer, print_table, sized

import lazymat as lm

jax = peer("jax")
header("Inside compiled models: torch.compile and jax.jit (float32, D = 3)")
torch.manual_seed(0)
SIZES = sized(small=[1000], full=[2000, 10_000, 20_000])
DENSE_MAX = 10_000  # the dense M×N float32 matrix and its gradient: 0.8 GB at 10⁴
# inductor (torch.compile's default backend) takes tens of seconds to compile the dense
# peer; the small size, which the tests run, uses aot_eager for both
BACKEND = sized(small="aot_eager", full="inductor")


# %%
# 1. A kernel layer inside ``torch.compile``
# ------------------------------------------
# ``forward`` builds the LazyTensors from its inputs, as eager code does; Dynamo traces them
# on small placeholder tensors and the graph holds the ``lazymat::reduce`` op on the real
# ones. The length scale is a learnt parameter: its gradient is a lazymat reduction too.

class KernelLayer(torch.nn.Module):
    """a_i = sum_j exp(-|x_i - y_j|^2 / (2 s^2)) b_j with a learnt s (lazymat)."""

    def __init__(self):
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.tensor(-1.0))

    def forward(self, x, y, b):
        s = self.log_scale.exp()
        K = (-lm.Vi(x / s).sqdist(lm.Vj(y / s)) / 2).exp()
        return (K * lm.Vj(b)).sum(dim=1)


class DenseKernelLayer(KernelLayer):
    """The same layer as broadcast torch code (M×N matrix)."""

    def forward(self, x, y, b):
        s = self.log_scale.exp()
        return torch.exp(-torch.cdist(x / s, y / s) ** 2 / 2) @ b


def train_step(model, optimizer, x, y, b, target):
    optimizer.zero_grad()
    loss = ((model(x, y, b) - target) ** 2).mean()
    loss.backward()
    optimizer.step()
    return loss.detach()


def data(n):
    x, y = torch.rand(n, 3), torch.rand(n, 3)
    b = torch.randn(n, 1)
    truth = KernelLayer()
    with torch.no_grad():  # the target: the same layer with the true scale 0.1
        truth.log_scale.fill_(float(np.log(0.1)))
        target = truth(x, y, b)
    return x, y, b, target


explained = torch._dynamo.explain(KernelLayer())(*data(300)[:3])
assert explained.graph_break_count == 0, explained.break_reasons
print(f"  torch._dynamo.explain: {explained.graph_count} graph, "
      f"{explained.graph_break_count} graph breaks")

rows = []
for n in SIZES:
    x, y, b, target = data(n)
    candidates = [("lazymat, eager", KernelLayer, False),
                  (f"lazymat, torch.compile ({BACKEND})", KernelLayer, True),
                  (f"dense torch, torch.compile ({BACKEND})", DenseKernelLayer, True)]
    grads = {}
    for name, cls, compiled in candidates:
        if cls is DenseKernelLayer and n > DENSE_MAX:
            rows.append({"case": f"N={n}", "method": name, "seconds": None,
                         "loss": f"needs ~{3 * n * n * 4 / 2**30:.0f} GiB"})
            continue
        model = cls()
        step_model = torch.compile(model, fullgraph=True, dynamic=True, backend=BACKEND) \
            if compiled else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: same state each call
        seconds, loss = median_time(lambda: train_step(step_model, optimizer, x, y, b, target))
        grads[name] = model.log_scale.grad.clone()
        rows.append({"case": f"N={n}", "method": name, "seconds": seconds,
                     "loss": f"{float(loss):.5f}", "d loss / d log s": float(grads[name])})
    reference = grads["lazymat, eager"]
    for name, g in grads.items():
        check_close(g, reference, 1e-3, f"{name} gradient vs eager lazymat, N={n}")
print_table("One training step of a kernel layer (M = N, D = 3, float32), forward + backward",
            rows)

# %%
# The layer is exact: lazymat's forward against dense float64 on the last size's queries.
with torch.no_grad():
    model = KernelLayer()
    dense = DenseKernelLayer()
    xq = x[:500]
    check_close(model(xq, y, b), dense(xq.double(), y.double(), b.double()), 1e-5,
                "kernel layer vs dense float64 (500 rows)")

# %%
# 2. The same loss under ``jax.jit`` and ``jax.grad``
# ---------------------------------------------------
# ``lazymat.jax`` has the same ``Vi``/``Vj``; the gradient in x, y and b is three
# lazymat reductions (the forward pass also accumulates the x-gradient's Jacobian sums).

if jax is not None:
    import jax.numpy as jnp

    from lazymat.jax import Vi, Vj

    def loss_lazymat(x, y, b):
        a = ((-Vi(x).sqdist(Vj(y)) / 2).exp() * Vj(b)).sum(dim=1)
        return (a ** 2).sum()

    def loss_dense(x, y, b):
        d2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        return ((jnp.exp(-d2 / 2) @ b) ** 2).sum()

    ours, theirs = (jax.jit(jax.value_and_grad(f, (0, 1, 2))) for f in (loss_lazymat,
                                                                        loss_dense))
    rows = []
    for n in SIZES:
        rng = np.random.default_rng(n)
        x, y = (jnp.asarray(rng.random((n, 3), dtype=np.float32)) for _ in range(2))
        b = jnp.asarray(rng.standard_normal((n, 1), dtype=np.float32))
        t, (value, g) = median_time(lambda: jax.block_until_ready(ours(x, y, b)))
        rows.append({"case": f"N={n}", "method": "jax.jit(value_and_grad) of lazymat.jax",
                     "seconds": t, "loss": float(value)})
        if n <= DENSE_MAX:
            t_dense, (value_dense, g_dense) = median_time(
                lambda: jax.block_until_ready(theirs(x, y, b)))
            for k, (mine, ref) in enumerate(zip(g, g_dense)):
                check_close(np.asarray(mine), np.asarray(ref), 1e-3,
                            f"jax gradient {'xyb'[k]} vs dense jit, N={n}")
            rows.append({"case": f"N={n}", "method": "jax.jit(value_and_grad) of the dense "
                         "formula", "seconds": t_dense, "loss": float(value_dense)})
        else:
            rows.append({"case": f"N={n}", "method": "jax.jit of the dense formula",
                         "seconds": None,
                         "loss": f"needs ~{3 * n * n * 4 / 2**30:.1f} GiB (N×N and its grad)"})
    print_table("Loss and gradient in x, y, b under jax.jit (M = N, D = 3)", rows)
