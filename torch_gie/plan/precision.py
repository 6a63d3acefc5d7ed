"""Precision planning for int8 builds: which layers run int8, which values are stored as int8
codes, and which values must share one quantization (one scale) because they share storage.

Rules (the docstring of ``torch_gie.quantize.arith`` gives the arithmetic):
- int8 layers: convolutions (dense, grouped, depthwise, merged siblings, SE-gated), Linear
  layers and pools, unless the user pins them to fp16 (``layer_precisions``). Everything else
  (LayerNorm, SE excitation, attention, elementwise steps that did not fuse, fallbacks) runs in
  fp16 and reads real values.
- Quantization classes: values that share storage share one QParams: a concat's inputs with
  the concat (its producers write codes straight into its slots), a merged conv's segments
  (one kernel, one output scale), a view with its source, a max pool's output with its input
  (max is exact on codes). Calibration observes each class as one tensor.
- A class is stored as int8 when every value in it is written by an int8 layer (or is a network
  input all of whose readers are int8 layers), some int8 layer reads it as its main input or as
  the residual its epilogue adds (a ResNet's downsample branch: codes halve both the write and
  the read of the widest tensors), and no graph output is in it (outputs leave in the caller's
  dtype, written by the last layer in fp16 directly). Otherwise its int8 writers store real
  fp16 values, and an int8 layer reading it gets a quantizing conversion, one per value.
- A pool whose input is not stored as int8 runs in fp16 (quantizing only to pool is a loss);
  this repeats until nothing changes.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

from torch import fx

from .. import ops
from ..graph import is_canonical, spec

INT8_LAYERS = (ops.conv2d, ops.linear, ops.pool2d, ops.adaptive_pool2d)
_POOLS = (ops.pool2d, ops.adaptive_pool2d)


@dataclass
class PrecisionPlan:
    """``int8_layers``: nodes whose kernels run int8; ``classes``: value -> its class root;
    ``int8_classes``: roots of classes stored as int8 codes; ``search``: the accuracy-budget
    search's report entry when one chose the fp16 layers (``quantize.budget``)."""

    int8_layers: set[fx.Node] = field(default_factory=set)
    classes: dict[fx.Node, fx.Node] = field(default_factory=dict)
    int8_classes: set[fx.Node] = field(default_factory=set)
    search: dict | None = None

    def is_int8_value(self, node: fx.Node) -> bool:
        return self.classes.get(node) in self.int8_classes


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}

    def find(self, x: fx.Node) -> fx.Node:
        self.parent.setdefault(x, x)
        while self.parent[x] is not x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.parent[rb] = ra


def is_value(node: fx.Node) -> bool:
    """A tensor the planner may quantize: a network input, a canonical op's result, or one
    segment of a merged conv."""
    if node.op == "placeholder":
        return "shape" in node.meta
    if "segment_of" in node.meta:
        return True
    if not is_canonical(node):
        return False
    return getattr(spec(node), "out_splits", None) is None and "shape" in node.meta


def main_input(node: fx.Node) -> fx.Node:
    """The input an int8 layer reads as codes (the conv/Linear/pool operand x)."""
    return node.args[0]


def residual_input(layer: fx.Node) -> fx.Node | None:
    """The residual a layer's epilogue adds (its last input), or None."""
    has = getattr(getattr(layer.meta.get("spec"), "epilogue", None), "residual", False)
    return layer.args[-1] if has else None


def is_max_pool(node: fx.Node) -> bool:
    return node.target in _POOLS and spec(node).kind == "max" and \
        not getattr(spec(node), "pad_is_zeros", False)


def quantization_classes(order: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """value -> class root for every quantizable value (see the module docstring)."""
    uf = _UnionFind()
    for node in order:
        if not is_value(node):
            continue
        uf.find(node)
        if is_canonical(node, ops.cat):
            for a in node.args:
                uf.union(node, a)
        elif is_canonical(node) and node.target in ops.VIEW_OPS:
            uf.union(node.args[0], node)
        elif "segment_of" in node.meta:
            uf.union(node.meta["segment_of"], node)
    for node in order:  # every tensor a layer reads has a class (a fallback's result: its own)
        if is_canonical(node):
            for a in node.all_input_nodes:
                if "shape" in a.meta:
                    uf.find(a)
    for node in order:  # a max pool is exact on codes: same scale in and out
        if is_canonical(node) and is_max_pool(node) and is_value(main_input(node)):
            uf.union(main_input(node), node)
    # Non-values (a fallback's result feeding a concat or a view) stay in their class: they keep
    # it out of int8 (``_stored_int8``).
    return {v: uf.find(v) for v in list(uf.parent)}


def _writer(node: fx.Node) -> fx.Node | None:
    """The layer that writes a value (a segment's merged conv); None for views, cats, inputs."""
    if "segment_of" in node.meta:
        return node.meta["segment_of"]
    if node.op == "placeholder" or is_canonical(node, ops.cat) or node.target in ops.VIEW_OPS:
        return None
    return node


def _readers(node: fx.Node) -> list[tuple[fx.Node, bool]]:
    """(consumer, reads it as codes if it runs int8: as its main input or its epilogue's
    residual) for every consumer but getitems."""
    out = []
    for u in node.users:
        if u.op == "call_function" and u.target is operator.getitem:
            continue
        as_codes = bool(u.args) and u.args[0] is node
        if not as_codes and is_canonical(u) and u.target in INT8_LAYERS:
            as_codes = residual_input(u) is node
        out.append((u, as_codes))
    return out


def plan_precision(gm: fx.GraphModule, order: list[fx.Node], fp16_layers: set[fx.Node]) -> PrecisionPlan:
    """Choose int8 layers and int8-stored classes for an int8 build (module docstring)."""
    classes = quantization_classes(order)
    members: dict[fx.Node, list[fx.Node]] = {}
    for v, root in classes.items():
        members.setdefault(root, []).append(v)
    outputs = set(gm.graph.output_node().all_input_nodes)
    int8 = {n for n in order if is_canonical(n) and n.target in INT8_LAYERS and n not in fp16_layers}
    while True:
        int8_classes = set()
        for root, vals in members.items():
            if _stored_int8(vals, int8, outputs):
                int8_classes.add(root)
        demote = {n for n in int8 if n.target in _POOLS and classes.get(main_input(n)) not in int8_classes}
        if not demote:
            return PrecisionPlan(int8, classes, int8_classes)
        int8 -= demote


def _stored_int8(values: list[fx.Node], int8: set[fx.Node], outputs: set[fx.Node]) -> bool:
    wanted, written = False, False
    for v in values:
        if v in outputs:
            return False
        readers = _readers(v)
        if v.op == "placeholder":
            if not readers or not all(u in int8 and main for u, main in readers):
                return False
        else:
            w = _writer(v)
            if w is not None and w not in int8:
                return False
            written = written or w is not None
        if any(u in int8 and main for u, main in readers):
            wanted = True
    return wanted and (written or all(v.op == "placeholder" for v in values))

