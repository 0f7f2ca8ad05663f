"""
Distance transform of a binary image, separably
================================================

The squared Euclidean distance transform of a binary image gives every pixel the squared
distance to the nearest background (zero) pixel. Written as a reduction it is a Min:

.. math::  D(x_i) = \\min_j \\|x_i - y_j\\|^2 - \\log m_j ,

with :math:`m_j = 1` on background pixels and :math:`0` elsewhere (so :math:`-\\log m_j = +\\infty`
excludes them). Done naively that is an (all pixels) × (background pixels) reduction. Because
:math:`\\|x - y\\|^2` is a sum over axes, the same Min can be taken one axis at a time: a 1-D
Min along every row (all rows in **one batched reduction**), then the same along every column
of the result. Each pass costs pixels × side instead of pixels², and the result is exactly
``scipy.ndimage.distance_transform_edt(image) ** 2``: every value is an integer below 2²⁴, so
float32 arithmetic is exact. The same three lines handle a 3-D volume.

scipy's transform is a linear-time algorithm (Maurer et al.), so it wins on this job; the
point of the example is the batched separable reduction (the same pattern as the
Legendre–Fenchel transform on a grid) and its exactness, and how much separability buys over
the naive reduction.
"""

# %%
# Setup: a synthetic "cells" image (a union of random disks)
# -----------------------------------------------------------
import numpy as np
from _gallery import header, median_time, need, print_table, save_figure, sized

import lazymat as lm

ndimage = need("scipy.ndimage")
header("Squared Euclidean distance transform: separable batched Min vs scipy.ndimage")
rng = np.random.default_rng(0)


def cells(shape, n_blobs, radius):
    """A boolean image (any dimension): True inside a union of random balls."""
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    image = np.zeros(shape, dtype=bool)
    for _ in range(n_blobs):
        centre = rng.random(len(shape)) * np.asarray(shape)
        r = radius * (0.5 + rng.random())
        image |= sum((g - c) ** 2 for g, c in zip(grids, centre)) < r**2
    return image


# %%
# The separable transform: one batched 1-D Min per axis
# ------------------------------------------------------
# Along an axis of length n, every line (all the other axes, flattened into one batch
# dimension B) is reduced at once: ``Vi`` holds the n positions (shared by all lines, batch
# dim 1), ``Vj`` the positions and the line's current values (batch dim B).


def min_along_last_axis(values, first):
    """h[b, i] = min_j (i - j)^2 + values[b, j] for every line b (one reduction).

    On the first pass ``values`` is the background mask m and the cost is -log m_j."""
    batch, n = values.shape
    pos = np.arange(n, dtype=np.float32)[None, :, None]         # (1, n, 1)
    x_i, y_j = lm.Vi(pos), lm.Vj(pos)
    v_j = lm.Vj(values[:, :, None])                               # (B, n, 1)
    cost = -v_j.log() if first else v_j
    return ((x_i - y_j) ** 2 + cost).min(dim=2)[:, :, 0]          # batch dims first: dim=2 is j


def squared_distance_transform(image):
    """Squared distance of every pixel to the nearest False pixel, for any dimension."""
    values = (~image).astype(np.float32)                          # m_j: 1 on the background
    for axis in range(image.ndim):
        moved = np.moveaxis(values, axis, -1)
        shape = moved.shape
        lines = np.ascontiguousarray(moved.reshape(-1, shape[-1]))
        values = np.moveaxis(min_along_last_axis(lines, first=axis == 0).reshape(shape), -1, axis)
    return np.ascontiguousarray(values)


def naive_transform(image):
    """The same Min over all pairs (pixel, background pixel): pixels x background work."""
    pixels = np.argwhere(np.ones_like(image)).astype(np.float32)
    background = np.argwhere(~image).astype(np.float32)
    return lm.Vi(pixels).sqdist(lm.Vj(background)).min(dim=1).reshape(image.shape)


# %%
# Exactness and time against scipy
# ---------------------------------
# lazymat's result equals scipy's exactly (after rounding scipy's float64 square roots
# squared back to integers). The first call of each kernel compiles it; ``median_time``
# makes one untimed call first. Each table's first row is scipy's: 'vs first' is how many
# times slower lazymat is.

images = {}
for side in sized(small=[64, 128], full=[512, 2048]):
    image = cells((side, side), n_blobs=side // 8, radius=side / 25)
    images[side] = image
    repeat = 3 if side <= 512 else 1
    warm = 1 if side <= 512 else 0
    t_ours, ours = median_time(lambda: squared_distance_transform(image), repeat, warm)
    t_scipy, exact = median_time(lambda: ndimage.distance_transform_edt(image) ** 2, repeat,
                                 warm)
    assert np.array_equal(ours, np.rint(exact)), f"separable transform differs at {side}²"
    print_table(f"Squared distance transform of a {side}² image (float32)", [
        {"method": f"scipy distance_transform_edt, {side}²", "seconds": t_scipy,
         "pairs": "-", "check": "exact"},
        {"method": f"lazymat separable, {side}²", "seconds": t_ours,
         "pairs": f"{2 * side**3:.1e}", "check": "equal to scipy"}])

# The naive reduction over all (pixel, background pixel) pairs, on a smaller image:
side = sized(small=32, full=192)
image = cells((side, side), n_blobs=side // 8, radius=side / 25)
t_naive, ours = median_time(lambda: naive_transform(image), repeat=1)
t_sep, ours_sep = median_time(lambda: squared_distance_transform(image))
t_scipy, exact = median_time(lambda: ndimage.distance_transform_edt(image) ** 2)
assert np.array_equal(ours, np.rint(exact)) and np.array_equal(ours_sep, ours)
print_table(f"Naive (all pairs) vs separable, {side}² image (float32)", [
    {"method": f"scipy distance_transform_edt, {side}²", "seconds": t_scipy, "pairs": "-",
     "check": "exact"},
    {"method": f"lazymat naive (pixels x background), {side}²", "seconds": t_naive,
     "pairs": f"{image.size * (~image).sum():.1e}", "check": "equal to scipy"},
    {"method": f"lazymat separable, {side}²", "seconds": t_sep, "pairs": f"{2 * side**3:.1e}",
     "check": "equal to scipy"}])

# %%
# A 3-D volume: three passes (rows, columns, slices), the same code
side = sized(small=16, full=128)
volume = cells((side, side, side), n_blobs=side // 2, radius=side / 8)
# (the kernels are the 2-D ones: they are compiled already)
t_ours, ours3 = median_time(lambda: squared_distance_transform(volume), repeat=sized(3, 1),
                            warmup=sized(1, 0))
t_scipy, exact3 = median_time(lambda: ndimage.distance_transform_edt(volume) ** 2,
                              repeat=sized(3, 1), warmup=sized(1, 0))
assert np.array_equal(ours3, np.rint(exact3)), "3-D separable transform differs"
print_table(f"Squared distance transform of a {side}³ volume (float32)", [
    {"method": f"scipy distance_transform_edt, {side}³", "seconds": t_scipy, "pairs": "-",
     "check": "exact"},
    {"method": f"lazymat separable, {side}³", "seconds": t_ours, "pairs": f"{3 * side**4:.1e}",
     "check": "equal to scipy"}])

# %%
# The image and its transform
# ---------------------------
import matplotlib.pyplot as plt  # noqa: E402

side = min(images)
image = images[side]
fig, axes = plt.subplots(1, 3, figsize=(12, 4))
axes[0].imshow(image, cmap="gray")
axes[0].set_title(f"binary image ({side}²)")
shown = axes[1].imshow(np.sqrt(squared_distance_transform(image)), cmap="magma")
axes[1].set_title("distance to the background")
fig.colorbar(shown, ax=axes[1], fraction=0.046)
shown = axes[2].imshow(np.sqrt(ours3[ours3.shape[0] // 2]), cmap="magma")
axes[2].set_title(f"3-D volume ({volume.shape[0]}³), middle slice")
fig.colorbar(shown, ax=axes[2], fraction=0.046)
for ax in axes:
    ax.set_axis_off()
fig.tight_layout()
save_figure(fig, "distance_transform")
