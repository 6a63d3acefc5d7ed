"""Concat elimination: a channel ``cat`` gets one buffer and each producer writes its channel
slice in place, so no copy remains: ``cat([f(x), g(y)])  =>  f writes out[:, 0:c1], g writes
out[:, c1:c1+c2]``.

The pass records placements in node metadata, read by the planner:
- ``meta["slot"] = (parent, offset, step)``: this node's output lives in ``parent``'s output
  from that channel offset, every ``step``-th channel (step 2 for the inputs of a concat whose
  channels are interleaved by a channel shuffle; slots chain: nested cats compose);
- ``meta["cat_copies"]``: input positions of a cat that must still be copied (the producer is a
  graph input, a fallback op, or already placed elsewhere).
Cats are visited last-to-first, so an outer cat claims its producers before inner ones; a cat
whose inputs already sit side by side in one buffer (DenseNet's growing prefixes) becomes a pure
view of that buffer.
"""
from torch import fx

from .. import ops
from ..graph import cat_input_slot, is_canonical, slot_root, spec
from .base import PassContext, PassResult

_IN_PLACE_OPS = (ops.conv2d, ops.linear, ops.affine, ops.add, ops.mul, ops.activation, ops.pool2d,
                 ops.adaptive_pool2d, ops.cat, ops.layer_norm, ops.pad, ops.channel_shuffle)


def is_segment(node: fx.Node) -> bool:
    return "segment_of" in node.meta


def can_write_in_place(node: fx.Node) -> bool:
    """The producer's kernel can store through a strided channel view of another buffer."""
    if "slot" in node.meta:
        return False
    if is_segment(node):
        return True
    if not is_canonical(node) or node.target not in _IN_PLACE_OPS:
        return False
    return getattr(node.meta["spec"], "out_splits", None) is None


def _alias_target(cat: fx.Node):
    """If every input already sits in one buffer, side by side and in order, the region they
    cover as (root, offset); else None."""
    ins = list(cat.args)
    if "slot" in cat.meta or spec(cat).interleave != 1 or not all("slot" in n.meta for n in ins):
        return None
    root, start, _ = slot_root(ins[0])
    offset = start
    for n in ins:
        r, o, step = slot_root(n)
        if r is not root or o != offset or step != 1:
            return None
        offset += n.meta["shape"][1]
    return root, start


def eliminate_concat(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult()
    cats = [n for n in gm.graph.nodes if is_canonical(n, ops.cat)]
    for cat in reversed(cats):
        alias = _alias_target(cat)
        if alias is not None:
            cat.meta["slot"] = (*alias, 1)
            cat.meta["cat_copies"] = []
            result.count("eliminated")
            result.fusion("concat", list(cat.args) + [cat], alias[0].name, how="view of existing buffer")
            continue
        copies, placed = [], []
        for i, producer in enumerate(cat.args):
            if producer not in cat.args[:i] and can_write_in_place(producer):
                producer.meta["slot"] = cat_input_slot(cat, i)
                placed.append(producer)
            else:
                copies.append(i)
        cat.meta["cat_copies"] = copies
        result.count("copies", len(copies))
        if not copies:
            result.count("eliminated")
        result.fusion("concat", placed + [cat], cat.name, copies=len(copies))
    return result
