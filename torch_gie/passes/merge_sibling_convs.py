"""Horizontal fusion: sibling convs that read the same tensor with the same geometry become one
conv over concatenated output channels (``[conv(x, w1), conv(x, w2)] => split(conv(x, [w1; w2]))``).

One launch then reads the input once (the 1x1 branches of an Inception block). Each former
conv becomes ``getitem(merged, i)``: a channel segment that the planner can place anywhere
(its own buffer or a concat slot), so merging and concat elimination compose without copies.
"""
import operator
from collections import defaultdict

import torch
from torch import fx

from .. import ops
from ..graph import is_canonical, spec
from .base import PassContext, PassResult

MAX_SEGMENTS = 4  # the conv kernels write at most this many destination views per launch


def merge_key(node: fx.Node):
    """Convs with equal keys compute over the same input windows and may share one launch."""
    s = spec(node)
    return (node.args[0], tuple(s.weight.shape[1:]), s.stride, s.padding, s.dilation, s.weight.dtype,
            s.epilogue, s.bias is None)


def can_merge(node: fx.Node) -> bool:
    if not is_canonical(node, ops.conv2d):
        return False
    s = spec(node)
    return (s.groups == 1 and s.out_splits is None and not s.epilogue.residual and len(node.args) == 1
            and s.act_slope is None and not s.input_gate)


def _merge(gm: fx.GraphModule, group: list[fx.Node]) -> fx.Node:
    specs = [spec(n) for n in group]
    bias = None if specs[0].bias is None else torch.cat([s.bias.float() for s in specs])
    merged_spec = ops.replace(specs[0], weight=torch.cat([s.weight for s in specs]), bias=bias,
                              out_splits=tuple(s.out_channels for s in specs))
    graph = gm.graph
    name = "merged_" + "_".join(n.name for n in group)
    with graph.inserting_before(group[0]):
        merged = graph.create_node("call_function", ops.conv2d, (group[0].args[0],), {}, name=name)
    merged.meta["spec"] = merged_spec
    shape = list(group[0].meta["shape"])
    shape[1] = sum(merged_spec.out_splits)
    merged.meta["shape"], merged.meta["dtype"] = tuple(shape), group[0].meta["dtype"]
    merged.meta["source"] = name
    anchor = merged
    for i, node in enumerate(group):
        with graph.inserting_after(anchor):
            part = graph.create_node("call_function", operator.getitem, (merged, i), {}, name=node.name)
        part.meta.update({k: node.meta[k] for k in ("shape", "dtype", "source") if k in node.meta})
        part.meta["segment_of"] = merged
        anchor = part
        node.replace_all_uses_with(part)
        graph.erase_node(node)
    return merged


def merge_sibling_convs(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult()
    groups: dict = defaultdict(list)
    for node in gm.graph.nodes:
        if can_merge(node):
            groups[merge_key(node)].append(node)
    for siblings in groups.values():
        for start in range(0, len(siblings), MAX_SEGMENTS):
            group = siblings[start:start + MAX_SEGMENTS]
            if len(group) < 2:
                continue
            merged = _merge(gm, group)
            result.count("merged_convs", len(group))
            result.fusion("horizontal", group, merged.name)
    return result
