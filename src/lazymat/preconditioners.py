"""Preconditioners for kernel systems (α·Id + K) a = b, and the spatial partition they use.

:func:`kd_order` sorts points along a k-d tree (median splits of the widest side) so that
each leaf is a contiguous, compact run of indices; :class:`SchwarzPreconditioner` is the
additive Schwarz method on those leaves, each grown by an overlap: z = Σ_k R_kᵀ (α·Id +
K_kk)⁻¹ R_k r, with the dense blocks K_kk evaluated from the formula and inverted once.
For a local kernel (Gaussian, Matérn, ...) it removes most conjugate gradient iterations.

>>> import numpy as np
>>> x = np.random.rand(500, 2)
>>> perm, leaves = kd_order(x, 64)
>>> int(leaves[-1, 1]), bool(np.all(leaves[:, 1] - leaves[:, 0] <= 64))
(500, True)
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .arraylib import is_torch

#: The most memory the block inverses of a SchwarzPreconditioner may take, in bytes.
MAX_BYTES = 4 * 2**30


def kd_order(points: np.ndarray, leaf_size: int,
             within: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(perm, leaves): points[perm] is sorted by k-d tree leaf, leaf k being the rows
    ``leaves[k, 0]:leaves[k, 1]`` (at most leaf_size points, about half of it at least), in
    tree order, so that consecutive leaves are near each other. ``within=(perm, leaves)``
    refines a coarser order: its leaves stay contiguous, each split into smaller ones."""
    pts = np.asarray(points)
    if leaf_size < 1:
        raise ValueError(f"leaf_size must be >= 1, got {leaf_size}")
    if within is None:
        perm, todo = np.arange(len(pts)), [(0, len(pts))]
    else:
        perm, todo = within[0].copy(), [tuple(int(v) for v in seg) for seg in within[1][::-1]]
    leaves = []
    while todo:
        start, end = todo.pop()
        if end - start <= leaf_size:
            leaves.append((start, end))
            continue
        idx = perm[start:end]
        p = pts[idx]
        d = int(np.argmax(p.max(0) - p.min(0)))
        mid = (end - start) // 2
        perm[start:end] = idx[np.argpartition(p[:, d], mid)]
        todo += [(start + mid, end), (start, start + mid)]  # depth first, left leaf first
    return perm, np.array(leaves, dtype=np.int64).reshape(-1, 2)


def leaf_boxes(points: np.ndarray, leaves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi): the bounding box of each leaf of points sorted by :func:`kd_order`."""
    starts = leaves[:, 0]
    return np.minimum.reduceat(points, starts, 0), np.maximum.reduceat(points, starts, 0)


class SchwarzPreconditioner:
    """Additive Schwarz preconditioner of α·Id + K on overlapping spatial blocks.

    ``points`` (n, D) and ``leaves`` come from :func:`kd_order` (points already sorted);
    block k holds the points within ``overlap`` × (mean side of leaf k) of leaf k's box, and
    ``block(idx)`` returns the dense float64 K[idx][:, idx] (numpy, or torch on ``like``'s
    device). Calling the preconditioner on r (n, e), in the sorted order, returns Σ_k R_kᵀ
    (α·Id + K_kk)⁻¹ R_k r, a symmetric positive definite approximation of (α·Id + K)⁻¹ r,
    in r's dtype. Each block is kept as its packed Cholesky factor (numpy; LAPACK ?pptrs
    applies it) or its dense inverse (torch), in ``like``'s dtype (float32 data: half the
    memory), or in float32 with ``single``: a preconditioner needs no more (the same CG
    iterations on the benchmark problem; CG's Polak-Ribière step is robust to it).

    >>> import numpy as np
    >>> x = np.sort(np.random.rand(300, 1), 0)
    >>> block = lambda i: np.exp(-50 * (x[i] - x[i].T) ** 2)
    >>> perm, leaves = kd_order(x, 32)
    >>> P = SchwarzPreconditioner(block, x[perm], leaves, alpha=0.1, like=x)
    >>> P(np.ones((300, 1))).shape
    (300, 1)
    """

    def __init__(self, block: Callable[[Any], Any], points: np.ndarray, leaves: np.ndarray,
                 alpha: float, like: Any, overlap: float = 0.25,
                 max_bytes: float | None = None, single: bool = False):
        from .errors import ShapeError

        if not overlap >= 0:
            raise ShapeError(f"overlap must be >= 0 (a fraction of a block's side), got "
                             f"{overlap!r}")
        pts = np.asarray(points)
        lo, hi = leaf_boxes(pts, leaves)
        grow = overlap * (hi - lo).mean(1, keepdims=True)
        glo, ghi = lo - grow, hi + grow
        self.torch = is_torch(like)
        members = []
        for k in range(len(leaves)):
            near = np.nonzero(np.all((lo <= ghi[k]) & (hi >= glo[k]), 1))[0]
            cand = np.concatenate([np.arange(*leaves[c]) for c in near])
            members.append(cand[np.all((pts[cand] >= glo[k]) & (pts[cand] <= ghi[k]), 1)])
        self.sizes = [len(idx) for idx in members]
        self.dtype = "float32" if single else str(like.dtype).split(".")[-1]
        # numpy with scipy keeps packed Cholesky factors (half a square), else dense inverses
        self._pptrs = None if self.torch else _packed_solver(self.dtype)
        packed = self._pptrs is not None
        entries = sum(m * (m + 1) // 2 if packed else m * m for m in self.sizes)
        need = entries * np.dtype(self.dtype).itemsize
        max_bytes = MAX_BYTES if max_bytes is None else max_bytes
        if need > max_bytes:
            raise ShapeError(f"the Schwarz preconditioner would keep {need / 1e9:.1f} GB of "
                             f"block factors (limit {max_bytes / 1e9:.1f} GB): pass a smaller "
                             f"block_size or overlap, or precond=None")
        with _one_blas_thread():
            self.blocks = [self._factor(idx, block, alpha, like) for idx in members]

    def _factor(self, idx: np.ndarray, block: Callable[[Any], Any], alpha: float,
                like: Any) -> tuple[Any, Any]:
        if self.torch:
            import torch

            index = torch.from_numpy(idx).to(like.device)
            A = block(index)
            A = A + alpha * torch.eye(len(idx), dtype=A.dtype, device=A.device)
            L, info = torch.linalg.cholesky_ex(A)
            inv = torch.cholesky_inverse(L) if int(info) == 0 else torch.linalg.pinv(
                A, hermitian=True)
            return index, inv.to(getattr(torch, self.dtype))
        A = np.asarray(block(idx), dtype=np.float64)
        A = A + alpha * np.eye(len(idx))
        if self._pptrs is None:
            return idx, _spd_inverse(A).astype(self.dtype)
        try:
            # Cholesky: a sixth of an inverse's flops; packed: half its memory; and the two
            # triangular solves of an application are faster than a threaded GEMV.
            L = np.linalg.cholesky(A)
        except np.linalg.LinAlgError:
            L = None
        if L is None or not np.isfinite(L).all():
            return idx, _spd_inverse(A).astype(self.dtype)
        return idx, L.T[np.triu_indices(len(idx))].astype(self.dtype)  # lower, column-packed

    @property
    def nbytes(self) -> int:
        return sum(inv.numel() * inv.element_size() if self.torch else inv.nbytes
                   for _, inv in self.blocks)

    def __call__(self, r: Any) -> Any:
        z = r * 0
        dtype = self.blocks[0][1].dtype if self.blocks else r.dtype
        low = r.to(dtype) if self.torch else r.astype(dtype, copy=False)
        for idx, f in self.blocks:
            if f.ndim == 2:  # a dense inverse (torch, no scipy, or a singular block)
                z[idx] += f @ low[idx]
                continue
            sol, info = self._pptrs(len(idx), f, low[idx], lower=1)
            if info != 0:
                raise ValueError(f"LAPACK ?pptrs failed on a Schwarz block (info {info})")
            z[idx] += sol
        return z


def _packed_solver(dtype: str) -> Callable[..., Any] | None:
    """LAPACK's ?pptrs (solve with a packed Cholesky factor) for dtype, from scipy; None
    without scipy or for a dtype LAPACK lacks (then the blocks keep dense inverses)."""
    if dtype not in ("float32", "float64"):
        return None
    try:
        from scipy.linalg import lapack
    except ImportError:
        return None
    return lapack.get_lapack_funcs("pptrs", dtype=np.dtype(dtype))


def _one_blas_thread() -> Any:
    """A context where numpy's BLAS/LAPACK runs on one thread (when threadpoolctl is
    installed): the blocks are a few hundred rows, and a threaded LAPACK call that small
    mostly spin-waits — on a busy 2-core machine the setup took 19–58 s threaded against
    2 s on one thread."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _spd_inverse(A: np.ndarray) -> np.ndarray:
    """The (symmetrized) inverse of a symmetric positive definite matrix; the pseudo-inverse
    when A is (numerically) singular."""
    try:
        inv = np.linalg.inv(A)
    except np.linalg.LinAlgError:
        inv = None
    if inv is None or not np.isfinite(inv).all() or (np.diag(inv) <= 0).any():
        inv = np.linalg.pinv(A, hermitian=True)
    return (inv + inv.T) / 2
