"""The steps a compiled program runs, one per node of the optimized graph.

Values live in ``env``, a list indexed by node number. Planned values (``plan.placements``) are
static views into the arena, set once at build time; fallback and view results are stored in
``env`` as they are computed. Every cast a step does is decided at build time.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

Kernel = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], None]


def _fetch(env: list, ids: Sequence[int], casts: Sequence[torch.dtype | None]) -> list[torch.Tensor]:
    return [env[i] if c is None else env[i].to(c) for i, c in zip(ids, casts)]


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

    def __init__(self, node: fx.Node, kernel: Kernel, in_ids, casts, outs: list[torch.Tensor], backend: str):
        self.node, self.name, self.op = node, node.name, node.target.__name__
        self.kernel, self.in_ids, self.casts, self.outs = kernel, list(in_ids), list(casts), outs
        self.backend = backend

    @property
    def launches(self) -> int:
        """Kernels per forward: a layer may say (a split-K conv launches its reduction too)."""
        return getattr(getattr(self.kernel, "layer", None), "launches", 1)

    def __call__(self, env: list) -> None:
        self.kernel(_fetch(env, self.in_ids, self.casts), self.outs)


class CopyStep(Step):
    """Copies the inputs of a concat that could not be written in place into their slots."""

    def __init__(self, node: fx.Node, copies: list[tuple[int, torch.dtype | None, torch.Tensor]]):
        self.node, self.name, self.op = node, node.name, "cat_copy"
        self.copies, self.launches = copies, len(copies)

    def __call__(self, env: list) -> None:
        for src, _, dst in self.copies:
            dst.copy_(env[src])


class ViewStep(Step):
    """A reshape-like op on a value (flatten): no kernel when the result is a view."""

    launches = 0

    def __init__(self, node: fx.Node, fn: Callable[[torch.Tensor], torch.Tensor], in_id: int, out_id: int):
        self.node, self.name, self.op = node, node.name, node.target.__name__
        self.fn, self.in_id, self.out_id = fn, in_id, out_id

    def __call__(self, env: list) -> None:
        env[self.out_id] = self.fn(env[self.in_id])


class FallbackStep(Step):
    """Runs an original fx node with PyTorch, on the dtypes the original model used."""

    def __init__(self, node: fx.Node, fn: Callable[..., Any], ids: dict[fx.Node, int],
                 casts: dict[fx.Node, torch.dtype], out_id: int, launches: int):
        self.node, self.name, self.op = node, node.name, str(node.target)
        self.fn, self.out_id, self.launches = fn, out_id, launches
        self._args = (node.args, node.kwargs)
        self._ids, self._casts = ids, casts

    def _value(self, env: list, n: fx.Node):
        v = env[self._ids[n]]
        c = self._casts.get(n)
        return v if c is None else v.to(c)

    def __call__(self, env: list) -> None:
        args, kwargs = fx.node.map_arg(self._args, lambda n: self._value(env, n))
        env[self.out_id] = self.fn(*args, **kwargs)
