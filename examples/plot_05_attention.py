r"""
Attention without the attention matrix
======================================

Softmax attention, :math:`o_i = \sum_j \operatorname{softmax}_j(q_i \cdot k_j / \sqrt{d})\, v_j`,
is a ``SumSoftMaxWeight`` reduction: lazymat streams over the keys with a running maximum and
never stores the L×L matrix of scores. The dense form ``softmax(Q Kᵀ) V`` stores it (L² floats
per head), which stops fitting in memory at a few tens of thousands of tokens. PyTorch's
``scaled_dot_product_attention`` (SDPA) is the tool a user would pick: on CPU it has a
flash-attention kernel that also works by blocks, on top of matrix-multiply (BLAS) tiles.

We run multi-head attention (batch dims: heads) for growing sequence lengths L with lazymat,
SDPA and the dense form, check the results against each other and a float64 dense computation,
and measure time and peak memory.
"""

# %%
# Setup: 4 heads of dimension 32, float32 torch tensors shaped (heads, L, d).

import os

import numpy as np
import torch
import torch.nn.functional as F
from _gallery import (check_close, format_bytes, header, median_time, peak_memory, print_table,
                      save_figure, sized)

from lazymat import LazyTensor

header("Attention: SumSoftMaxWeight vs torch SDPA")
torch.manual_seed(0)
HEADS, DH = 4, 32
LENGTHS = sized(small=[256, 1024], full=[1024, 4096, 8192, 16384])
DENSE_MAX = 8192  # the dense scores of 4 heads at L = 16384 need 4 GiB, and the softmax a copy
# SDPA's CPU path measured 9 GiB at L = 16384 (2.3 GiB at 8192): run it there only with room
SDPA_MAX = 16384 if os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") > 16 * 2**30 \
    else 8192


def attention_lazymat(q, k, v):
    scores = (LazyTensor(q[:, :, None, :]) | LazyTensor(k[:, None, :, :])) * (DH ** -0.5)
    return scores.sumsoftmaxweight(LazyTensor(v[:, None, :, :]), dim=2)  # over the keys j


def attention_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def attention_dense(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * (DH ** -0.5), dim=-1) @ v


# %%
# Correctness on a short sequence: all three against float64.

q, k, v = (torch.randn(HEADS, 512, DH) for _ in range(3))
ref = attention_dense(q.double(), k.double(), v.double())
check_close(attention_lazymat(q, k, v), ref, 1e-4, "lazymat vs dense float64")
check_close(attention_sdpa(q, k, v), ref, 1e-4, "SDPA vs dense float64")

# %%
# Time and memory as L grows. Keys are scaled so that the softmax is peaked, as in trained
# models (the running maximum matters).

rows, curves = [], {"lazymat SumSoftMaxWeight": [], "torch SDPA": [], "dense softmax(QKᵀ)V": []}
for L in LENGTHS:
    q, k, v = torch.randn(HEADS, L, DH), 2 * torch.randn(HEADS, L, DH), torch.randn(HEADS, L, DH)
    outs = {}
    for name, fn in [("lazymat SumSoftMaxWeight", attention_lazymat),
                     ("torch SDPA", attention_sdpa), ("dense softmax(QKᵀ)V", attention_dense)]:
        limit, need = {"dense softmax(QKᵀ)V": (DENSE_MAX, 2 * HEADS * L * L * 4),
                       "torch SDPA": (SDPA_MAX, 9 * 2**30 * (L / 16384) ** 2)}.get(name, (L, 0))
        if L > limit:
            rows.append({"case": f"L={L}", "method": name, "seconds": None,
                         "peak memory": "needs ~" + format_bytes(need)})
            curves[name].append(np.nan)
            continue
        # at L = 16384 (SDPA: ~18 s a call) one timed call, no warm-up: the kernels were
        # compiled at the smaller L
        t, out = median_time(lambda: fn(q, k, v), repeat=sized(1, 3 if L < 16384 else 1),
                             warmup=1 if L < 16384 else 0)
        memory, _ = peak_memory(lambda: fn(q, k, v))
        outs[name] = out
        rows.append({"case": f"L={L}", "method": name, "seconds": t,
                     "peak memory": format_bytes(memory)})
        curves[name].append(t)
    peer_out = outs.get("torch SDPA", outs.get("dense softmax(QKᵀ)V"))
    if peer_out is not None:
        check_close(outs["lazymat SumSoftMaxWeight"], peer_out, 1e-4, f"lazymat vs SDPA at L={L}")
    else:  # no peer fits: check a few rows against a dense float64 computation
        rows_q = q[:, :64].double()
        check_close(outs["lazymat SumSoftMaxWeight"][:, :64],
                    attention_dense(rows_q, k.double(), v.double()), 1e-4,
                    f"lazymat vs dense float64 on 64 rows at L={L}")
print_table(f"Attention, {HEADS} heads of dim {DH}, float32 (ratios to lazymat at the same L)",
            rows)

# %%
# The picture: time against L. All three grow as L²; the dense form also needs L² memory.

import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(6, 4))
for name, ts in curves.items():
    ax.loglog(LENGTHS, ts, "o-", label=name)
ax.set_xlabel("sequence length L")
ax.set_ylabel("time (s, median)")
ax.set_title(f"Attention, {HEADS} heads × {DH}")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
save_figure(fig, "timings")
