"""Absorb an activation into the elementwise op before it (a BatchNorm that could not be
folded, an add that could not become a residual, a multiply): ``act(x * s + t)``, ``act(a + b)``
and ``act(a * b)`` become one kernel instead of two passes over the tensor."""
from torch import fx

from .. import ops
from ..graph import is_canonical, spec
from .base import PassContext, PassResult, replace_node, sole_user


def fuse_elementwise_activation(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult()
    for node in list(gm.graph.nodes):
        if not (is_canonical(node, ops.affine) or is_canonical(node, ops.add) or is_canonical(node, ops.mul)):
            continue
        user = sole_user(node)
        if user is None or not is_canonical(user, ops.activation) or spec(node).activation is not None:
            continue
        act = spec(user)
        if act.slope is not None and not is_canonical(node, ops.affine):
            continue  # an add or mul has no per-channel slope to carry a PReLU
        updates = {"activation": act.act} | ({"act_slope": act.slope} if act.slope is not None else {})
        node.meta["spec"] = ops.replace(spec(node), **updates)
        result.fusion("vertical", [node, user], node.name, epilogue=str(act.act))
        replace_node(user, node)
        result.count("fused_ops")
    return result
