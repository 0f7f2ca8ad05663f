#!/usr/bin/env bash
# The GPU checks in one go, on a CUDA machine (how the README's GPU figures were made):
# the health report, a smoke test, the GPU tests, then `python -m benchmarks.gpu`.
# Usage: benchmarks/gpu_check.sh [results-dir] [--no-bench]. Needs torch with CUDA,
# cuda-bindings and NVRTC (pip install 'lazymat[cuda]'); pykeops wheels in .whl/ are
# installed to /tmp/site first when present (a machine without network access).
set -u
out=${1:-/tmp/lazymat-gpu}
mkdir -p "$out"
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export LAZYMAT_CACHE_DIR=${LAZYMAT_CACHE_DIR:-/tmp/lazymat-cache}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import lazymat; lazymat.check_health()"
timeout 120 python3 - <<'PY' 2>&1 | tee "$out/smoke.log"
import time, torch, lazymat as lm
x = torch.rand(100_000, 3, device="cuda")
t = time.perf_counter()
s = (-lm.Vi(x).sqdist(lm.Vj(x)) * 50).exp().sum(1)
torch.cuda.synchronize()
print(f"smoke: first call {time.perf_counter() - t:.2f} s")
t = time.perf_counter()
for _ in range(10):
    s = (-lm.Vi(x).sqdist(lm.Vj(x)) * 50).exp().sum(1)
torch.cuda.synchronize()
print(f"smoke: warm call {(time.perf_counter() - t) / 10 * 1e3:.2f} ms")
ref = torch.cat([torch.exp(-torch.cdist(x[k:k + 5000], x) ** 2 * 50).sum(1, keepdim=True)
                 for k in range(0, len(x), 5000)])
print("smoke: max rel err", ((s - ref).abs() / ref).max().item())
PY
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu -n "${WORKERS:-8}" -p no:cacheprovider \
  --maxfail=30 tests/test_cuda_runtime.py 2>&1 | tee "$out/tests.log" | tail -40
case " $* " in *" --no-bench "*) exit 0;; esac
timeout "${BENCH_TIMEOUT:-300}" python3 -m benchmarks.gpu ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.md"
# tensor cores (LAZYMAT_TENSOR_CORES=off/tf32/3xtf32 in one run; the accuracy test is above)
timeout "${BENCH_TIMEOUT:-300}" python3 -m benchmarks.gpu --tensor-cores --quick 2>&1 \
  | tee "$out/bench-tensor-cores.md"
