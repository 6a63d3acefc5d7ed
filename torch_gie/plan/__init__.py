"""Planning: layout, precision and memory for the optimized graph.

- Layout: every planned 4D activation is NHWC (channels_last strides on a logical NCHW shape),
  so channel slices are plain strided views and kernels read channels contiguously.
- Precision: canonical ops compute and store in the network precision; fallback ops see the
  dtypes of the original model (the executor casts at the boundary).
- Memory: one buffer per root value (a concat's producers share its buffer), liveness over the
  execution order, offsets in one arena (``plan.memory``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from .. import ops
from ..graph import is_canonical, is_fallback_compute, slot_root, spec
from .memory import Buffer, Placement, assign_offsets, extend_lifetimes
from .precision import PrecisionPlan
from .streams import StreamPlan, assign_streams, region_bounds

__all__ = ["Plan", "make_plan", "is_planned", "launches_kernel", "Buffer", "Placement", "StreamPlan"]


@dataclass
class Plan:
    order: list[fx.Node]
    dtype: torch.dtype
    placements: dict[fx.Node, Placement]
    buffers: list[Buffer]
    arena_bytes: int
    naive_bytes: int
    value_dtypes: dict[fx.Node, torch.dtype] = field(default_factory=dict)
    streams: StreamPlan = field(default_factory=StreamPlan)
    # int8 builds: the layers that run int8, the quantization classes, and each class's QParams
    precision: PrecisionPlan | None = None
    qparams: dict = field(default_factory=dict)

    def value_qparams(self, node: fx.Node):
        """The QParams of a value's class (int8 builds), or None."""
        if self.precision is None:
            return None
        return self.qparams.get(self.precision.classes.get(node))

    def is_int8_layer(self, node: fx.Node) -> bool:
        return self.precision is not None and node in self.precision.int8_layers

    def value_dtype(self, node: fx.Node) -> torch.dtype:
        return self.value_dtypes.get(node, node.meta.get("dtype"))


def is_planned(node: fx.Node) -> bool:
    """Values that live in the arena: inputs, canonical results and merged-conv segments."""
    if node.op == "placeholder":
        return "shape" in node.meta
    if "segment_of" in node.meta:
        return True
    if not is_canonical(node) or node.target in ops.VIEW_OPS:
        return False
    return getattr(node.meta["spec"], "out_splits", None) is None


def launches_kernel(node: fx.Node) -> bool:
    """Does this node start device work (a kernel, a copy, a PyTorch op)?"""
    if is_canonical(node, ops.cat):
        return bool(node.meta.get("cat_copies"))
    if is_canonical(node, ops.reshape):
        return True  # a view, or a copy when no view exists: ordered like a kernel to be safe
    if is_canonical(node):
        return node.target not in ops.VIEW_OPS
    return is_fallback_compute(node)


INPUT_CHANNEL_PAD = 4  # an RGB input stored as 4 channels: 8-byte pixels the first conv loads as vectors


def pads_input_channels(node: fx.Node) -> bool:
    """Store an image input with fewer than 4 channels padded to 4 when only convs read it: the
    pixel stride becomes 8 bytes in fp16, so the stem conv's loads vectorize. The padding lanes
    hold zeros for the engine's lifetime (a pinned buffer, allocated zeroed; inputs are copied
    into its first channels only), which lets the conv skip masking them."""
    shape = node.meta.get("shape", ())
    return len(shape) == 4 and shape[1] < INPUT_CHANNEL_PAD and bool(node.users) and \
        all(is_canonical(u, ops.conv2d) and spec(u).groups == 1 for u in node.users)


_TOKEN_MAJOR = (ops.linear,)  # ops whose results are feature-last tensors (contiguous rows)


def channels_last_values(order: list[fx.Node]) -> dict[fx.Node, bool]:
    """For each 4D value, whether its buffer should be NHWC (channels_last on a logical NCHW
    shape: images) or contiguous (tensors whose last dim is the feature dim, as in Swin's
    (N, H, W, C) blocks, where LayerNorm and Linear read contiguous rows). Elementwise ops keep
    the layout of their first input, seen through views (a (0, 2, 3, 1) permute of an NHWC buffer
    is contiguous)."""
    layout: dict[fx.Node, bool] = {}
    for node in order:
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        src = layout.get(first, True)
        if node.op == "placeholder" or "segment_of" in node.meta:
            layout[node] = True  # images; a merged conv's channel segments
        elif not is_canonical(node):
            layout[node] = False  # what PyTorch code returns is contiguous
        elif node.target is ops.permute:
            dims = tuple(spec(node).dims)
            layout[node] = (not src) if dims in ((0, 2, 3, 1), (0, 3, 1, 2)) else False
        elif node.target in ops.VIEW_OPS or node.target in (ops.affine, ops.activation, ops.add, ops.mul):
            layout[node] = src
        elif node.target in _TOKEN_MAJOR or (node.target is ops.layer_norm and spec(node).dim == -1):
            layout[node] = False
        else:
            layout[node] = True
    return layout


def _writer(node: fx.Node) -> fx.Node:
    return node.meta.get("segment_of", node)


def make_plan(gm: fx.GraphModule, dtype: torch.dtype, *, streams: bool = False,
              precision: PrecisionPlan | None = None) -> Plan:
    """Place every value; with ``streams``, also spread independent branches over CUDA streams
    (graphs without fallbacks only). ``dtype`` is the float precision; with a ``precision``
    plan (int8 builds) the values it stores as int8 get int8 buffers."""
    order = [n for n in gm.graph.nodes if n.op != "output"]
    pos = {n: i for i, n in enumerate(order)}
    buffers: dict[fx.Node, Buffer] = {}
    placements: dict[fx.Node, Placement] = {}
    value_dtypes: dict[fx.Node, torch.dtype] = {}
    nhwc = channels_last_values(order)
    for node in order:
        if not is_planned(node):
            continue
        root, offset, step = slot_root(node)
        if root not in buffers:
            shape = tuple(root.meta["shape"])
            buf_dtype = torch.int8 if precision is not None and precision.is_int8_value(root) else dtype
            pinned = root.op == "placeholder"
            if pinned and pads_input_channels(root):
                shape = (shape[0], INPUT_CHANNEL_PAD) + shape[2:]
            buffers[root] = Buffer(len(buffers), shape, buf_dtype, channels_last=len(shape) == 4 and nhwc[root],
                                   first=pos[_writer(node)], last=pos[_writer(node)], pinned=pinned)
        buf = buffers[root]
        buf.first = min(buf.first, pos[_writer(node)])
        shape = node.meta["shape"]
        channels = shape[1] if len(shape) > 1 else (shape[0] if shape else 1)
        placements[node] = Placement(buf, offset, channels, step)
        value_dtypes[node] = buf.dtype

    for node in order:
        if is_canonical(node) and node.target in ops.VIEW_OPS and node.args[0] in value_dtypes:
            value_dtypes[node] = value_dtypes[node.args[0]]  # a view of a planned value keeps its dtype
        elif node.op == "get_attr" and node.users and all(is_canonical(u) for u in node.users):
            value_dtypes[node] = dtype  # a constant only kernels read: converted once at build time

    extend_lifetimes(buffers.values(), order + [gm.graph.output_node()],
                     _buffer_reads(gm, order, placements))
    stream_plan = StreamPlan()
    # Graphs with fallbacks run on one stream: with fallbacks pinned to the first stream and every
    # stream joined before them, swin_v2 still computed wrong results under CUDA-graph capture on
    # the H200 (correct with streams=False); until that is understood, no concurrency there.
    if streams and not any(is_fallback_compute(n) for n in order):
        stream_plan = assign_streams(order, {n for n in order if launches_kernel(n)})
    if stream_plan.streams > 1:
        bounds = region_bounds(order)
        for buf in buffers.values():  # no reuse inside a region whose branches may overlap
            buf.first = bounds[buf.first][0]
            buf.last = bounds[min(buf.last, len(order) - 1)][1] + (buf.last >= len(order))
    arena = assign_offsets(buffers.values())
    naive = sum(b.nbytes for b in buffers.values() if not b.pinned)
    return Plan(order, dtype, placements, list(buffers.values()), arena, naive, value_dtypes, stream_plan,
                precision)


def _buffer_reads(gm, order, placements) -> dict[fx.Node, set[int]]:
    """For each node, the buffers it may read: through its inputs, and through any unplanned
    result that may alias a planned buffer (a flatten view, a fallback's permute of a conv
    output). A merged conv's tuple aliases nothing: its segments are planned values."""
    may_alias: dict[fx.Node, set[int]] = {}
    for node in order:
        if node in placements:
            may_alias[node] = {placements[node].buffer.index}
        elif is_canonical(node, ops.conv2d) or node.op in ("placeholder", "get_attr"):
            may_alias[node] = set()
        else:
            may_alias[node] = set().union(*(may_alias.get(i, set()) for i in node.all_input_nodes))
    reads = {node: set().union(*(may_alias.get(i, set()) for i in node.all_input_nodes))
             for node in order}
    out = gm.graph.output_node()
    reads[out] = set().union(*(may_alias.get(i, set()) for i in out.all_input_nodes))
    return reads
