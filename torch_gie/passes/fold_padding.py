"""Fold an explicit zero pad into the conv or pool that reads it (TensorFlow-style "SAME"
padding, ``nn.ZeroPad2d`` before a stride-2 conv): ``conv(pad(x, (l, r, t, b)), p)  =>
conv(x, padding=(p + t, p + b, p + l, p + r))``, and ``pool(pad(x))  =>  pool(x)`` with the pad
as zero padding the pool reads as real zeros. The pad then costs nothing; its other consumers
(if any) keep it."""
from torch import fx

from .. import ops
from ..graph import is_canonical, spec
from .base import PassContext, PassResult


def can_fold_pad(pad_node: fx.Node, user: fx.Node) -> bool:
    """A zero pad of H and W read as the data input of a conv, or of a pool without padding of
    its own (a pool's padding is -inf for max and uncounted for avg, unlike the pad's zeros)."""
    p = spec(pad_node)
    if p.value != 0.0 or len(p.pads) != 4 or user.args[0] is not pad_node or pad_node in user.args[1:]:
        return False
    if is_canonical(user, ops.conv2d):
        return True
    return is_canonical(user, ops.pool2d) and tuple(ops.padding4(spec(user).padding)) == (0, 0, 0, 0)


def _folded(pad_node: fx.Node, user: fx.Node):
    left, right, top, bottom = spec(pad_node).pads
    s = spec(user)
    t, b, lo, r = ops.padding4(s.padding)
    padding = ops.symmetric((t + top, b + bottom, lo + left, r + right))
    if is_canonical(user, ops.pool2d):
        return ops.replace(s, padding=padding, pad_is_zeros=True)
    return ops.replace(s, padding=padding)


def fold_padding(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult()
    for node in list(gm.graph.nodes):
        if not is_canonical(node, ops.pad):
            continue
        for user in list(node.users):
            if not can_fold_pad(node, user):
                continue
            user.meta["spec"] = _folded(node, user)
            user.replace_input_with(node, node.args[0])
            result.count("folded")
            result.fusion("vertical", [node, user], user.name, what="padding")
        if not node.users:
            gm.graph.erase_node(node)
    return result
