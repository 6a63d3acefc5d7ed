import pytest
import torch
import torch.nn.functional as F
from helpers import captured, check_pass, count, ops, randomize_, rel_err
from torch import nn
from torchvision.ops import SqueezeExcitation

import torch_gie
from torch_gie.graph import run_graph, spec
from torch_gie.passes import PassContext, run_passes
from torch_gie.passes.fuse_conv_epilogue import fuse_conv_epilogue
from torch_gie.passes.fuse_squeeze_excitation import fuse_squeeze_excitation

C, CR = 16, 4


def se_rewrite(gm, ctx):
    """fuse_squeeze_excitation after its prerequisite (the SE's activations fused into its layers)."""
    fuse_conv_epilogue(gm, ctx)
    return fuse_squeeze_excitation(gm, ctx)


class TorchvisionSE(nn.Module):
    def __init__(self, scale=nn.Sigmoid):
        super().__init__()
        self.se = SqueezeExcitation(C, CR, scale_activation=scale)

    def forward(self, x):
        return self.se(x)


class MeanConvSE(nn.Module):
    """mean(keepdim) -> 1x1 conv -> SiLU -> 1x1 conv -> sigmoid, as EfficientNet ports write it."""

    def __init__(self):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(C, CR, 1), nn.Conv2d(CR, C, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(x.mean((2, 3), keepdim=True)))))


class LinearSE(nn.Module):
    """mean -> Linear -> ReLU -> Linear -> Sigmoid -> view(N, C, 1, 1) -> mul (SENet's reference code)."""

    def __init__(self, pool="mean", bias=True):
        super().__init__()
        self.pool = pool
        self.fc = nn.Sequential(nn.Linear(C, CR, bias=bias), nn.ReLU(inplace=True), nn.Linear(CR, C, bias=bias),
                                nn.Sigmoid())

    def forward(self, x):
        n, c = x.shape[:2]
        s = x.mean((2, 3)) if self.pool == "mean" else F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x * self.fc(s).view(n, c, 1, 1)


def _the_se(gm):
    (se,) = [n for n in gm.graph.nodes if n.target is ops.squeeze_excitation]
    return se


@pytest.mark.parametrize("model,act1,act2,bias", [
    (TorchvisionSE(), "relu", "sigmoid", True),
    (TorchvisionSE(nn.Hardsigmoid), "relu", "hardsigmoid", True),
    (MeanConvSE(), "silu", "sigmoid", True),
    (LinearSE(), "relu", "sigmoid", True),
    (LinearSE("adaptive-flatten", bias=False), "relu", "sigmoid", False),
], ids=["torchvision", "torchvision-hardsigmoid", "mean-1x1-convs", "mean-linear-view", "pool-flatten-linear"])
def test_se_written_any_way_becomes_one_op(model, act1, act2, bias):
    model, x = randomize_(model).eval(), torch.randn(2, C, 5, 6)
    gm, result = check_pass(se_rewrite, model, x)
    assert result.counts == {"fused": 1}
    se = _the_se(gm)
    s = spec(se)
    assert se.args[0].op == "placeholder" and se.meta["shape"] == (2, C, 1, 1)
    assert (s.act1, s.act2) == (act1, act2)
    assert s.w1.shape == (CR, C) and s.w2.shape == (C, CR)
    assert (s.b1 is not None) == (s.b2 is not None) == bias
    for op in (ops.adaptive_pool2d, ops.linear, ops.conv2d, ops.activation, ops.reshape):
        assert count(gm, op) == 0, op.__name__
    (mul,) = [n for n in gm.graph.nodes if n.target is ops.mul]
    assert mul.args == (se.args[0], se)  # the gate multiply is left to fold_gate_into_conv
    assert [n["kind"] for n in result.fusions] == ["squeeze_excitation"]


def test_se_weights_are_the_layers_weights():
    model = randomize_(MeanConvSE()).eval()
    gm, _ = check_pass(se_rewrite, model, torch.randn(1, C, 4, 4))
    s = spec(_the_se(gm))
    assert torch.equal(s.w1, model.reduce.weight[:, :, 0, 0]) and torch.equal(s.b1, model.reduce.bias)
    assert torch.equal(s.w2, model.expand.weight[:, :, 0, 0]) and torch.equal(s.b2, model.expand.bias)


def test_linear_se_gate_used_as_n_by_c_keeps_its_shape():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(C, CR), nn.Linear(CR, C)

        def forward(self, x):
            g = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
            return x * g[:, :, None, None], g

    gm, result = check_pass(se_rewrite, Flat().eval(), torch.randn(2, C, 3, 3))
    assert result.counts == {"fused": 1}
    se = _the_se(gm)
    (flat,) = se.users
    assert flat.target is ops.reshape and flat.meta["shape"] == (2, C)


class Chain(nn.Module):
    """SE-like chains the pass must leave alone; ``variant`` names what breaks the pattern."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        k = 3 if variant == "3x3-conv" else 1
        groups = 2 if variant == "grouped" else 1
        self.fc1 = nn.Conv2d(C, CR, k, padding=k // 2, groups=groups)
        self.fc2 = nn.Conv2d(CR, C, 1)
        self.act = nn.PReLU(CR) if variant == "prelu" else nn.ReLU()

    def forward(self, x):
        if self.variant == "not-global":
            s = F.adaptive_avg_pool2d(x, 2)
        elif self.variant == "max":
            s = x.amax((2, 3), keepdim=True)
        elif self.variant == "mean-over-h":
            s = x.mean(2, keepdim=True).mean(3, keepdim=True)
        else:
            s = x.mean((2, 3), keepdim=True)
        h = self.act(self.fc1(s))
        g = torch.sigmoid(self.fc2(h))
        if self.variant == "not-global":
            g = F.adaptive_avg_pool2d(g, 1)  # a (2, 2) excitation averaged afterwards
        if self.variant == "pooled-reused":
            return x * g, s
        if self.variant == "hidden-reused":
            return x * g, h
        return x * g


@pytest.mark.parametrize("variant", ["not-global", "max", "mean-over-h", "pooled-reused", "hidden-reused",
                                     "prelu", "3x3-conv", "grouped"])
def test_chains_that_are_not_an_se_are_left_alone(variant):
    gm, result = check_pass(se_rewrite, randomize_(Chain(variant)).eval(), torch.randn(2, C, 4, 4))
    assert result.counts == {} and count(gm, ops.squeeze_excitation) == 0


def test_se_whose_layers_carry_a_residual_is_left_alone():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(C, C), nn.Linear(C, C)

        def forward(self, x):
            s = x.mean((2, 3))
            return x * torch.sigmoid(self.fc2(self.fc1(s) + s)).view(-1, C, 1, 1)  # fc1 absorbs + s

    gm, result = check_pass(se_rewrite, Res().eval(), torch.randn(2, C, 3, 3))
    assert result.counts == {}


def test_linear_se_gate_viewed_channels_last_is_not_absorbed():
    class ChannelsLastGate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(C, CR), nn.Linear(CR, C)

        def forward(self, x):
            g = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
            return x.permute(0, 2, 3, 1) * g.view(-1, 1, 1, C)

    check_pass(se_rewrite, ChannelsLastGate().eval(), torch.randn(2, C, 5, 5))


# ---------------------------------------------------------------------------------------------
# Through the whole pipeline: an MBConv-like block's SE becomes one op and its multiply a gate.

class MBConvSE(nn.Module):
    def __init__(self, se):
        super().__init__()
        self.dw = nn.Sequential(nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False), nn.BatchNorm2d(C), nn.SiLU())
        self.se = se
        self.project = nn.Sequential(nn.Conv2d(C, 8, 1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        return self.project(self.se(self.dw(x)))


@pytest.mark.parametrize("se", [SqueezeExcitation(C, CR, nn.SiLU), MeanConvSE(), LinearSE()],
                         ids=["torchvision", "mean-1x1-convs", "mean-linear-view"])
def test_mbconv_se_is_one_op_and_a_gated_projection(se):
    model, x = randomize_(MBConvSE(se)).eval(), torch.randn(2, C, 6, 6)
    gm = captured(model, x)
    run_passes(gm, PassContext())
    with torch.no_grad():
        assert rel_err(run_graph(gm, x), model(x)) < 1e-5
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [ops.conv2d, ops.squeeze_excitation,
                                                                              ops.conv2d]
    assert spec(list(gm.graph.nodes)[-2]).input_gate


def test_mbconv_se_on_triton():
    model, x = randomize_(MBConvSE(SqueezeExcitation(C, CR, nn.SiLU))).eval(), torch.randn(1, C, 4, 4)
    compiled = torch_gie.compile(model, x, precision="fp32", backend="triton")
    assert [layer["op"] for layer in compiled.report()["layers"]] == ["conv2d", "squeeze_excitation", "conv2d"]
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-4
