"""
On a Dask cluster: the same reductions on dask arrays
=====================================================

When the points do not fit one machine, or one machine's cores are not enough, the same
code takes `Dask <https://docs.dask.org>`_ arrays: every reduction returns a lazy dask array
whose tasks are blocks of (row chunk × column chunk) pairs, each reduced by the compiled
kernel to its raw partial state, merged along the columns with the reduction's own rule.
Selections (Min, ArgKMin...) give bit-for-bit the single-process result; sums agree within
the rounding of another summation order.

Here a ``distributed.LocalCluster`` of two one-thread workers stands in for a cluster. We
compute a Gaussian kernel sum and a k-nearest-neighbour search on dask arrays, check them
against lazymat on numpy (one process using both cores), and time both against the peer a Dask user would
write: the dense broadcast formula in ``dask.array`` (chunked, so it fits in memory, but
it still materialises every block of the M×N matrix).
"""

# %%
# Setup: a local cluster and the data, chunked by rows
# ----------------------------------------------------
import os

import numpy as np
from _gallery import check_close, header, median_time, need, print_table, sized

import lazymat as lm

da = need("dask.array")
distributed = need("distributed")
header("On a Dask cluster: lazymat reductions on dask arrays (float32, D = 3)")
M = N = sized(small=4_000, full=50_000)
CHUNK = sized(small=1_000, full=12_500)
DENSE_MAX = 10_000  # beyond, the dense peer is timed on 1000 rows (it takes minutes)

# The workers inherit the environment: one kernel thread per worker thread. This process
# keeps the default (every core) for the single-process runs.
user_threads = os.environ.get("LAZYMAT_NUM_THREADS")
os.environ["LAZYMAT_NUM_THREADS"] = "1"
# "fork": the workers start as copies of this process (the default, "spawn", would re-run
# this script in each of them unless it were wrapped in `if __name__ == "__main__":`)
dask = need("dask")
dask.config.set({"distributed.worker.multiprocessing-method": "fork"})
cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=40)
client = distributed.Client(cluster)
if user_threads is None:
    del os.environ["LAZYMAT_NUM_THREADS"]
else:
    os.environ["LAZYMAT_NUM_THREADS"] = user_threads
rng = np.random.default_rng(0)
x_np = rng.random((M, 3), dtype=np.float32)
y_np = rng.random((N, 3), dtype=np.float32)
b_np = rng.standard_normal((N, 1), dtype=np.float32)
x, y, b = (client.persist(da.from_array(a, chunks=(CHUNK, a.shape[1])))
           for a in (x_np, y_np, b_np))
GAMMA = 50.0  # exp(-50 |x - y|^2): a kernel of width 0.1 in the unit cube


# %%
# A Gaussian kernel sum and a k-NN search, written as for numpy
# -------------------------------------------------------------
def gauss(x, y, b):
    return (lm.Vj(b) * (-lm.Vi(x).sqdist(lm.Vj(y)) * GAMMA).exp()).sum(dim=1)


def knn(x, y):
    return lm.Vi(x).sqdist(lm.Vj(y)).argKmin(K=10, dim=1)


def gauss_dask_dense(x, y, b):
    """The dense broadcast formula in dask.array: blocks of the M×N matrix, then a matmul."""
    d2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    return da.exp(-GAMMA * d2) @ b


lazy = gauss(x, y, b)
print(f"  a lazy dask array: {lazy!r}\n  {len(lazy.dask)} tasks in its graph")

t_one, a_one = median_time(lambda: gauss(x_np, y_np, b_np))
t_dask, a_dask = median_time(lambda: gauss(x, y, b).compute())
check_close(a_dask, a_one, 1e-5, "Gaussian sum on dask vs numpy")
rows = [{"method": "lazymat, dask arrays (2 workers x 1 thread)", "seconds": t_dask},
        {"method": "lazymat, numpy (one process, every core)", "seconds": t_one}]
if N <= DENSE_MAX:
    t_dense, a_dense = median_time(lambda: gauss_dask_dense(x, y, b).compute(), repeat=1)
    check_close(a_dense, a_one, 1e-4, "dense dask.array vs lazymat")
    rows.append({"method": "dense dask.array broadcast formula", "seconds": t_dense})
else:  # minutes at full size: timed on the first 1000 rows, times M / 1000
    t_dense, a_dense = median_time(lambda: gauss_dask_dense(x[:1000], y, b).compute(),
                                   repeat=1, warmup=0)
    check_close(a_dense, a_one[:1000], 1e-4, "dense dask.array vs lazymat (1000 rows)")
    rows.append({"method": "dense dask.array broadcast formula", "seconds": t_dense * M / 1000,
                 "note": f"timed on 1000 rows, times {M // 1000}"})
print_table(f"Gaussian kernel sum, M = N = {N:,}, chunks of {CHUNK:,} rows", rows)

t_one, i_one = median_time(lambda: knn(x_np, y_np))
t_dask, i_dask = median_time(lambda: knn(x, y).compute())
assert (np.asarray(i_dask) == np.asarray(i_one)).all(), "dask k-NN differs from one process"
print("  check k-NN on dask vs numpy: identical indices ok")
print_table(f"k-NN (K = 10), M = N = {N:,}", [
    {"method": "lazymat, dask arrays (2 workers x 1 thread)", "seconds": t_dask,
     "check": "bit-for-bit equal"},
    {"method": "lazymat, numpy (one process, every core)", "seconds": t_one, "check": "-"}])

client.close()
cluster.close()
