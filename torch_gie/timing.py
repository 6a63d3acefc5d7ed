"""GPU timing done one way everywhere (CLI, benchmarks, tuner): CUDA events around each call
after a warm-up, many runs, median and tail. Never time on zeros: callers pass real inputs."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


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
