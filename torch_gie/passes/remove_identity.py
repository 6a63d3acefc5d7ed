"""Remove ops that compute nothing at inference: Dropout, Identity (``x -> x``)."""
from torch import fx

from .. import ops
from ..graph import is_canonical
from .base import PassContext, PassResult, replace_node


def remove_identity(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult()
    for node in list(gm.graph.nodes):
        if is_canonical(node, ops.identity):
            replace_node(node, node.args[0])
            result.count("removed")
    return result
