"""Dask overhead: a LocalCluster (2 workers x 1 thread) against one process with 2 threads.

Gaussian sum and k-NN (K = 10), D = 3, float32, M = N = n, both in the same run. Prints
the times, the overhead ratio (cluster / one process), the task graph (tasks, bytes moved
per block task) and the scheduler's share (wall time x threads minus the tasks' compute
time, from the task stream), and the load.

    python benchmarks/dask_scale.py --n 1000000       # the issue's size
    python benchmarks/dask_scale.py --n 100000 --repeat 2
"""

from __future__ import annotations

import argparse
import os
import time


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="M = N (default 1e6)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per case (the best is kept)")
    ap.add_argument("--pairs-per-task", type=float, default=2**28)
    args = ap.parse_args()

    import dask
    import dask.array as da
    import numpy as np
    from distributed import Client, LocalCluster, get_task_stream

    import lazymat as lm

    n, K = args.n, 10
    rng = np.random.default_rng(0)
    x = rng.random((n, 3), dtype=np.float32)
    y = rng.random((n, 3), dtype=np.float32)
    b = rng.random((n, 1), dtype=np.float32)
    print(f"M = N = {n:,}, D = 3, float32; load before: {_load()}")

    def gauss(X, Y, B):
        return ((-lm.Vi(X).sqdist(lm.Vj(Y)) * 200).exp() * lm.Vj(B)).sum(dim=1)

    def knn(X, Y, B):
        return lm.Vi(X).sqdist(lm.Vj(Y)).argKmin(K, dim=1)

    cases = {"gaussian sum": gauss, f"k-NN (K = {K})": knn}
    # warm the kernels (compile cache) on a small slice so that no run pays a compile
    for fn in cases.values():
        fn(x[:2000], y[:2000], b[:2000])

    # The cluster starts first (its workers inherit no LAZYMAT_NUM_THREADS: one kernel thread
    # per task); then each case alternates one-process and cluster runs, the best of each
    # kept, so that a change of the machine's load hits both alike.
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=":0", silence_logs=40)
    client = Client(cluster)
    rows = 65536  # the storage chunks (the tasks cut their own blocks out of them)
    xd, yd, bd = client.persist([da.from_array(a, chunks=(rows, a.shape[1])) for a in (x, y, b)])
    print(f"LocalCluster: 2 workers x 1 thread; inputs persisted on the workers in row chunks "
          f"of {rows:,}")

    def one_process(fn):
        os.environ["LAZYMAT_NUM_THREADS"] = "2"
        try:
            t = time.perf_counter()
            out = fn(x, y, b)
            return time.perf_counter() - t, out
        finally:
            del os.environ["LAZYMAT_NUM_THREADS"]

    table = []
    with dask.config.set({"lazymat.pairs-per-task": int(args.pairs_per_task)}):
        for name, fn in cases.items():
            # each worker loads (or compiles) its kernels before the timed runs
            small = [da.from_array(a[:4000], chunks=(1000, a.shape[1])) for a in (x, y, b)]
            dask.compute(fn(*small))
            dask.compute(fn(*small))
            lazy = fn(xd, yd, bd)
            graph = dict(lazy.__dask_graph__())
            ours = [k for k in graph if "lazymat-" in str(k)]
            blocks = [k for k in ours if "-block-" in str(k)]
            t_one, t_dask, stream = float("inf"), float("inf"), []
            for _ in range(args.repeat):
                t, want = one_process(fn)
                t_one = min(t_one, t)
                with get_task_stream() as ts:
                    t = time.perf_counter()
                    got = lazy.compute()
                    wall = time.perf_counter() - t
                if wall < t_dask:
                    t_dask, stream = wall, ts.data
            busy = sum(s["stop"] - s["start"] for task in stream for s in task["startstops"]
                       if s["action"] == "compute")
            same = (np.array_equal(got, want) if got.dtype.kind == "i"
                    else float(np.abs(got - want).max() / np.abs(want).max()))
            m = max(lazy.chunks[0])
            cols = min(n, max(1, int(args.pairs_per_task) // m))
            block_bytes = (m * 3 + cols * 4) * 4  # an x block, a y block and a b block
            print(f"  {name}: one process {t_one:.2f} s, cluster {t_dask:.2f} s; "
                  f"{len(ours)} tasks ({len(blocks)} blocks of {m:,} x {cols:,}), "
                  f"~{block_bytes / 1e6:.2f} MB in per block task; tasks busy {busy:.2f} s "
                  f"of {2 * t_dask:.2f} s thread time "
                  f"(scheduler and transfers: {2 * t_dask - busy:.2f} s, "
                  f"{(2 * t_dask - busy) / max(1, len(ours)) * 1e3:.1f} ms per task); "
                  f"result vs one process: {'identical' if same is True else f'{same:.1e}'} "
                  f"(load {_load()})")
            table.append((name, t_one, t_dask, t_dask / t_one))
    client.close()
    cluster.close()
    print(f"\n| case (M = N = {n:,}) | one process, 2 threads | LocalCluster 2 x 1 | ratio |")
    print("|---|---|---|---|")
    for name, t1, t2, r in table:
        print(f"| {name} | {t1:.2f} s | {t2:.2f} s | {r:.2f}x |")
    print(f"load after: {_load()}")


if __name__ == "__main__":
    main()
