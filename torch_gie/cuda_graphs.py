"""CUDA graph capture done one way for the runtime, the tuner and the profiler: run the work once
on a side stream (so lazy set-up, e.g. a Triton compile or a workspace allocation, happens outside
the capture), then record it into a graph."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def capture(fn: Callable[[], Any]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``fn()``'s kernels, after one warm-up call on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
