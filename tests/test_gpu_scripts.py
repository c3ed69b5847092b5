"""The GPU session's scripts (scripts/gpu_profile.py, gpu_check.sh, gpu_wheels.sh) checked here,
so that they do not rot between the rare sessions that get a GPU: each profiled case runs forward
and backward, the summary reads ncu's CSV layout, and the shell scripts parse."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _gpu_profile():
    spec = importlib.util.spec_from_file_location("gpu_profile", SCRIPTS / "gpu_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_profile = _gpu_profile()


@pytest.mark.parametrize("op", gpu_profile.OPS)
def test_each_profiled_case_runs_forward_and_backward(op):
    step, what, leaves = gpu_profile.case(op, torch.device("cpu"), spatial=(9, 10, 11))
    step("cpu")
    assert what and leaves
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), (op, leaf.shape)
        assert leaf.grad.abs().sum() > 0, (op, leaf.shape)


def test_summary_reads_ncu_raw_csv():
    metrics = list(gpu_profile.METRICS)
    header = ",".join(f'"{c}"' for c in ["ID", "Kernel Name", *metrics])
    units = ",".join(f'"{u}"' for u in ["", "", "usecond", "Mbyte", "%", "%", "%", "", "inst", "%"])
    row = ",".join(f'"{v}"' for v in ["0", "box_stream_kernel", "312.5", "45.1", "11.2", "40.3",
                                       "12.4", "172", "81920", "55.0"])
    lines = gpu_profile.summary([header, units, row]).splitlines()
    assert lines[0].startswith("kernel | time [usecond] | DRAM bytes [Mbyte]")
    assert lines[1].split(" | ") == ["box_stream_kernel", "312.5", "45.1", "11.2", "40.3", "12.4",
                                     "172", "81920", "55.0"]


def test_the_shell_scripts_parse():
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(SCRIPTS / script)], check=True)
