#!/usr/bin/env bash
# On a lent GPU machine: build gvsl_fast._C with the CUDA kernels, run the test suite on the GPU
# and the benchmarks (with their per-kernel time breakdown), and leave logs and pytest-benchmark
# JSON under $OUT (default ./gpu-out). `profile` instead runs Nsight Compute on one forward +
# backward of each GVSL op (scripts/gpu_profile.py): per kernel its time, DRAM throughput,
# occupancy, registers and stall reasons, to see what keeps a kernel from its floor.
#   scripts/gpu_check.sh [tests|bench|all|profile] [-k expression for the tests]
# The GPU image lacks nibabel, nilearn (the embedded cohort) and monai: run scripts/gpu_wheels.sh
# here first and carry .whl/ with the command.
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
if [ "$what" = profile ]; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
  [ -n "$NCU" ] || { echo "profile: Nsight Compute (ncu) not found"; exit 1; }
  for op in $(python3 scripts/gpu_profile.py --list); do
    # clocks as found (--clock-control none): the card's settings are not ours to change
    "$NCU" --profile-from-start off --clock-control none --set detailed -f -o "$OUT/ncu-$op" \
      python3 scripts/gpu_profile.py "$op" >"$OUT/ncu-$op.log" 2>&1 \
      || { tail -20 "$OUT/ncu-$op.log"; exit 1; }
    "$NCU" -i "$OUT/ncu-$op.ncu-rep" --page details >"$OUT/ncu-$op.txt"
    echo "== $op"
    "$NCU" -i "$OUT/ncu-$op.ncu-rep" --page raw --csv --metrics "$(python3 scripts/gpu_profile.py --metrics)" |
      python3 scripts/gpu_profile.py --summary | tee "$OUT/ncu-$op-summary.txt"
  done
  exit 0
fi
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
