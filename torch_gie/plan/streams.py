"""Streams for independent branches, and what that means for memory reuse.

Branches with no path between them (the four arms of an Inception block, a ResNet block's
downsample) go to different CUDA streams; a node waits only for the nodes it reads from
(events), so inside the CUDA graph capture they become parallel graph branches.

Concurrency breaks the plain liveness argument (a buffer freed at step t could be reused by a
step that overlaps the last reader of t), so with streams every buffer's lifetime is widened to
the *region* around it: regions are separated by cuts where a single value is live, and all
work after such a cut depends on all work before it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

MAX_STREAMS = 4


@dataclass
class StreamPlan:
    stream: dict[fx.Node, int] = field(default_factory=dict)  # launching node -> stream index
    waits: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)  # cross-stream dependencies
    streams: int = 1


def launch_dependencies(order: list[fx.Node], launches: set[fx.Node]) -> dict[fx.Node, set[fx.Node]]:
    """For each launching node, the nearest launching nodes it reads from (through views,
    segments and eliminated concats, which launch nothing)."""
    nearest: dict[fx.Node, set[fx.Node]] = {}
    for node in order:
        preds: set[fx.Node] = set()
        for i in node.all_input_nodes:
            preds |= {i} if i in launches else nearest.get(i, set())
        nearest[node] = preds
    return {n: nearest[n] for n in order if n in launches}


def assign_streams(order: list[fx.Node], launches: set[fx.Node], max_streams: int = MAX_STREAMS,
                   pinned: set[fx.Node] = frozenset()) -> StreamPlan:
    """``pinned`` nodes (PyTorch fallbacks) always go to stream 0."""
    deps = launch_dependencies(order, launches | set(pinned))
    plan = StreamPlan()
    tail: dict[int, fx.Node] = {}  # last node issued on each stream
    for node in order:
        if node not in launches and node not in pinned:
            continue
        if node in pinned:
            plan.stream[node] = 0
            plan.waits[node] = [p for p in deps[node] if plan.stream[p] != 0]
            tail[0] = node
            continue
        # Continue a stream whose last node we depend on, so chains stay on one stream.
        stream = next((plan.stream[p] for p in sorted(deps[node], key=order.index)
                       if tail.get(plan.stream[p]) is p), None)
        if stream is None:
            free = [s for s in range(max_streams) if s not in tail]
            stream = free[0] if free else min(tail, key=lambda s: order.index(tail[s]))
        plan.stream[node] = stream
        plan.waits[node] = [p for p in deps[node] if plan.stream[p] != stream]
        tail[stream] = node
    plan.streams = max(plan.stream.values(), default=0) + 1
    return plan


def region_bounds(order: list[fx.Node]) -> list[tuple[int, int]]:
    """Per position, the (start, end) of the region around it; a region ends at a cut after
    which exactly one value produced before it is still needed."""
    pos = {n: i for i, n in enumerate(order)}
    crossing = [0] * (len(order) + 1)
    for node in order:
        uses = [pos[u] for u in node.users if u in pos]
        last = max(uses, default=pos[node])
        if node.op == "get_attr" or last == pos[node]:
            continue
        crossing[pos[node]] += 1  # live across boundaries pos[node] .. last-1
        crossing[last] -= 1
    bounds, start, live = [], 0, 0
    for p in range(len(order)):
        live += crossing[p]
        bounds.append(start)
        if live <= 1:
            start = p + 1
    ends, end = [0] * len(order), len(order) - 1
    for p in range(len(order) - 1, -1, -1):
        if p < len(order) - 1 and bounds[p + 1] == p + 1:
            end = p
        ends[p] = end
    return [(bounds[p], ends[p]) for p in range(len(order))]
