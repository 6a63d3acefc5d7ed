"""GPU timing done one way everywhere (CLI, benchmarks, tuner): CUDA events around each call
after a warm-up, many runs, median and tail. Never time on zeros: callers pass real inputs."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .cuda_graphs import capture


def time_calls(fn: Callable[[], Any], *, iters: int = 100, warmup: int = 10) -> dict[str, float]:
    """Milliseconds per call of ``fn()``: p50, p99, mean over ``iters`` event-timed runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return {"p50_ms": times[len(times) // 2], "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))],
            "mean_ms": sum(times) / len(times)}


def time_in_cuda_graph(fn: Callable[[], Any], *, reps: int = 10, iters: int = 10) -> float:
    """Milliseconds per call of ``fn()`` as a CUDA graph replays it: ``reps`` calls captured back to
    back into one graph, the median of ``iters`` event-timed replays divided by ``reps``. This is
    how a compiled forward runs its kernels (no Python, no per-launch CPU cost), so it ranks batch-1
    kernels of a few microseconds, and a kernel pair such as split-K + its reduction, correctly.
    The captured calls run once before the capture (compiles and buffer allocations happen then)."""
    graph = capture(lambda: [fn() for _ in range(reps)])
    graph.replay()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[len(times) // 2]


# Device-memory bandwidth measured on this workplace's GPUs (a large device-to-device copy,
# bytes read plus written): the denominator of every memory floor torch_gie reports.
MEASURED_BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}
DEFAULT_BANDWIDTH = 3.0e12


def memory_bandwidth(device_name: str | None = None) -> float:
    """Bytes per second for memory floors on ``device_name`` (the current GPU by default)."""
    if device_name is None:
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((bw for key, bw in MEASURED_BANDWIDTH.items() if key in device_name), DEFAULT_BANDWIDTH)
