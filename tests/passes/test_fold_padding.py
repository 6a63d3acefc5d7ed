import pytest
import torch
import torch.nn.functional as F
from helpers import check_pass, count, ops, randomize_, rel_err
from torch import nn

import torch_gie
from torch_gie.graph import spec
from torch_gie.passes.fold_padding import fold_padding


def the(gm, op):
    (node,) = [n for n in gm.graph.nodes if n.target is op]
    return node


class PadConv(nn.Module):
    def __init__(self, pads, value=0.0, padding=0, stride=1, dilation=1, groups=1):
        super().__init__()
        self.pads, self.value = pads, value
        self.conv = nn.Conv2d(4, 4, 3, stride, padding, dilation, groups)

    def forward(self, x):
        return self.conv(F.pad(x, self.pads, value=self.value))


@pytest.mark.parametrize("pads,conv_kwargs,padding", [
    ((0, 1, 0, 1), {"stride": 2}, (0, 1, 0, 1)),  # TensorFlow "SAME" before a stride-2 conv
    ((1, 1, 1, 1), {"padding": 1}, (2, 2)),  # adds to the conv's own padding, stays symmetric
    ((1, 1), {}, (0, 1)),  # W only
    ((2, 1, 0, 3), {"dilation": 2}, (0, 3, 2, 1)),  # four-sided: (top, bottom, left, right)
    ((1, 0, 1, 0), {"stride": 2, "groups": 4}, (1, 0, 1, 0)),  # depthwise
], ids=["tf-same", "plus-own", "w-only", "dilated", "depthwise"])
def test_zero_pad_folds_into_conv_padding(pads, conv_kwargs, padding):
    gm, result = check_pass(fold_padding, PadConv(pads, **conv_kwargs), torch.randn(2, 4, 9, 9))
    assert result.counts == {"folded": 1} and count(gm, ops.pad) == 0
    conv = the(gm, ops.conv2d)
    assert tuple(spec(conv).padding) == padding and conv.args[0].op == "placeholder"
    assert result.fusions[0]["what"] == "padding"


@pytest.mark.parametrize("pool", [
    nn.MaxPool2d(3, 2),
    nn.AvgPool2d(3, 2),
    nn.AvgPool2d(3, 2, count_include_pad=False),  # the folded pad is real zeros: still counted
    nn.MaxPool2d(2, 2, ceil_mode=True),
    nn.AvgPool2d(2, 1, ceil_mode=True),
], ids=["max", "avg", "avg-exclude-pad", "max-ceil", "avg-ceil"])
def test_zero_pad_folds_into_pool_as_real_zeros(pool):
    model = nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), pool)
    # all-negative input: a max must see the pad's zeros (not -inf), an average must count them
    x = -1 - torch.rand(2, 3, 8, 9)
    gm, result = check_pass(fold_padding, model, x)
    assert result.counts == {"folded": 1} and count(gm, ops.pad) == 0
    s = spec(the(gm, ops.pool2d))
    assert s.pad_is_zeros and tuple(ops.padding4(s.padding)) == (1, 0, 1, 0)


def test_pad_with_a_nonzero_value_stays():
    gm, result = check_pass(fold_padding, PadConv((1, 1, 1, 1), value=1.0), torch.randn(1, 4, 6, 6))
    assert result.counts == {} and count(gm, ops.pad) == 1
    assert tuple(spec(the(gm, ops.conv2d)).padding) == (0, 0)


def test_pool_with_padding_of_its_own_keeps_the_pad():
    # max pool padding reads -inf and avg pool padding is uncounted: unlike the pad's zeros
    for pool in (nn.MaxPool2d(3, 2, padding=1), nn.AvgPool2d(3, 1, padding=1, count_include_pad=False)):
        gm, result = check_pass(fold_padding, nn.Sequential(nn.ZeroPad2d(1), pool), -1 - torch.rand(1, 2, 7, 7))
        assert result.counts == {} and count(gm, ops.pad) == 1
        assert not spec(the(gm, ops.pool2d)).pad_is_zeros


def test_pad_also_read_by_another_op_stays_for_it():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, 2), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            p = F.pad(x, (0, 1, 0, 1))
            return self.a(p), torch.relu(p), self.b(p)

    gm, result = check_pass(fold_padding, Shared(), torch.randn(1, 4, 8, 8))
    assert result.counts == {"folded": 2}
    pad = the(gm, ops.pad)
    assert [u.target for u in pad.users] == [ops.activation]
    convs = [n for n in gm.graph.nodes if n.target is ops.conv2d]
    assert all(c.args[0].op == "placeholder" for c in convs)
    assert [tuple(spec(c).padding) for c in convs] == [(0, 1, 0, 1)] * 2


def test_pad_that_is_a_graph_output_stays():
    class Out(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3)

        def forward(self, x):
            p = F.pad(x, (1, 1, 1, 1))
            return self.conv(p), p

    gm, result = check_pass(fold_padding, Out(), torch.randn(1, 4, 5, 5))
    assert result.counts == {"folded": 1} and count(gm, ops.pad) == 1


def test_pad_before_a_non_conv_consumer_is_left_alone():
    model = nn.Sequential(nn.ZeroPad2d(1), nn.ReLU(), nn.Conv2d(3, 3, 3))
    gm, result = check_pass(fold_padding, model, torch.randn(1, 3, 5, 5))
    assert result.counts == {} and count(gm, ops.pad) == 1


# ---------------------------------------------------------------------------------------------
# Through the whole compiler: TF-style EfficientNet stem, depthwise and pool pads.

class TFSame(nn.Module):
    """A TensorFlow port: SAME pads written out before stride-2 convs and a 3x3/2 max pool."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 8, 3, 2, bias=False), nn.BatchNorm2d(8),
                                  nn.SiLU())
        self.dw = nn.Sequential(nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(8, 8, 5, 2, groups=8), nn.ReLU())
        self.pool = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(3, 2))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.pool(self.dw(self.stem(x)) - 1))  # - 1: the pool's zero pad matters


def test_tf_same_network_compiles_without_pad_kernels():
    model, x = randomize_(TFSame()).eval(), torch.randn(2, 3, 16, 16)
    report = torch_gie.explain(model, x, precision="fp32", backend="reference")
    assert not any(layer["op"] == "pad" for layer in report["layers"])
    assert [p for p in report["passes"] if p["name"] == "fold_padding"][0]["folded"] == 3
    compiled = torch_gie.compile(model, x, precision="fp32", backend="reference")
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5


def test_tf_same_network_on_triton():
    model, x = randomize_(TFSame()).eval(), torch.randn(1, 3, 16, 16)
    compiled = torch_gie.compile(model, x, precision="fp32", backend="triton")
    assert [layer["op"] for layer in compiled.report()["layers"]] == ["conv2d", "conv2d", "affine", "pool2d",
                                                                      "conv2d"]
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-4


@pytest.mark.parametrize("pool", [nn.AvgPool2d(3, 2, ceil_mode=True, count_include_pad=False),
                                  nn.MaxPool2d(3, 2, ceil_mode=True)], ids=["avg-ceil-exclude-pad", "max-ceil"])
def test_folded_pool_pads_on_triton(pool):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ZeroPad2d((2, 1, 0, 2)), pool).eval()
    with torch.no_grad():
        model[0].bias.fill_(-5.0)  # negative activations: the pad's zeros are the border maxima
    x = torch.rand(1, 3, 8, 9)
    compiled = torch_gie.compile(model, x, precision="fp32", backend="triton")
    assert [layer["op"] for layer in compiled.report()["layers"]] == ["conv2d", "pool2d"]
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-4
