"""Vertical fusion ("CBR"): absorb into a conv (or linear) what follows it, so one kernel
computes it with a single store:
``act2(act1(conv(x) + b) + r)``  from  ``conv -> act1 -> add(r) -> act2``.
The absorbed node's input must have no other consumer. Linear layers fuse the same way (a
transformer MLP's last projection takes the residual stream)."""

from torch import fx

from .. import ops
from ..graph import is_canonical, spec
from .base import PassContext, PassResult, replace_node, sole_user


def can_absorb_activation(node: fx.Node, act_node: fx.Node) -> bool:
    """The activation has a free slot (before or after the residual) and, for a PReLU, the op
    has no slope yet (one per-channel slope vector per epilogue)."""
    ep = spec(node).epilogue
    if ep.post_activation is not None or not (ep.residual or ep.activation is None):
        return False
    return spec(act_node).slope is None or spec(node).act_slope is None


def residual_operand(node: fx.Node, add_node: fx.Node) -> fx.Node | None:
    """The other operand of ``add_node`` when ``node`` may take it as its residual input."""
    a, b = add_node.args
    other = b if a is node else a
    if other is node or spec(add_node).activation is not None:
        return None
    # A broadcast add (a per-channel or pooled operand) is no residual: the epilogue reads one
    # value per output element.
    if not (node.meta["shape"] == other.meta.get("shape") == add_node.meta["shape"]):
        return None
    return other


def _absorb_activation(node: fx.Node, act_node: fx.Node) -> None:
    ep, act = spec(node).epilogue, spec(act_node)
    new_ep = ops.replace(ep, post_activation=act.act) if ep.residual else ops.replace(ep, activation=act.act)
    slope = {"act_slope": act.slope} if act.slope is not None else {}
    node.meta["spec"] = ops.replace(spec(node), epilogue=new_ep, **slope)
    replace_node(act_node, node)


def _absorb_residual(node: fx.Node, add_node: fx.Node, other: fx.Node) -> fx.Node:
    """Rebuild ``node`` at the add's position (its residual may be computed after ``node``)."""
    graph = node.graph
    with graph.inserting_before(add_node):
        fused = graph.create_node("call_function", node.target, (*node.args, other), {}, name=node.name)
    fused.meta.update(node.meta)
    fused.meta["spec"] = ops.replace(spec(node), epilogue=ops.replace(spec(node).epilogue, residual=True))
    fused.meta["shape"], fused.meta["dtype"] = add_node.meta["shape"], add_node.meta["dtype"]
    add_node.replace_all_uses_with(fused)
    graph.erase_node(add_node)
    graph.erase_node(node)
    return fused


def fuse_conv_epilogue(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult()
    for node in list(gm.graph.nodes):
        if not (is_canonical(node, ops.conv2d) or is_canonical(node, ops.linear)) or spec(node).epilogue.residual:
            continue
        absorbed = [node]
        while (user := sole_user(node)) is not None:
            ep = spec(node).epilogue
            if is_canonical(user, ops.activation) and can_absorb_activation(node, user):
                absorbed.append(user)
                _absorb_activation(node, user)
            elif is_canonical(user, ops.add) and not ep.residual and ep.post_activation is None \
                    and (other := residual_operand(node, user)) is not None:
                absorbed.append(user)
                node = _absorb_residual(node, user, other)
            else:
                break
        if len(absorbed) > 1:
            result.count("fused_ops", len(absorbed) - 1)
            result.fusion("vertical", absorbed, node.name, epilogue=spec(node).epilogue.describe())
    return result
