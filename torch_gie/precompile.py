"""Compile a build's Triton kernels in parallel threads before the build launches them.

A build launches every layer once (and the tuner every candidate config of the layers it times).
Each new kernel specialization is compiled by Triton on its first launch: 0.5 to 1.6 s for a
conv, one after another, so a cold ResNet-50 build or load spends most of its time compiling,
and a retune of a 60-layer network several minutes. Triton's compiler releases the GIL, so this
pass first compiles what those launches will need on a thread pool: every layer that supports it
(``supports_compile_only``) runs its launch code under ``kernels.launch.compile_only(config)``
for each config it is about to run, which compiles the kernel with the exact arguments of the
later launch and runs nothing. The launches then find their kernels in Triton's cache.

Best effort by design: a job that fails is logged and left for the real launch to compile (and
report) as it would without this pass, and nothing here changes a layer's state. CUDA only;
Triton's CPU interpreter compiles nothing and is not thread-safe.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .kernels.launch import compile_only
from .runtime.steps import KernelStep

log = logging.getLogger(__name__)

ENV_THREADS = "TORCH_GIE_COMPILE_THREADS"  # threads for the pass ("auto": one per core); 0, 1: off
# On by default since its H200 run (benchmarks/NOTES.md 35): a cold ResNet-50 build compiled its
# 53 conv launches in 8.1 s on 16 threads; its warm-up took 10.7 s where the serial one took 18.0.
DEFAULT_THREADS = min(16, os.cpu_count() or 1)


def compile_threads() -> int:
    """Threads for the pass: $TORCH_GIE_COMPILE_THREADS (an integer, or "auto" for one per CPU
    core, at most 32), else DEFAULT_THREADS (one per core, at most 16)."""
    value = os.environ.get(ENV_THREADS)
    if value is None:
        return DEFAULT_THREADS
    if value.strip().lower() == "auto":
        return min(32, os.cpu_count() or 1)
    try:
        return max(0, int(value))
    except ValueError:
        log.warning("torch_gie: ignoring %s=%r (expected an integer or 'auto')", ENV_THREADS, value)
        return DEFAULT_THREADS


def _on(device: torch.device):
    """Make ``device`` current in this thread (a thread starts on GPU 0)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") \
        and compile_threads() > 1


def precompile(steps: Sequence, env: list, configs_for: Callable[[KernelStep], list[dict]],
               device: torch.device) -> int:
    """Compile, in parallel, what each supporting kernel step will launch with each config of
    ``configs_for(step)``; returns the number of jobs that compiled (or found) their kernels."""
    jobs = []
    for step in steps:
        layer = getattr(getattr(step, "kernel", None), "layer", None)
        if isinstance(step, KernelStep) and getattr(layer, "supports_compile_only", False):
            try:
                jobs += [(step, config) for config in configs_for(step)]
            except Exception as exc:  # e.g. an input a fallback step fills only when it runs
                log.debug("precompile: skipping %s: %s", step.name, exc)
    if not jobs:
        return 0

    failures: list[str] = []

    def run(job) -> bool:
        step, config = job
        try:
            with _on(device), compile_only(config):
                step(env)
                if device.type == "cuda":
                    # A launch that only compiles may still prepare a layer's operand (the stem's
                    # channel-padded weight) with a copy on this thread's stream; finish it before
                    # the build's own stream can read that operand.
                    torch.cuda.current_stream(device).synchronize()
            return True
        except Exception as exc:  # the real launch compiles it again and reports what failed
            failures.append(f"{step.name} with {config}: {type(exc).__name__}: {exc}")
            log.debug("precompile: %s", failures[-1])
            return False

    start = time.perf_counter()
    first = run(jobs[0])  # Triton's lazy one-time set-up (driver, launcher) happens once, here
    with ThreadPoolExecutor(compile_threads(), thread_name_prefix="torch_gie_compile") as pool:
        done = int(first) + sum(pool.map(run, jobs[1:]))
    log.info("torch_gie: compiled %d of %d kernel launches in %.1f s on %d threads%s", done, len(jobs),
             time.perf_counter() - start, compile_threads(),
             f" ({len(failures)} left to their launch; the first: {failures[0][:300]})" if failures else "")
    return done
