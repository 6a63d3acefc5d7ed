"""Exceptions torch_gie raises on purpose, so users can tell a model we cannot compile
(``CompileError``) or a build that ran out of memory (``OutOfMemoryError``) from a bug in
torch_gie (anything else); and ``build_step``, which names the build step an out-of-memory
failure happened in."""
from __future__ import annotations

import gc
import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class CompileError(RuntimeError):
    """The model cannot be compiled; the message names the cause and, where possible, a fix."""


class OutOfMemoryError(CompileError, torch.OutOfMemoryError):
    """A build ran out of memory. ``step`` names what the build was doing ("allocating the
    activation arena", "packing weights of layer conv1", "tuning layer layer1_0_conv1",
    "capturing the CUDA graph"), ``nbytes`` the size of the allocation that failed (None when
    neither torch_gie nor the allocator's message knows it). Also a ``torch.OutOfMemoryError``,
    so code that already catches that keeps working. Everything the failed build had allocated
    is released before this reaches the caller (``release_failed_build``)."""

    def __init__(self, step: str, nbytes: int | None, detail: str = ""):
        asked = f"{nbytes} bytes ({nbytes / 2**20:.1f} MiB)" if nbytes is not None else "an unknown size"
        super().__init__(f"torch_gie ran out of memory while {step}: asked for {asked}. "
                         f"Free memory or build for a smaller batch (batch size or batch_range max). "
                         f"Allocator said: {detail.strip() or 'nothing'}")
        self.step, self.nbytes, self.detail = step, nbytes, detail


_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def requested_bytes(message: str) -> int | None:
    """The allocation size an allocator's out-of-memory message names: CUDA's caching allocator
    says "Tried to allocate 2.00 GiB", the CPU allocator "you tried to allocate 1024 bytes"."""
    cuda = re.search(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB)", message)
    if cuda:
        return round(float(cuda.group(1)) * _UNITS[cuda.group(2)])
    cpu = re.search(r"tried to allocate (\d+) bytes", message)
    return int(cpu.group(1)) if cpu else None


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's (a plain RuntimeError)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def out_of_memory_in(exc: BaseException) -> BaseException | None:
    """The out-of-memory error ``exc`` is or wraps (torch.fx's ShapeProp, for one, re-raises a
    failure as a RuntimeError whose cause is the original), else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if is_out_of_memory(exc):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def build_step(step: str, nbytes: int | None = None) -> Iterator[None]:
    """Turn an out-of-memory failure inside the block into ``OutOfMemoryError(step, nbytes)``
    (``nbytes`` defaults to what the allocator's message names). The innermost step wins: an
    error already named passes through unchanged."""
    try:
        yield
    except OutOfMemoryError:
        raise
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise OutOfMemoryError(step, nbytes if nbytes is not None else requested_bytes(str(exc)), str(exc)) from exc


def release_failed_build(exc: BaseException) -> None:
    """Free what a failed build allocated, now rather than when the exception dies.

    The exception's traceback holds the frames of the build functions, and their locals hold the
    partial engine (the arena, packed weights, the model's copy): a caller keeping the exception
    (``pytest.raises``, a logged ``sys.exc_info()``) would keep all of it on the GPU. Clearing
    the finished frames drops those references (the frames keep their line numbers, so the
    traceback still reads); a collection then frees the graph's reference cycles."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
    gc.collect()
