#!/usr/bin/env bash
# On a lent GPU machine: build gvsl_fast._C with the CUDA kernels, run the test suite on the GPU
# and the benchmarks (with their per-kernel time breakdown), and leave logs and pytest-benchmark
# JSON under $OUT (default ./gpu-out).
#   scripts/gpu_check.sh [tests|bench|all] [extra pytest -k expression for the tests]
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
what=${1:-all}
# wheels carried for packages the GPU image lacks (nibabel, nilearn's templates, monai)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$OUT/device.txt"
t0=$SECONDS
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $((SECONDS - t0)) s"
python3 -c "import torch, gvsl_fast._C; assert torch.ops.gvsl_fast.cuda_built()" || exit 1
if [ "$what" != bench ]; then
  # (not the host emulation of the CUDA kernels: CPU work that CI already does)
  python3 -m pytest tests -q -p no:cacheprovider -k "${2:-(cuda or triton or gpu) and not emulated}" \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [ "$what" != tests ]; then
  python3 -m pytest benchmarks --benchmark-only -q -p no:cacheprovider -k "gpu" --kernel-profile \
    --benchmark-json "$OUT/bench_gpu.json" --benchmark-columns=median,rounds \
    2>&1 | tee "$OUT/bench_gpu.log" | tail -40
fi
