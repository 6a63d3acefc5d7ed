"""Kernel launches that can compile instead of run: what lets a build compile the kernels it is
about to launch in parallel threads (``torch_gie.precompile``) before launching them one by one.

Triton compiles a kernel on its first launch with a new specialization, and a build launches
hundreds (every layer's default config, and every candidate the tuner times), one after another.
Triton's compiler releases the GIL, so threads compile in parallel. A thread inside
``compile_only(config)`` makes a layer that supports it (``supports_compile_only``) take
``config`` instead of its own, without touching the layer's state, and ``launch`` then only
compiles (``JITFunction.warmup``). The later real launch, with the same arguments, finds the
compiled kernel in Triton's cache. The state is thread-local: other threads launch as usual.
"""
from __future__ import annotations

import contextlib
import threading

_state = threading.local()


@contextlib.contextmanager
def compile_only(config: dict | None):
    """In this thread: kernel launches compile without running, and layers that support it use
    ``config`` (None: their own)."""
    _state.active, _state.config = True, config
    try:
        yield
    finally:
        _state.active, _state.config = False, None


def compiling_only() -> bool:
    return getattr(_state, "active", False)


def config_override() -> dict | None:
    """The config ``compile_only`` set for this thread, else None."""
    return getattr(_state, "config", None) if compiling_only() else None


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or only its compilation inside ``compile_only``."""
    if compiling_only():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)
