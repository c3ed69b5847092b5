"""The README's Python examples run as written, with small inputs bound to the names they take
as given."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

from gvsl_fast.models import UNet3D

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 2, "a README example was added or removed: bind its inputs here"
    monkeypatch.chdir(tmp_path)
    UNet3D(down=(8, 16, 16, 16, 32), up=(16, 16, 16, 8)).save_pretrained("backbone.pt")
    torch.manual_seed(0)
    size = (1, 1, 10, 11, 12)
    given = {
        "warped": torch.rand(size), "fixed": torch.rand(size), "image": torch.rand(size),
        "flow": torch.randn(1, 3, *size[2:]), "theta": torch.eye(3, 4)[None],
        "x": torch.rand(size), "grid": torch.rand(1, *size[2:], 3) * 2 - 1, "n_classes": 3,
    }
    kernels, finetune = dict(given), dict(given)
    exec(compile(blocks[0], "README.md (using the kernels)", "exec"), kernels)
    assert kernels["loss"].shape == () and kernels["out"].shape == size
    exec(compile(blocks[1], "README.md (fine-tuning)", "exec"), finetune)
    assert finetune["logits"].shape == (1, 3, *size[2:])


def test_benchmark_suite_collects_from_any_folder(tmp_path):
    """`pytest benchmarks/ --benchmark-only` (README, DESIGN) collects every benchmark when the
    repository is not on sys.path, as with the plain `pytest` command: a benchmark importing
    `benchmarks.conftest` once stopped the whole suite at collection."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(README.parent / "benchmarks"), "--benchmark-only",
         "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^\d+ tests collected", done.stdout, re.M), done.stdout[-1000:]
