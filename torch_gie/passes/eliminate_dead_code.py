"""Remove nodes whose results nobody uses (left behind by earlier rewrites or in the model)."""
from torch import fx

from .base import PassContext, PassResult


def eliminate_dead_code(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult()
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    result.count("removed", before - len(gm.graph.nodes))
    return result
