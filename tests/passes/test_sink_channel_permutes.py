import pytest
import torch
from helpers import captured, check_pass, count, ops, randomize_, rel_err
from torch import nn

import torch_gie
from torch_gie.graph import run_graph, spec
from torch_gie.passes import run_passes
from torch_gie.passes.sink_channel_permutes import sink_channel_permutes

C = 8


class Mlp(nn.Module):
    """ConvNeXt's channels-last half: permute -> LayerNorm -> Linear -> GELU -> Linear -> permute."""

    def __init__(self, c=C, back=True):
        super().__init__()
        self.back = back
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)

    def forward(self, x):
        y = self.fc2(self.act(self.fc1(self.norm(x.permute(0, 2, 3, 1)))))
        return y.permute(0, 3, 1, 2) if self.back else y


class CNBlock(nn.Module):
    """torchvision's ConvNeXt block: the layer scale (C, 1, 1) multiplies after the permute back."""

    def __init__(self, c=C):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.mlp = Mlp(c)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        return x + self.layer_scale * self.mlp(self.dwconv(x))


def test_channels_last_mlp_becomes_channel_ops():
    gm, result = check_pass(sink_channel_permutes, randomize_(Mlp()).eval(), torch.randn(2, C, 5, 6))
    assert result.counts == {"sunk": 4, "cancelled": 1}
    assert count(gm, ops.permute) == 0 and count(gm, ops.linear) == 0
    (ln,) = [n for n in gm.graph.nodes if n.target is ops.layer_norm]
    assert spec(ln).dim == 1 and ln.args[0].op == "placeholder"
    convs = [n for n in gm.graph.nodes if n.target is ops.conv2d]
    assert [tuple(spec(c).weight.shape) for c in convs] == [(4 * C, C, 1, 1), (C, 4 * C, 1, 1)]
    assert all(n.meta["shape"][1] in (C, 4 * C) for n in convs)  # NCHW shapes recorded


def test_block_output_left_channels_last_keeps_one_permute():
    gm, result = check_pass(sink_channel_permutes, randomize_(Mlp(back=False)).eval(), torch.randn(2, C, 5, 6))
    assert result.counts == {"sunk": 4}
    (perm,) = [n for n in gm.graph.nodes if n.target is ops.permute]
    assert list(perm.users)[0].op == "output" and perm.args[0].target is ops.conv2d


def test_convnext_block_folds_layer_scale_and_residual():
    model, x = randomize_(CNBlock()).eval(), torch.randn(2, C, 6, 6)
    gm = captured(model, x)
    run_passes(gm)
    with torch.no_grad():
        assert rel_err(run_graph(gm, x), model(x)) < 1e-5
    for op in (ops.permute, ops.affine, ops.add, ops.mul, ops.linear, ops.activation):
        assert count(gm, op) == 0, op.__name__
    convs = [n for n in gm.graph.nodes if n.target is ops.conv2d]
    assert len(convs) == 3
    ep = spec(convs[1]).epilogue
    assert ep.activation == "gelu"
    last = spec(convs[2])
    assert last.epilogue.residual and convs[2].args[1].op == "placeholder"


def test_convnext_block_on_triton():
    model, x = randomize_(CNBlock()).eval(), torch.randn(1, C, 6, 6)
    compiled = torch_gie.compile(model, x, precision="fp32", backend="triton")
    assert [layer["op"] for layer in compiled.report()["layers"]] == ["conv2d", "layer_norm", "conv2d", "conv2d"]
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-4


class PermuteThen(nn.Module):
    def __init__(self, dims, then):
        super().__init__()
        self.dims, self.then = dims, then

    def forward(self, x):
        return self.then(x.permute(*self.dims))


@pytest.mark.parametrize("dims,then", [
    ((0, 2, 3, 1), lambda y: y.softmax(-1)),  # does not commute: a fallback
    ((0, 2, 3, 1), lambda y: y.mean(-1)),  # a reduction over C: not a channel op we sink
    ((0, 2, 1, 3), nn.LayerNorm(6)),  # not the channels-last permute
    ((0, 3, 1, 2), nn.ReLU()),  # the inverse first: not sunk
], ids=["softmax", "mean", "perm-0213", "perm-0312"])
def test_permute_stays_before_ops_that_do_not_commute(dims, then):
    gm, result = check_pass(sink_channel_permutes, PermuteThen(dims, then).eval(), torch.randn(2, 5, 5, 6))
    assert result.counts == {} and count(gm, ops.permute) == 1


def test_permute_with_a_commuting_and_a_non_commuting_user():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(C)

        def forward(self, x):
            y = x.permute(0, 2, 3, 1)
            return self.norm(y).permute(0, 3, 1, 2), y.softmax(-1)

    gm, result = check_pass(sink_channel_permutes, Two(), torch.randn(2, C, 4, 5))
    assert result.counts == {"sunk": 1, "cancelled": 1}
    (perm,) = [n for n in gm.graph.nodes if n.target is ops.permute]
    assert [u.op for u in perm.users] == ["call_method"]  # only the softmax still reads it
    assert spec(next(n for n in gm.graph.nodes if n.target is ops.layer_norm)).dim == 1


def test_permute_then_inverse_cancels():
    gm, result = check_pass(sink_channel_permutes, PermuteThen((0, 2, 3, 1), lambda y: y.permute(0, 3, 1, 2)),
                            torch.randn(1, 3, 4, 5))
    assert result.counts == {"cancelled": 1} and count(gm, ops.permute) == 0


class FacebookBlock(nn.Module):
    """ConvNeXt as facebookresearch (and timm) write it: gamma [C] scales the channels-last tensor."""

    def __init__(self, c=C):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.mlp = Mlp(c, back=False)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x + (self.gamma * self.mlp(self.dwconv(x))).permute(0, 3, 1, 2)


def test_channels_last_layer_scale_block_is_still_correct():
    model, x = randomize_(FacebookBlock()).eval(), torch.randn(2, C, 6, 6)
    gm = captured(model, x)
    run_passes(gm)
    with torch.no_grad():
        assert rel_err(run_graph(gm, x), model(x)) < 1e-5


def test_channels_last_layer_scale_folds_like_torchvision():
    model, x = randomize_(FacebookBlock()).eval(), torch.randn(2, C, 6, 6)
    gm = captured(model, x)
    run_passes(gm)
    assert count(gm, ops.permute) == 0 and count(gm, ops.mul) == 0 and count(gm, ops.add) == 0


def test_prelu_on_the_permuted_tensor_is_not_moved_to_channels():
    class PreluLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.act, self.fc = nn.PReLU(6), nn.Linear(6, 6)  # PReLU(6) on (N, 6, W, 6): slopes along H

        def forward(self, x):
            return self.fc(self.act(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)

    model = PreluLast().eval()
    with torch.no_grad():
        model.act.weight.copy_(torch.linspace(-1, 1, 6))
    check_pass(sink_channel_permutes, model, torch.randn(2, 6, 6, 4))
