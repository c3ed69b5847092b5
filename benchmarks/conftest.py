"""Shared measurement helpers for the pytest-benchmark suite (DESIGN §7).

On the GPU every timed call ends with a synchronize and inputs rotate over sets larger than L2;
each benchmark stores shape, dtype, backend, device, bytes moved, achieved GB/s and its ratio to
baselines timed in the same run in ``benchmark.extra_info``. With ``--kernel-profile`` it also
stores where a step's time goes (``extra_info["kernels"]``: torch.profiler's CUDA kernels on the
GPU, operators on the CPU), to see which kernel keeps an op from its floor.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device, warmup: int = 1, reps: int = 5) -> float:
    """Median seconds of ``fn()`` (CUDA events on the GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


_KERNEL_PROFILE = False


def pytest_addoption(parser) -> None:
    parser.addoption("--kernel-profile", action="store_true",
                     help="record each timed step's per-kernel time in extra_info['kernels']")


def pytest_configure(config) -> None:
    global _KERNEL_PROFILE
    _KERNEL_PROFILE = config.getoption("--kernel-profile")


def run_benchmark(benchmark, fn: Callable[[], object], device, rounds: int = 5,
                  warmup: int = 1) -> float:
    """Time ``fn`` with pytest-benchmark (synchronized on the GPU); returns the median seconds."""

    def call():
        fn()
        sync(device)

    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup)
    if _KERNEL_PROFILE:
        benchmark.extra_info["kernels"] = kernel_breakdown(call, device)
    return benchmark.stats.stats.median


def kernel_breakdown(call: Callable[[], object], device, steps: int = 3,
                     top: int = 12) -> list[dict]:
    """The ``top`` CUDA kernels (GPU) or operators (CPU, self time) of ``call`` by time per step,
    from torch.profiler over ``steps`` calls: name, calls and microseconds per step, share."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            call()
    rows = []
    for e in prof.key_averages():
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            rows.append((us / steps, e.count / steps, e.key))
    total = sum(r[0] for r in rows) or 1.0
    rows.sort(reverse=True)
    return [{"name": name[:120], "calls": round(calls, 2), "us": round(us, 1),
             "share": round(us / total, 3)} for us, calls, name in rows[:top]]


def record(benchmark, *, seconds: float, shape, dtype, backend: str, device, bytes_moved: int,
           baselines: dict[str, float] | None = None, floor_seconds: float | None = None,
           per: str = "call") -> None:
    """Fill ``extra_info``: ``median_s_per_<per>`` (``seconds``, for one ``per``: the timed call,
    or a sample or step of it), achieved GB/s (where ``bytes_moved`` counts) and ratios
    ``baseline_time / seconds``."""
    info = benchmark.extra_info
    info.update(shape=list(shape), dtype=str(dtype).replace("torch.", ""), backend=backend,
                device=device_name(device), **{f"median_s_per_{per}": seconds})
    if bytes_moved:
        info.update(bytes_moved=int(bytes_moved), gbps=round(bytes_moved / seconds / 1e9, 2))
    if floor_seconds is not None:
        info["floor_s"] = floor_seconds
        info["x_of_floor"] = round(seconds / floor_seconds, 2)
    for name, t in (baselines or {}).items():
        info[f"{name}_s"] = t
        info[f"speedup_vs_{name}"] = round(t / seconds, 2)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's table
def pytest_terminal_summary(terminalreporter, config) -> None:
    """The figures each benchmark recorded (GB/s, floor, speed-ups, memory), which pytest-benchmark
    keeps in its JSON (--benchmark-json) but does not print."""
    session = getattr(config, "_benchmarksession", None)
    done = [b for b in getattr(session, "benchmarks", []) if b.extra_info]
    if not done:
        return
    terminalreporter.section("gvsl-fast: recorded figures (benchmark.extra_info)")
    for b in done:
        figures = {k: v for k, v in b.extra_info.items()
                   if k not in ("shape", "dtype", "device", "kernels", "bytes_moved")}
        terminalreporter.write_line(f"{b.name}: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


def device_name(device) -> str:
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    return f"cpu ({torch.get_num_threads()} threads)"


@pytest.fixture
def cpu_extension():
    """Skips, saying why, where the CPU kernels (gvsl_fast._C) are not built."""
    from gvsl_fast.ops import _backend

    if _backend.extension_error():
        pytest.skip(_backend.extension_error())


@pytest.fixture
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")
