#!/usr/bin/env bash
# The GPU check, one command for the day a GPU is lent (about 6 minutes on one H200):
#   1. the contract tests on CUDA: the Triton kernels on torch CUDA tensors (harness "triton") and
#      the Pallas kernels on jax arrays (harness "pallas-jax"), the same tests CI runs in the
#      interpreters, now compiled for the real device;
#   2. the GPU benchmark, `python -m bench --gpu`: jax arrays (fastloss, optax, JAX autodiff, stock
#      Keras-JAX) and torch CUDA tensors (fastloss-triton, torch, torch.compile, Liger, stock
#      Keras-torch), GB/s against the device's own copy bandwidth.
# Usage: bash bench/gpu_check.sh [OUT_DIR]      (default bench-results/gpu-check)
# Needs fastloss installed (pip install -e ".[test,bench]") and a jax with CUDA (jax[cuda12|13]).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-results/gpu-check}
mkdir -p "$out"
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU is visible here; nothing to check (CI runs the interpreters instead)"
    exit 0
fi
unset TRITON_INTERPRET
export FASTLOSS_TEST_DEVICE=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python -c "import jax, torch, triton; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__,
'| triton', triton.__version__)" 2>&1 | tee -a "$out/gpu.txt"
start=$(date +%s)
timeout 240 python -m pytest -q -n 8 tests/test_contract.py -k "triton or pallas" -p no:cacheprovider \
    -o addopts= -rfE 2>&1 | tee "$out/contract.log"
tests_rc=$?
echo "contract tests on CUDA: exit $tests_rc, $(( $(date +%s) - start )) s" | tee -a "$out/gpu.txt"
start=$(date +%s)
timeout 300 python -m bench --gpu --out "$out" 2>&1 | tee "$out/bench.log"
bench_rc=$?
echo "GPU benchmark: exit $bench_rc, $(( $(date +%s) - start )) s" | tee -a "$out/gpu.txt"
exit $(( tests_rc != 0 || bench_rc != 0 ))
