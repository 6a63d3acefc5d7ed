"""Buffer planning: which buffer each planned value lives in, how long each buffer lives, and
where in one arena it sits.

The allocation unit is a buffer, not a tensor: a concat's producers are channel views of the
concat's buffer (``meta["slot"]`` from ``eliminate_concat``) and share its lifetime. Lifetimes
run over the execution order; values that may alias a buffer (views, fallback results) extend
it. Offsets are chosen greedily, largest buffer first, at the lowest free address among buffers
whose lifetimes overlap (best-fit on a time x address plane).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx

ALIGN = 256  # bytes; also satisfies every dtype's alignment and 16-byte vector loads


@dataclass
class Buffer:
    index: int
    shape: tuple[int, ...]  # logical (NCHW for images)
    dtype: torch.dtype
    channels_last: bool
    first: int = 0  # execution positions between which the buffer must hold its data
    last: int = 0
    offset: int = -1  # bytes into the arena
    # A pinned buffer (a static input) gets its own zero-filled allocation instead of arena bytes:
    # it lives for the whole program, and channels a value does not cover (padding) stay zero.
    pinned: bool = False

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()

    @property
    def strides(self) -> tuple[int, ...]:
        if self.channels_last and len(self.shape) == 4:
            n, c, h, w = self.shape
            return (h * w * c, 1, w * c, c)
        strides, acc = [], 1
        for s in reversed(self.shape):
            strides.append(acc)
            acc *= s
        return tuple(reversed(strides))


@dataclass
class Placement:
    """A value's home: ``channels`` channels of ``buffer`` starting at ``channel_offset``, every
    ``channel_step``-th one (a step > 1: an input of a concat whose channels are interleaved)."""

    buffer: Buffer
    channel_offset: int
    channels: int
    channel_step: int = 1

    @property
    def is_whole(self) -> bool:
        if len(self.buffer.shape) < 2:
            return True  # scalars and vectors have no channel dim to slice
        return self.channel_offset == 0 and self.channel_step == 1 and self.channels == self.buffer.shape[1]


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def assign_offsets(buffers: Iterable[Buffer]) -> int:
    """Give every buffer an arena offset; returns the arena size in bytes."""
    placed: list[Buffer] = []
    size = 0
    for buf in sorted((b for b in buffers if not b.pinned), key=lambda b: (-b.nbytes, b.first)):
        busy = sorted((b.offset, b.offset + _align(b.nbytes)) for b in placed
                      if not (b.last < buf.first or buf.last < b.first))
        offset, need = 0, _align(buf.nbytes)
        best: int | None = None
        best_gap = None
        for start, end in busy:  # best fit among the gaps between live neighbours
            gap = start - offset
            if gap >= need and (best_gap is None or gap < best_gap):
                best, best_gap = offset, gap
            offset = max(offset, end)
        buf.offset = best if best is not None else offset
        size = max(size, buf.offset + _align(buf.nbytes))
        placed.append(buf)
    return size


def extend_lifetimes(buffers: Iterable[Buffer], order: list[fx.Node], reads: dict[fx.Node, set[int]]) -> None:
    """``reads[node]``: indices of the buffers ``node`` may read (directly or through aliases)."""
    by_index = {b.index: b for b in buffers}
    for pos, node in enumerate(order):
        for idx in reads.get(node, ()):
            buf = by_index[idx]
            buf.last = max(buf.last, pos)


def materialize(arena: torch.Tensor, placement: Placement, pinned: dict[int, torch.Tensor] | None = None
                ) -> torch.Tensor:
    """The tensor view of ``placement`` inside ``arena`` (a flat uint8 tensor), or inside its own
    allocation from ``pinned`` (buffer index -> flat uint8 tensor) for pinned buffers."""
    buf = placement.buffer
    if buf.pinned:
        flat = pinned[buf.index].view(buf.dtype)
    else:
        flat = arena[buf.offset: buf.offset + buf.nbytes].view(buf.dtype)
    whole = flat.as_strided(buf.shape, buf.strides)
    if placement.is_whole:
        return whole
    start, step = placement.channel_offset, placement.channel_step
    return whole[:, start: start + step * (placement.channels - 1) + 1: step]
