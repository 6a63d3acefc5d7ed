"""Activations written out by hand become the activation they compute, so they fuse into the
producing conv's epilogue like the library ones (YOLO-style ``x * torch.sigmoid(x)``):

``x * sigmoid(x) => silu(x)``, ``x * hardsigmoid(x) => hardswish(x)``,
``x * tanh(softplus(x)) => mish(x)``.
The gate's inner activations must have no other consumer."""
from torch import fx

from .. import ops
from ..activations import Act
from ..graph import is_canonical, spec
from .base import PassContext, PassResult

# gate activation chain (outermost first) -> the activation x * gate(x) is
_PATTERNS = {("sigmoid",): "silu", ("hardsigmoid",): "hardswish", ("tanh", "softplus"): "mish"}


def _gate_of(x: fx.Node, gate: fx.Node) -> tuple[str, list[fx.Node]] | None:
    """(activation name, the gate's nodes) when ``gate`` is a known gate function of ``x``."""
    chain, node = [], gate
    while is_canonical(node, ops.activation) and spec(node).slope is None and len(node.users) == 1:
        chain.append(node)
        if node.args[0] is x:
            names = tuple(spec(n).act for n in chain)
            for pattern, result in _PATTERNS.items():
                if names == pattern:
                    return result, chain
            return None
        node = node.args[0]
    return None


def fuse_activation_patterns(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult()
    graph = gm.graph
    for mul in list(graph.nodes):
        if not is_canonical(mul, ops.mul) or spec(mul).activation is not None:
            continue
        a, b = mul.args
        found = _gate_of(a, b) or _gate_of(b, a)
        if found is None:
            continue
        name, chain = found
        x = b if chain[-1].args[0] is b else a
        with graph.inserting_before(mul):
            act = graph.create_node("call_function", ops.activation, (x,), {}, name=f"{mul.name}_{name}")
        act.meta.update(spec=ops.ActivationSpec(Act(name)), shape=mul.meta["shape"], dtype=mul.meta["dtype"],
                        source=mul.meta.get("source", mul.name))
        mul.replace_all_uses_with(act)
        graph.erase_node(mul)
        for node in chain:
            graph.erase_node(node)
        result.count("fused")
        result.fusion("vertical", [*reversed(chain), mul], act.name, epilogue=name)
    return result
