import operator

import torch
from helpers import check_pass, count, ops
from torch import nn

from torch_gie.graph import spec
from torch_gie.passes.merge_sibling_convs import MAX_SEGMENTS, merge_sibling_convs


class Siblings(nn.Module):
    def __init__(self, n=3, k=1, stride=1, act=True):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(5, 3 + i, k, stride, k // 2) for i in range(n))
        self.act = act

    def forward(self, x):
        outs = [c(x) for c in self.convs]
        if self.act:
            outs = [torch.relu(o) for o in outs]
        return tuple(o * (i + 1) for i, o in enumerate(outs))


def _fold_acts(model, x):
    from torch_gie.capture import capture
    from torch_gie.passes import PassContext
    from torch_gie.passes.fuse_conv_epilogue import fuse_conv_epilogue
    gm = capture(model.eval(), (x,))
    fuse_conv_epilogue(gm, PassContext())
    return gm


def test_three_siblings_merge_into_one_conv_with_segments():
    gm, result = check_pass(merge_sibling_convs, Siblings(3), torch.randn(2, 5, 7, 6))
    merged = [n for n in gm.graph.nodes if n.target is ops.conv2d]
    assert len(merged) == 1 and spec(merged[0]).out_splits == (3, 4, 5)
    assert sum(1 for n in gm.graph.nodes if n.target is operator.getitem) == 3
    assert result.fusions[0]["kind"] == "horizontal"


def test_more_siblings_than_segments_are_chunked():
    n = MAX_SEGMENTS + 2
    gm, result = check_pass(merge_sibling_convs, Siblings(n, k=3, stride=2, act=False), torch.randn(1, 5, 9, 9))
    assert count(gm, ops.conv2d) == 2 and result.counts["merged_convs"] == n


def test_merge_after_epilogue_fusion_keeps_numerics():
    model, x = Siblings(3), torch.randn(2, 5, 4, 4)
    gm = _fold_acts(model, x)
    merge_sibling_convs(gm, None)
    from torch_gie.graph import run_graph
    with torch.no_grad():
        ref = model(x)
    for a, b in zip(run_graph(gm, x), ref):
        assert torch.allclose(a, b, atol=1e-6)
    assert spec(next(n for n in gm.graph.nodes if n.target is ops.conv2d)).epilogue.activation == "relu"


def test_different_geometry_or_input_does_not_merge():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)
            self.c, self.d = nn.Conv2d(4, 4, 1, stride=2), nn.Conv2d(4, 4, 1, groups=2)

        def forward(self, x, y):
            return self.a(x), self.b(x), self.c(x), self.d(x), self.a(y)

    gm, result = check_pass(merge_sibling_convs, Mixed(), torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6))
    assert result.counts.get("merged_convs", 0) == 0 and count(gm, ops.conv2d) == 5
