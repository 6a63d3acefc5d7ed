"""Helpers over the torch_gie graph: a ``torch.fx.GraphModule`` whose canonical nodes call
``torch_gie.ops`` functions (attributes in ``node.meta["spec"]``) and whose other nodes are the
original fx nodes, kept as fallbacks that run the user's PyTorch code.

Every tensor-valued node carries ``node.meta["shape"]`` and ``node.meta["dtype"]`` from shape
propagation on the example inputs.
"""
from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

from . import ops

# Python-level plumbing that reads attributes or indexes containers: not a kernel launch.
_FREE_FUNCTIONS = {operator.getitem, getattr, torch._assert, len}
_FREE_METHODS = {"size", "dim"}


def is_canonical(node: fx.Node, op=None) -> bool:
    """True when ``node`` is a canonical torch_gie op (of kind ``op`` if given)."""
    if node.op != "call_function" or node.target not in ops.CANONICAL_OPS:
        return False
    return op is None or node.target is op


def spec(node: fx.Node):
    return node.meta["spec"]


def is_fallback_compute(node: fx.Node) -> bool:
    """A node PyTorch executes because no canonical op covers it and that produces tensors
    (Python arithmetic on sizes is not a kernel)."""
    if not node.meta.get("tensor_valued", False):
        return False
    if node.op == "call_module":
        return True
    if node.op == "call_function":
        if node.target is operator.getitem:  # free unless it indexes by a tensor (a gather)
            return any(isinstance(a, fx.Node) and "shape" in a.meta for a in _flat(node.args[1:]))
        return node.target not in ops.CANONICAL_OPS and node.target not in _FREE_FUNCTIONS
    if node.op == "call_method":
        return node.target not in _FREE_METHODS
    return False


def _flat(args) -> list:
    out = []
    for a in args:
        out += _flat(a) if isinstance(a, (tuple, list)) else [a]
    return out


def is_compute(node: fx.Node) -> bool:
    return is_canonical(node) or is_fallback_compute(node)


def has_tensor_meta(node: fx.Node) -> bool:
    return "shape" in node.meta


def shape(node: fx.Node) -> tuple[int, ...]:
    return node.meta["shape"]


def channels(node: fx.Node) -> int:
    return node.meta["shape"][1]


def set_tensor_meta(node: fx.Node, like: fx.Node | None = None, *, shape_=None, dtype=None) -> None:
    node.meta["shape"] = tuple(shape_ if shape_ is not None else like.meta["shape"])
    node.meta["dtype"] = dtype if dtype is not None else like.meta["dtype"]


def slot_root(node: fx.Node) -> tuple[fx.Node, int, int]:
    """Where ``node``'s output lives: (the node owning the buffer, first channel in it, channel
    step), following the concat slots ``(parent, offset, step)`` set by ``eliminate_concat``.
    Nested slots compose: channel j of a slot is channel ``offset + step * j`` of its parent."""
    offset, step = 0, 1
    while "slot" in node.meta:
        node, off, st = node.meta["slot"]
        offset, step = off + st * offset, st * step
    return node, offset, step


def cat_input_slot(cat: fx.Node, i: int) -> tuple[fx.Node, int, int]:
    """(cat, first channel, channel step) of the i-th input of a channel concat in its output
    (an interleaved concat, a channel shuffle of the concat, puts input i at i, i + g, ...)."""
    interleave = cat.meta["spec"].interleave
    if interleave > 1:
        return cat, i, interleave
    return cat, sum(a.meta["shape"][1] for a in cat.args[:i]), 1


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes]


def target_name(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    """A short human-readable name of what a node runs (for reports)."""
    if node.op == "call_module" and gm is not None:
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    return getattr(target, "__name__", str(target))


class GraphRunner(fx.Interpreter):
    """Runs a torch_gie graph with PyTorch: canonical ops through their reference
    implementation, fallbacks as recorded. The oracle every pass is tested against."""

    def run_node(self, n: fx.Node) -> Any:
        if is_canonical(n):
            args, _ = self.fetch_args_kwargs_from_env(n)
            return n.target(n.meta["spec"], *args)
        return super().run_node(n)


@torch.no_grad()
def run_graph(gm: fx.GraphModule, *inputs: torch.Tensor) -> Any:
    return GraphRunner(gm).run(*inputs)


def users_of(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    out: set[fx.Node] = set()
    for n in nodes:
        out.update(n.users)
    return out
