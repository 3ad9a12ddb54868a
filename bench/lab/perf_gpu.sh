#!/usr/bin/env bash
# The performance run and the CUDA tests on a GPU host, as one command from the repository root; results under
# $OUT (default out/perf-gpu). The performance run (bench.lab.perf_run, options in PERF_ARGS) goes without
# its kernel profile unless PROFILE=1; KERNELS=1 adds the kernel comparisons (bench.lab.kernels) before it; the
# CUDA tests come last, so that a run short of time loses them rather than the figures (GPU_TESTS=0 skips them).
# Each step has a timeout (KERNELS_TIMEOUT, PERF_TIMEOUT, GPU_TEST_TIMEOUT in seconds).
# A host whose image has torch and transformers but no Ray and no package index gets its wheels from .whl/,
# built beforehand on a machine online by bench/lab/gpu_wheels.sh; this script installs them when .whl/ exists.
#   PERF_ARGS="--concurrency 1,1024 --rates 650" bash bench/lab/perf_gpu.sh   # engine and service, about 7 minutes
#   # the engine's goals with its kernels, its profile and the CUDA tests, about 8 minutes:
#   KERNELS=1 PROFILE=1 KERNELS_TIMEOUT=150 PERF_TIMEOUT=300 PERF_ARGS="--engine-only --rates 650" bash bench/lab/perf_gpu.sh
#   # the service against the fast engine, about 4 minutes:
#   GPU_TESTS=0 PERF_ARGS="--paths fast --batch-sizes 1,1024 --concurrency 1,1024" bash bench/lab/perf_gpu.sh
#   # the same, then the batch mode on 30,000 images of the same workload (python -m bench price sets it beside
#   # the service); the batch step is not yet timed on a GPU, so give it PERF_TIMEOUT to spare:
#   GPU_TESTS=0 PERF_TIMEOUT=560 PERF_ARGS="--paths fast --batch-sizes 1,1024 --concurrency 1,1024 --batch 30000" \
#     bash bench/lab/perf_gpu.sh
#   # the price of an image by its answer's length (python -m bench price): the engine at 16, 32, 64 and 128 new
#   # tokens (about 3 minutes), the service at 32 and its busiest point again at 16, 64 and 128 (about 5 more):
#   GPU_TESTS=0 PERF_TIMEOUT=520 PERF_ARGS="--paths fast --batch-sizes 1,1024 --in-engine 1024 --rates 650 \
#     --output-lengths 16,32,64,128 --concurrency 1,1024 --service-lengths 16,64,128" bash bench/lab/perf_gpu.sh
#   # the engine alone at those lengths, about 3 minutes:
#   GPU_TESTS=0 PERF_ARGS="--engine-only --paths fast --batch-sizes 1,1024 --in-engine 1024 --rates 650 \
#     --output-lengths 16,32,64,128" bash bench/lab/perf_gpu.sh
set -uo pipefail
OUT=${OUT:-out/perf-gpu}; mkdir -p "$OUT"
if [ -d .whl ]; then
  bash bench/lab/gpu_wheels.sh install /tmp/site || exit 1
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
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
rm -rf /tmp/perf  # files left there by an earlier run would pass for this one's
timeout "${PERF_TIMEOUT:-480}" python3 -m bench.lab.perf_run --out /tmp/perf ${PERF_ARGS:-} > "$OUT/perf_run.log" 2>&1
echo "perf_run exit $?"; tail -30 "$OUT/perf_run.log"
tar czf "$OUT/perf.tgz" -C /tmp/perf --exclude='*.png' --exclude='requests.jsonl' --exclude='batch-input' . 2>/dev/null
# The CUDA tests last, so that a run short of time loses them rather than the figures.
if [ "${GPU_TESTS:-1}" = 1 ]; then
  timeout "${GPU_TEST_TIMEOUT:-100}" python3 -m pytest -q ${GPU_TEST_ARGS:--m gpu tests/engine} 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
fi
ls -la "$OUT"
