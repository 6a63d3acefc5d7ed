import pytest
import torch
from helpers import captured, check_pass, count, ops, randomize_, rel_err
from torch import nn
from torchvision.models.shufflenetv2 import InvertedResidual

import torch_gie
from torch_gie.graph import run_graph, spec
from torch_gie.passes import PassContext, run_passes
from torch_gie.passes.fuse_channel_shuffle import fuse_channel_shuffle
from torch_gie.passes.remove_identity import remove_identity


def shuffle_rewrite(gm, ctx):
    """fuse_channel_shuffle after remove_identity (torchvision's shuffle has a .contiguous())."""
    remove_identity(gm, ctx)
    return fuse_channel_shuffle(gm, ctx)


def torchvision_shuffle(x, groups):
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, c, h, w)


def permute_shuffle(x, groups):
    n, c, h, w = x.shape
    return x.reshape(n, groups, -1, h, w).permute(0, 2, 1, 3, 4).reshape(n, -1, h, w)


class Shuffle(nn.Module):
    def __init__(self, groups, how=torchvision_shuffle):
        super().__init__()
        self.groups, self.how = groups, how
        self.conv = nn.Conv2d(3, 12, 1)

    def forward(self, x):
        return self.how(self.conv(x), self.groups)


@pytest.mark.parametrize("groups", [2, 3, 4])
@pytest.mark.parametrize("how", [torchvision_shuffle, permute_shuffle], ids=["view-transpose", "reshape-permute"])
def test_view_transpose_view_becomes_one_shuffle(groups, how):
    gm, result = check_pass(shuffle_rewrite, Shuffle(groups, how).eval(), torch.randn(2, 3, 4, 5))
    assert result.counts == {"shuffles": 1}
    for op in (ops.reshape, ops.permute, ops.identity):
        assert count(gm, op) == 0
    (node,) = [n for n in gm.graph.nodes if n.target is ops.channel_shuffle]
    assert spec(node).groups == groups and node.meta["shape"] == (2, 12, 4, 5)
    assert result.fusions[0]["how"] == "shuffle"


class CatShuffle(nn.Module):
    """``shuffle(cat(branches), groups)``; ``widths`` are the branches' channels."""

    def __init__(self, widths=(4, 4), groups=2, reuse_cat=False):
        super().__init__()
        self.groups, self.reuse_cat = groups, reuse_cat
        self.branches = nn.ModuleList(nn.Conv2d(4, w, 3 if i % 2 else 1, padding=i % 2) for i, w in enumerate(widths))

    def forward(self, x):
        cat = torch.cat([b(x) for b in self.branches], 1)
        out = torchvision_shuffle(cat, self.groups)
        return out + cat if self.reuse_cat else out


@pytest.mark.parametrize("widths,groups", [((4, 4), 2), ((2, 2, 2), 3)], ids=["2-way", "3-way"])
def test_shuffled_cat_becomes_an_interleaved_cat(widths, groups):
    gm, result = check_pass(shuffle_rewrite, randomize_(CatShuffle(widths, groups)).eval(), torch.randn(2, 4, 5, 5))
    assert result.counts == {"shuffles": 1}
    (cat,) = [n for n in gm.graph.nodes if n.target is ops.cat]
    assert spec(cat).interleave == groups and len(cat.args) == groups
    assert all(a.target is ops.conv2d for a in cat.args)
    assert count(gm, ops.channel_shuffle) == count(gm, ops.reshape) == count(gm, ops.permute) == 0
    assert result.fusions[0]["how"] == "interleaved concat"


@pytest.mark.parametrize("model", [
    CatShuffle(reuse_cat=True),  # the cat has another consumer: it must stay a plain cat
    CatShuffle((2, 6)),  # unequal inputs
    CatShuffle((2, 2, 2, 2), groups=2),  # 4 inputs, 2 groups
], ids=["cat-reused", "unequal", "inputs-not-groups"])
def test_shuffle_of_other_cats_stays_a_plain_shuffle(model):
    gm, result = check_pass(shuffle_rewrite, randomize_(model).eval(), torch.randn(2, 4, 5, 5))
    assert result.counts == {"shuffles": 1} and count(gm, ops.channel_shuffle) == 1
    (cat,) = [n for n in gm.graph.nodes if n.target is ops.cat]
    assert spec(cat).interleave == 1
    assert result.fusions[0]["how"] == "shuffle"


class NotAShuffle(nn.Module):
    def __init__(self, variant):
        super().__init__()
        self.variant = variant

    def forward(self, x):
        n, c, h, w = x.shape
        if self.variant == "transpose-hw":
            return x.view(n, 2, c // 2, h, w).transpose(3, 4).reshape(n, c, h, w)
        if self.variant == "other-shape-back":
            return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c // 2, 2 * h, w)
        if self.variant == "split-space":
            return x.view(n, c, h, w // 2, 2).transpose(3, 4).reshape(n, c, h, w)
        y = x.view(n, 2, c // 2, h, w)  # the 5D view also read elsewhere
        return y.transpose(1, 2).reshape(n, c, h, w), y.sum()


@pytest.mark.parametrize("variant", ["transpose-hw", "other-shape-back", "split-space", "view-reused"])
def test_other_view_chains_are_left_alone(variant):
    gm, result = check_pass(shuffle_rewrite, NotAShuffle(variant), torch.randn(2, 4, 6, 6))
    assert result.counts == {} and count(gm, ops.channel_shuffle) == 0


# ---------------------------------------------------------------------------------------------
# ShuffleNet-V2 units through the whole compiler: chunk -> branch -> cat -> shuffle.

class ShuffleNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        # torchvision's units: stride 2 (two branches, both convs), then two stride-1 units
        # (x1 passes through, x2 through the branch)
        self.units = nn.Sequential(InvertedResidual(8, 16, 2), InvertedResidual(16, 16, 1),
                                   InvertedResidual(16, 16, 1))

    def forward(self, x):
        return self.units(self.stem(x))


def test_shufflenet_units_write_branches_into_interleaved_slots():
    model, x = randomize_(ShuffleNetish()).eval(), torch.randn(2, 3, 16, 16)
    gm = captured(model, x)
    run_passes(gm, PassContext())
    with torch.no_grad():
        assert rel_err(run_graph(gm, x), model(x)) < 1e-5
    cats = [n for n in gm.graph.nodes if n.target is ops.cat]
    assert len(cats) == 3 and all(spec(c).interleave == 2 for c in cats)
    assert count(gm, ops.channel_shuffle) == 0
    # the stride-2 unit: both branch ends write every other channel of the unit's output
    assert [a.meta["slot"] for a in cats[0].args] == [(cats[0], 0, 2), (cats[0], 1, 2)]
    # stride-1 units: the branch writes in place, the pass-through half (a view) is copied
    for cat in cats[1:]:
        assert cat.meta["cat_copies"] == [0] and cat.args[1].meta["slot"] == (cat, 1, 2)

    report = torch_gie.explain(model, x, precision="fp32", backend="reference")
    assert report["concat_copies"] == 2 and report["concats_eliminated"] == 1
    assert not report["fallback_ops"]
    compiled = torch_gie.compile(model, x, precision="fp32", backend="reference")
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5


def test_stride2_units_only_need_no_copies():
    model = nn.Sequential(InvertedResidual(4, 8, 2), InvertedResidual(8, 16, 2))
    model, x = randomize_(model).eval(), torch.randn(2, 4, 8, 8)
    report = torch_gie.explain(model, x, precision="fp32", backend="reference")
    assert report["concat_copies"] == 0 and report["concats_eliminated"] == 2
    compiled = torch_gie.compile(model, x, precision="fp32", backend="reference")
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5


@pytest.mark.parametrize("variant", ["input-and-repeat", "nested"])
def test_interleaved_cats_with_copies_or_nesting_compile(variant):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 3, 1)

        def forward(self, x):
            if variant == "input-and-repeat":  # a graph input and a repeated input: copied into strided slots
                y = self.a(x)
                return torchvision_shuffle(torch.cat([x, y, y], 1), 3)
            return torch.cat([self.c(x), torchvision_shuffle(torch.cat([self.a(x), self.b(x)], 1), 2)], 1)

    model, x = randomize_(M()).eval(), torch.randn(2, 4, 5, 5)
    compiled = torch_gie.compile(model, x, precision="fp32", backend="reference")
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5
    assert compiled.report()["concat_copies"] == (2 if variant == "input-and-repeat" else 0)


def test_shufflenet_on_triton():
    model, x = randomize_(ShuffleNetish()).eval(), torch.randn(1, 3, 16, 16)
    compiled = torch_gie.compile(model, x, precision="fp32", backend="triton")
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-4
