"""What every rewrite pass takes and returns, and the helpers they share.

A pass is ``def verb_object(gm: fx.GraphModule, ctx: PassContext) -> PassResult``: it rewrites
``gm.graph`` in place and returns what it did (counts, and the fusions for the report).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx


@dataclass
class PassContext:
    """Options the passes read (``enabled`` switches passes off by name) and where to dump graphs."""

    disabled: frozenset[str] = frozenset()
    dump_dir: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassResult:
    name: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    fusions: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def fusion(self, kind: str, nodes: list[fx.Node], into: str, **extra) -> None:
        """Record that ``nodes`` (by their original names) became ``into``."""
        names = [n.meta.get("source", n.name) if isinstance(n, fx.Node) else str(n) for n in nodes]
        self.fusions.append({"kind": kind, "nodes": names, "into": into, "pass": self.name, **extra})


def sole_user(node: fx.Node) -> fx.Node | None:
    """The one node that uses ``node``, or None when it has zero or several users."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def replace_node(old: fx.Node, new: fx.Node) -> None:
    """Point every user of ``old`` at ``new`` and erase ``old``."""
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)
