"""Squeeze-and-excitation as one op: the global average pool and the two small layers that
turn it into a per-(image, channel) gate become ``squeeze_excitation(x)``, whose kernel runs the
excitation of all images in one small launch after one pass of spatial sums:

``act2(fc2(act1(fc1(mean_hw(x)))))  =>  squeeze_excitation(x)``  (an (N, C, 1, 1) gate),

with fc1/fc2 as 1x1 convs on (N, C, 1, 1) (torchvision's SqueezeExcitation) or as Linear layers
on (N, C) (then the gate's reshape to (N, C, 1, 1) is absorbed too). The gate's multiply is
left to ``fold_gate_into_conv``.
"""
from torch import fx

from .. import ops
from ..graph import is_canonical, spec
from .base import PassContext, PassResult, sole_user


def _is_global_avg_pool(node: fx.Node) -> bool:
    return is_canonical(node, ops.adaptive_pool2d) and spec(node).kind == "avg" \
        and tuple(spec(node).output_size) == (1, 1)


def _as_matrix(layer: fx.Node):
    """(weight [out, in], bias, activation) of a 1x1 conv or a Linear usable as one SE layer."""
    if not (is_canonical(layer, ops.conv2d) or is_canonical(layer, ops.linear)):
        return None
    s = spec(layer)
    ep = s.epilogue
    if ep.residual or ep.post_activation is not None or s.act_slope is not None:
        return None
    if is_canonical(layer, ops.conv2d):
        if s.weight.shape[2:] != (1, 1) or s.groups != 1 or s.out_splits or s.input_gate \
                or tuple(ops.padding4(s.padding)) != (0, 0, 0, 0) or len(layer.args) != 1:
            return None
        return s.weight[:, :, 0, 0], s.bias, ep.activation
    if is_canonical(layer, ops.linear) and len(layer.args) == 1 and len(layer.meta["shape"]) == 2:
        return s.weight, s.bias, ep.activation
    return None


def _match(pool: fx.Node):
    """(fc1, fc2, last node of the pattern) following ``pool``, or None."""
    nodes = [pool]
    nxt = sole_user(pool)
    if nxt is not None and (is_canonical(nxt, ops.flatten) or is_canonical(nxt, ops.reshape)) \
            and len(nxt.meta["shape"]) == 2:
        nodes.append(nxt)
        nxt = sole_user(nxt)
    layers = []
    for _ in range(2):
        if nxt is None or _as_matrix(nxt) is None:
            return None
        layers.append(nxt)
        nodes.append(nxt)
        nxt = sole_user(nxt) if len(nxt.users) == 1 else None
    last = layers[-1]
    n, c = pool.args[0].meta["shape"][:2]
    if len(last.meta["shape"]) == 2 and nxt is not None and is_canonical(nxt, ops.reshape) \
            and tuple(nxt.meta["shape"]) == (n, c, 1, 1):
        last = nxt  # the Linear form's view back to (N, C, 1, 1)
    return layers[0], layers[1], last


def fuse_squeeze_excitation(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult()
    graph = gm.graph
    for pool in list(graph.nodes):
        if pool._erased or not _is_global_avg_pool(pool):
            continue
        match = _match(pool)
        if match is None:
            continue
        fc1, fc2, last = match
        (w1, b1, act1), (w2, b2, act2) = _as_matrix(fc1), _as_matrix(fc2)
        x = pool.args[0]
        n, c = x.meta["shape"][:2]
        if w1.shape[1] != c or w2.shape[0] != c:
            continue
        with graph.inserting_before(last):
            se = graph.create_node("call_function", ops.squeeze_excitation, (x,), {}, name=f"se_{pool.name}")
            se.meta.update(spec=ops.SqueezeExcitationSpec(w1, b1, act1, w2, b2, act2), shape=(n, c, 1, 1),
                           dtype=last.meta["dtype"], source=pool.meta.get("source", pool.name))
            out = se
            if len(last.meta["shape"]) == 2:  # the pattern's result was the (N, C) gate
                out = graph.create_node("call_function", ops.reshape, (se,), {}, name=f"{se.name}_flat")
                out.meta.update(spec=ops.ReshapeSpec((n, c)), shape=(n, c), dtype=last.meta["dtype"])
        chain = _chain(pool, last)
        last.replace_all_uses_with(out)
        for node in reversed(chain):
            graph.erase_node(node)
        result.count("fused")
        result.fusion("squeeze_excitation", chain, se.name)
    return result


def _chain(pool: fx.Node, last: fx.Node) -> list[fx.Node]:
    """The single-user chain from pool to last (inclusive), in order."""
    chain, node = [pool], pool
    while node is not last:
        node = next(iter(node.users))
        chain.append(node)
    return chain
