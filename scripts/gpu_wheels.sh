#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels of the Python packages that the lent GPU machines'
# image lacks and the GPU tests and benchmarks need: nibabel and nilearn (the embedded MNI152
# cohort) and monai (the drop-in modules' comparisons). All three are pure Python, so one wheel
# serves the GPU machine's Python; their own dependencies are in that image already. About
# 16 MB: carry it with the command (`carry: [".whl"]`); scripts/gpu_check.sh installs it there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
rm -rf .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --dest .whl nibabel nilearn monai
ls .whl
