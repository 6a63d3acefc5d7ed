"""The steps a compiled program runs, one per node of the optimized graph.

Values live in ``env``, a list indexed by node number. Planned values (``plan.placements``) are
static views into the arena, set once at build time; fallback and view results are stored in
``env`` as they are computed. Every conversion between the network precision and what PyTorch
code expects is a step of its own (``ConvertStep``), decided at build time, one per value and
boundary.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

Kernel = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], None]


class Step:
    """One node's work. ``launches`` counts the device kernels it starts per forward."""

    name: str = ""
    op: str = ""
    launches: int = 1
    node: fx.Node | None = None

    def __call__(self, env: list) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class KernelStep(Step):
    """A canonical op: its kernel reads ``inputs`` from env and stores into static ``outs``."""

    def __init__(self, node: fx.Node, kernel: Kernel, in_ids, outs: list[torch.Tensor], backend: str):
        self.node, self.name, self.op = node, node.name, node.target.__name__
        self.kernel, self.in_ids, self.outs = kernel, list(in_ids), outs
        self.backend = backend

    @property
    def launches(self) -> int:
        """Kernels per forward: a layer may say (a split-K conv launches its reduction too)."""
        return getattr(getattr(self.kernel, "layer", None), "launches", 1)

    def __call__(self, env: list) -> None:
        self.kernel([env[i] for i in self.in_ids], self.outs)


class CopyStep(Step):
    """Copies the inputs of a concat that could not be written in place into their slots."""

    def __init__(self, node: fx.Node, copies: list[tuple[int, torch.dtype | None, torch.Tensor]]):
        self.node, self.name, self.op = node, node.name, "cat_copy"
        self.copies, self.launches = copies, len(copies)

    def __call__(self, env: list) -> None:
        for src, _, dst in self.copies:
            dst.copy_(env[src])


class ViewStep(Step):
    """A view op on a value (flatten, channel slice, permute, reshape): no kernel when the result
    is a view (a reshape that needs a copy launches one, as torch.reshape does)."""

    launches = 0

    def __init__(self, node: fx.Node, fn: Callable[[torch.Tensor], torch.Tensor], in_id: int, out_id: int):
        self.node, self.name, self.op = node, node.name, node.target.__name__
        self.fn, self.in_id, self.out_id = fn, in_id, out_id

    def __call__(self, env: list) -> None:
        env[self.out_id] = self.fn(env[self.in_id])


class ConvertStep(Step):
    """A value crossing a boundary between kernels and PyTorch code: one conversion per value
    and boundary (dtype, and the layout the other side expects), shared by every consumer.
    ``Tensor.to`` returns the value itself when nothing changes, so a no-op costs nothing."""

    def __init__(self, node: fx.Node, in_id: int, out_id: int, dtype: torch.dtype,
                 memory_format: torch.memory_format):
        self.node, self.name, self.op = node, f"{node.name}.to({str(dtype)[6:]})", "convert"
        self.in_id, self.out_id, self.dtype, self.memory_format = in_id, out_id, dtype, memory_format

    def __call__(self, env: list) -> None:
        v = env[self.in_id]
        fmt = self.memory_format if isinstance(v, torch.Tensor) and v.dim() == 4 else torch.contiguous_format
        env[self.out_id] = v.to(dtype=self.dtype, memory_format=fmt) if isinstance(v, torch.Tensor) else v


class QuantConvertStep(Step):
    """A value crossing between int8 codes and real values (int8 builds): ``convert(src, out)``
    quantizes or dequantizes into ``out``, a static tensor in the value's layout allocated on the
    first call, once per value and direction, shared by every consumer."""

    def __init__(self, node: fx.Node, in_id: int, out_id: int, dtype: torch.dtype,
                 convert: Callable[[torch.Tensor, torch.Tensor], None], what: str):
        self.node, self.name, self.op = node, f"{node.name}.{what}", what
        self.in_id, self.out_id, self.dtype, self.convert = in_id, out_id, dtype, convert
        self.out: torch.Tensor | None = None

    def __call__(self, env: list) -> None:
        src = env[self.in_id]
        if self.out is None:  # first (warm-up) call, before any CUDA-graph capture
            self.out = torch.empty_like(src, dtype=self.dtype)
        self.convert(src, self.out)
        env[self.out_id] = self.out


class FallbackStep(Step):
    """Runs an original fx node with PyTorch, on the dtypes the original model used."""

    def __init__(self, node: fx.Node, fn: Callable[..., Any], in_ids: dict[fx.Node, int], out_id: int,
                 launches: int):
        self.node, self.name, self.op = node, node.name, str(node.target)
        self.fn, self.out_id, self.launches = fn, out_id, launches
        self._args = (node.args, node.kwargs)
        self._ids = in_ids  # input node -> env slot (a converted copy where the plan made one)

    def __call__(self, env: list) -> None:
        args, kwargs = fx.node.map_arg(self._args, lambda n: env[self._ids[n]])
        env[self.out_id] = self.fn(*args, **kwargs)
