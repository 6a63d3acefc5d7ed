"""Small CNNs written the way other code bases write them (darknet/YOLO, CSP, MobileFaceNet,
MobileNetV3's hand-written h-sigmoid, GhostNet, ConvNeXt's channels-first LayerNorm, 1D audio
nets), not torchvision's modules: each compiles on the reference backend (fp32) within 1e-5 of
eager, and whatever falls back is exactly the ops we expect, each listed with its op name."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_, rel_err
from torch import nn

import torch_gie


def compile_and_check(model: nn.Module, x: torch.Tensor, backend: str = "reference", tol: float = 1e-5):
    """Compile ``model`` (fp32), check it against eager on the example and on fresh data; returns
    the report. A model with fallbacks must warn once, naming each fallback op."""
    model = randomize_(model).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch_gie.compile(model, x, precision="fp32", backend=backend)
    report = compiled.report()
    fallback_warnings = [str(w.message) for w in caught if "PyTorch fallbacks" in str(w.message)]
    assert len(fallback_warnings) == bool(report["fallback_ops"])
    for f in report["fallback_ops"]:
        assert f"  {f['op']} x" in fallback_warnings[0]
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < tol
        x2 = torch.randn_like(x)
        assert rel_err(compiled(x2), model(x2)) < tol
    return report


def fallback_op_names(report) -> list[str]:
    return sorted(f["op"] for f in report["fallback_ops"])


def fused_kinds(report, kind: str) -> list[dict]:
    return [f for f in report["fusions"] if f["kind"] == kind]


# ---------------------------------------------------------------------------------------------
# Darknet / YOLO: conv-BN-LeakyReLU(0.1), TensorFlow "SAME" pads before stride-2 convs, a
# YOLOv5 Focus stem (space-to-depth by strided indexing), SPPF, route (cat) and Upsample.

class DarkConv(nn.Module):
    """darknet's `[convolutional]` block; stride 2 pads TF-style: (0, 1, 0, 1) before the conv."""

    def __init__(self, cin, cout, k=3, stride=1):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(cin, cout, k, stride, (k - 1) // 2 if stride == 1 else 0, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.LeakyReLU(0.1, inplace=True)

    def forward(self, x):
        if self.stride == 2:
            x = F.pad(x, (0, 1, 0, 1))
        return self.act(self.bn(self.conv(x)))


class DarkResidual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.reduce, self.expand = DarkConv(c, c // 2, 1), DarkConv(c // 2, c, 3)

    def forward(self, x):
        return x + self.expand(self.reduce(x))


class TinyDarknet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = DarkConv(3, 8)
        self.down1 = DarkConv(8, 16, 3, 2)
        self.res1 = DarkResidual(16)
        self.down2 = DarkConv(16, 32, 3, 2)
        self.res2 = DarkResidual(32)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))  # yolov3-tiny's size-preserving max pool
        self.pool = nn.MaxPool2d(2, 1)
        self.lateral = DarkConv(32, 16, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Conv2d(32, 12, 1)

    def forward(self, x):
        x = self.res1(self.down1(self.stem(x)))
        y = self.pool(self.pad(self.res2(self.down2(x))))
        route = torch.cat([self.up(self.lateral(y)), x], 1)
        return self.head(route)


def test_darknet_same_pads_fold_and_only_upsample_falls_back():
    report = compile_and_check(TinyDarknet(), torch.randn(2, 3, 16, 16))
    assert fallback_op_names(report) == ["Upsample"]
    assert report["fallback_ops"][0]["reason"] == "no lowering for module Upsample"
    # the two F.pad before stride-2 convs and the ZeroPad2d before the pool are all folded
    assert len([f for f in report["fusions"] if f.get("what") == "padding"]) == 3
    assert not any(layer["op"] == "pad" for layer in report["layers"])
    # every conv took its BN and its leaky ReLU (the residual blocks their add as well)
    epilogues = [layer.get("epilogue", "") for layer in report["layers"] if layer["op"] == "conv2d"]
    assert sum("leaky_relu(0.1)" in e for e in epilogues) == 8
    assert sum("+residual" in e for e in epilogues) == 2


class Focus(nn.Module):
    """YOLOv5's space-to-depth stem: four strided pixel grids concatenated on channels."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = DarkConv(4 * cin, cout, 3)

    def forward(self, x):
        return self.conv(torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1))


class SPPF(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2 = DarkConv(c, c // 2, 1), DarkConv(2 * c, c, 1)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


def test_focus_stem_and_sppf():
    model = nn.Sequential(Focus(3, 8), DarkConv(8, 16, 3, 2), SPPF(16))
    report = compile_and_check(model, torch.randn(2, 3, 16, 16))
    # the strided pixel grids are PyTorch indexing (not channel slices): copied into the cat;
    # SPPF's cat takes the 1x1 conv and the three pools in place
    assert report["concats_eliminated"] == 1 and report["concat_copies"] == 4
    assert not report["fallback_ops"]


# ---------------------------------------------------------------------------------------------
# CSP (YOLOv5 C3 / YOLOv8 C2f): a 1x1 conv split in two, one half through bottlenecks, cat.

class Bottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.SiLU())
        self.cv2 = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.SiLU())

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    def __init__(self, cin, cout, n=2):
        super().__init__()
        self.c = cout // 2
        self.cv1 = nn.Sequential(nn.Conv2d(cin, 2 * self.c, 1, bias=False), nn.BatchNorm2d(2 * self.c), nn.SiLU())
        self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))
        self.cv2 = nn.Sequential(nn.Conv2d((2 + n) * self.c, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())

    def forward(self, x):
        a, b = self.cv1(x).chunk(2, 1)
        y = [a, b]
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class C3(nn.Module):
    """Cross-stage partial: two 1x1 convs of the input, one through bottlenecks, cat, 1x1."""

    def __init__(self, cin, cout):
        super().__init__()
        c = cout // 2
        self.cv1, self.cv2 = nn.Conv2d(cin, c, 1), nn.Conv2d(cin, c, 1)
        self.m = Bottleneck(c)
        self.cv3 = nn.Conv2d(2 * c, cout, 1)

    def forward(self, x):
        return F.silu(self.cv3(torch.cat([self.m(F.silu(self.cv1(x))), F.silu(self.cv2(x))], 1)))


def test_csp_c2f_split_halves_are_views_and_the_cat_needs_only_their_copies():
    report = compile_and_check(C2f(8, 16), torch.randn(2, 8, 8, 8))
    assert not report["fallback_ops"]
    # the chunk halves are views of cv1's buffer (no kernels); the bottleneck outputs are written
    # in place into the cat; only the two halves (views of another buffer) are copied
    assert not any(layer["op"] == "channel_slice" for layer in report["layers"])
    assert report["concat_copies"] == 2
    assert sum(1 for layer in report["layers"] if layer["op"] == "conv2d") == 6


def test_csp_c3_siblings_merge_and_cat_is_free():
    report = compile_and_check(C3(8, 16), torch.randn(2, 8, 8, 8))
    assert not report["fallback_ops"]
    assert report["concats_eliminated"] == 1 and report["concat_copies"] == 0
    assert len(fused_kinds(report, "horizontal")) == 1  # cv1 and cv2 read x with equal geometry


# ---------------------------------------------------------------------------------------------
# MobileFaceNet: conv-BN-PReLU(C) (per-channel slopes), depthwise, linear bottlenecks with a
# residual, a global depthwise conv (GDC) and a Linear -> BatchNorm1d embedding.

class ConvBnPrelu(nn.Module):
    def __init__(self, cin, cout, k=1, s=1, p=0, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.prelu = nn.PReLU(cout)

    def forward(self, x):
        return self.prelu(self.bn(self.conv(x)))


class DepthWise(nn.Module):
    def __init__(self, c, expand, residual):
        super().__init__()
        self.residual = residual
        self.expand = ConvBnPrelu(c, expand)
        self.dw = ConvBnPrelu(expand, expand, 3, 1, 1, groups=expand)
        self.project = nn.Sequential(nn.Conv2d(expand, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


class MobileFaceNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBnPrelu(3, 16, 3, 2, 1)
        self.block = DepthWise(16, 32, residual=True)
        self.gdc = nn.Sequential(nn.Conv2d(16, 16, 8, groups=16, bias=False), nn.BatchNorm2d(16))
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(16, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.linear(self.flatten(self.gdc(self.block(self.stem(x))))))


def test_mobilefacenet_per_channel_prelu_fuses_into_convs():
    model = MobileFaceNetish()
    with torch.no_grad():  # distinct slopes per channel, some negative
        for m in model.modules():
            if isinstance(m, nn.PReLU):
                m.weight.copy_(torch.linspace(-0.5, 0.5, m.weight.numel()))
    report = compile_and_check(model, torch.randn(2, 3, 16, 16))
    assert not report["fallback_ops"]
    convs = [layer for layer in report["layers"] if layer["op"] == "conv2d"]
    assert sum(layer.get("epilogue") == "+prelu" for layer in convs) == 3
    assert any(layer.get("epilogue") == "+residual" for layer in convs)
    # conv, conv, dw conv, project (+residual), GDC and the Linear (BatchNorm1d folded)
    assert [layer["op"] for layer in report["layers"]] == ["conv2d"] * 5 + ["linear"]


# ---------------------------------------------------------------------------------------------
# MobileNetV3 as its authors' reference code writes it: h_sigmoid = relu6(x + 3) / 6,
# h_swish = x * h_sigmoid(x), SE = avgpool -> Linear -> ReLU -> Linear -> h_sigmoid -> view -> mul.

class HSigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU6(inplace=True)

    def forward(self, x):
        return self.relu(x + 3) / 6


class HSwish(nn.Module):
    def __init__(self):
        super().__init__()
        self.sigmoid = HSigmoid()

    def forward(self, x):
        return x * self.sigmoid(x)


class SELayer(nn.Module):
    def __init__(self, c, reduction=4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(c, c // reduction), nn.ReLU(inplace=True),
                                nn.Linear(c // reduction, c), HSigmoid())

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y


class InvertedResidualV3(nn.Module):
    def __init__(self, c, hidden):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), HSwish(),
            nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            SELayer(hidden), HSwish(),
            nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.conv(x)


def test_mobilenetv3_hand_written_hsigmoid_se_fuses():
    report = compile_and_check(InvertedResidualV3(8, 16), torch.randn(2, 8, 8, 8))
    assert not report["fallback_ops"]
    # relu6(x + 3) / 6 after the second Linear: the + 3 folds into its bias, relu6 into its
    # epilogue, so the SE still becomes one op (the / 6 stays a small affine on the (N, C) gate)
    assert sum(layer["op"] == "squeeze_excitation" for layer in report["layers"]) == 1
    assert not any(layer["op"] in ("adaptive_pool2d", "linear") for layer in report["layers"])
    assert report["layers"][-1]["op"] == "conv2d" and "+residual" in report["layers"][-1].get("epilogue", "")


# ---------------------------------------------------------------------------------------------
# Activations written by hand: SiLU as x * torch.sigmoid(x), Mish as x * tanh(softplus(x)).

class HandActs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn1(self.c1(x))
        y = y * torch.sigmoid(y)  # SiLU (EfficientNet-PyTorch's Swish)
        z = self.bn2(self.c2(y))
        return z * torch.tanh(F.softplus(z))  # Mish (YOLOv4's darknet port)


def test_hand_written_silu_and_mish_run_as_kernels():
    report = compile_and_check(HandActs(), torch.randn(2, 3, 8, 8))
    assert not report["fallback_ops"]
    # x * sigmoid(x) and x * tanh(softplus(x)) are recognised and fused into the convs' epilogues.
    assert [layer["op"] for layer in report["layers"]] == ["conv2d", "conv2d"]


# ---------------------------------------------------------------------------------------------
# EfficientNet-PyTorch (lukemelas): Conv2d subclasses with a static TF "SAME" ZeroPad2d and a
# functional conv, Swish by hand, and an SE whose gate multiplies from the left.

class Conv2dStaticSamePadding(nn.Conv2d):
    def __init__(self, cin, cout, k, stride=1, groups=1, bias=False, image_size=8):
        super().__init__(cin, cout, k, stride, groups=groups, bias=bias)
        oh = -(-image_size // stride)
        pad = max((oh - 1) * stride + k - image_size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class LukeMBConv(nn.Module):
    def __init__(self, c=8, expand=4, k=5, stride=2, image_size=8):
        super().__init__()
        e = c * expand
        self._expand_conv = Conv2dStaticSamePadding(c, e, 1, image_size=image_size)
        self._bn0 = nn.BatchNorm2d(e)
        self._depthwise_conv = Conv2dStaticSamePadding(e, e, k, stride, groups=e, image_size=image_size)
        self._bn1 = nn.BatchNorm2d(e)
        self._se_reduce = Conv2dStaticSamePadding(e, 2, 1, bias=True, image_size=1)
        self._se_expand = Conv2dStaticSamePadding(2, e, 1, bias=True, image_size=1)
        self._project_conv = Conv2dStaticSamePadding(e, c, 1, image_size=image_size // stride)
        self._bn2 = nn.BatchNorm2d(c)
        self._swish = Swish()

    def forward(self, inputs):
        x = self._swish(self._bn0(self._expand_conv(inputs)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        s = F.adaptive_avg_pool2d(x, 1)
        s = self._se_expand(self._swish(self._se_reduce(s)))
        x = torch.sigmoid(s) * x
        return self._bn2(self._project_conv(x))


def test_efficientnet_pytorch_block_matches_eager():
    compile_and_check(LukeMBConv(), torch.randn(2, 8, 8, 8))


def test_efficientnet_pytorch_functional_convs_are_lowered():
    report = compile_and_check(LukeMBConv(), torch.randn(2, 8, 8, 8))
    assert not report["fallback_ops"]
    # the 5x5/2 depthwise conv's static pad (1, 2, 1, 2) folds; the 1x1 convs' pads are empty
    assert not any(layer["op"] == "pad" for layer in report["layers"])
    # the gate written sigmoid(s) * x still folds into the projection (full-size operand first)
    assert report["layers"][-1]["op"] == "conv2d"
    assert report["layers"][-1]["input_shapes"] == [[2, 32, 4, 4], [2, 32, 1, 1]]


# ---------------------------------------------------------------------------------------------
# GhostNet's module: a primary conv, a cheap depthwise conv of it, cat, then keep the first
# `oup` channels with out[:, :oup, :, :].

class GhostModule(nn.Module):
    def __init__(self, inp, oup, ratio=2, relu=True):
        super().__init__()
        self.oup = oup
        init = -(-oup // ratio)
        new = init * (ratio - 1)
        self.primary = nn.Sequential(nn.Conv2d(inp, init, 1, bias=False), nn.BatchNorm2d(init),
                                     nn.ReLU(inplace=True) if relu else nn.Sequential())
        self.cheap = nn.Sequential(nn.Conv2d(init, new, 3, 1, 1, groups=init, bias=False), nn.BatchNorm2d(new),
                                   nn.ReLU(inplace=True) if relu else nn.Sequential())

    def forward(self, x):
        x1 = self.primary(x)
        x2 = self.cheap(x1)
        out = torch.cat([x1, x2], dim=1)
        return out[:, :self.oup, :, :]


def test_ghost_module_cat_is_free_and_slice_is_a_view():
    model = nn.Sequential(GhostModule(4, 7), GhostModule(7, 8, relu=False))
    report = compile_and_check(model, torch.randn(2, 4, 8, 8))
    assert not report["fallback_ops"]
    assert report["concats_eliminated"] == 2 and report["concat_copies"] == 0
    assert [layer["op"] for layer in report["layers"]] == ["conv2d"] * 4


# ---------------------------------------------------------------------------------------------
# ConvNeXt (facebookresearch): LayerNorm written by hand over channels-first tensors, and the
# block's layer scale applied to the channels-last tensor before the permute back (that scale
# is not folded yet: see test_sink_channel_permutes.py).

class LayerNormCF(nn.Module):
    """ConvNeXt's `LayerNorm(data_format="channels_first")`."""

    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = self.gamma * y
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), LayerNormCF(8))
        self.block = ConvNeXtBlock(8)
        self.down = nn.Sequential(LayerNormCF(8), nn.Conv2d(8, 16, 2, stride=2))

    def forward(self, x):
        return self.down(self.block(self.stem(x)))


def test_convnext_channels_first_layernorm_falls_back_op_by_op():
    report = compile_and_check(ConvNeXtish(), torch.randn(2, 3, 16, 16))
    # mean over the channel dim, x - u of two computed tensors, pow, sqrt, the division: PyTorch
    ops_left = fallback_op_names(report)
    assert ops_left.count("Tensor.mean") == 4 and ops_left.count("Tensor.pow") == 2
    assert ops_left.count("sqrt") == 2 and ops_left.count("sub") == 4 and ops_left.count("truediv") == 2
    assert all(f["reason"] for f in report["fallback_ops"])
    # the block itself: LayerNorm + both Linears ran as layer_norm and 1x1 convs
    assert any(layer["op"] == "layer_norm" for layer in report["layers"])


# ---------------------------------------------------------------------------------------------
# A 1D audio net (Conv1d -> BatchNorm1d -> PReLU on (N, C, L)): Conv1d falls back; the norm
# and the PReLU run along dim 1 in PyTorch.

class AudioNet(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.conv = nn.Conv1d(4, c, 3, padding=1)
        self.bn = nn.BatchNorm1d(c)
        self.act = nn.PReLU(c)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def test_batchnorm1d_on_sequence_features_compiles():
    compile_and_check(AudioNet(), torch.randn(2, 4, 7))


def test_batchnorm1d_on_square_sequence_features_matches_eager():
    compile_and_check(AudioNet(), torch.randn(2, 4, 16))


# ---------------------------------------------------------------------------------------------
# The Triton kernels (in the interpreter on CPU) on two of them, at tiny sizes.

def test_darknet_on_triton():
    report = compile_and_check(TinyDarknet(), torch.randn(1, 3, 16, 16), backend="triton", tol=1e-4)
    assert fallback_op_names(report) == ["Upsample"]
    assert all(layer["backend"] in ("triton", "pytorch") for layer in report["layers"])


def test_mobilefacenet_prelu_on_triton():
    model = MobileFaceNetish()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.PReLU):
                m.weight.copy_(torch.linspace(-0.5, 0.5, m.weight.numel()))
    report = compile_and_check(model, torch.randn(1, 3, 16, 16), backend="triton", tol=1e-4)
    assert not report["fallback_ops"]


# ---------------------------------------------------------------------------------------------
# GCNet's global context block (mmcv ContextBlock, avg pooling): a (N, C, 1, 1) channel term from
# 1x1 convs and LayerNorm([C/r, 1, 1]) broadcast-added to the feature map.

class ContextBlock(nn.Module):
    def __init__(self, c=8, r=4):
        super().__init__()
        self.channel_add_conv = nn.Sequential(nn.Conv2d(c, c // r, 1), nn.LayerNorm([c // r, 1, 1]),
                                              nn.ReLU(inplace=True), nn.Conv2d(c // r, c, 1))

    def forward(self, x):
        context = F.adaptive_avg_pool2d(x, 1)
        return x + self.channel_add_conv(context)


def test_gcnet_context_block_matches_eager():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ContextBlock())
    report = compile_and_check(model, torch.randn(2, 3, 8, 8))
    assert fallback_op_names(report) == ["LayerNorm"]  # normalized over (C, 1, 1), not the last dim only


def test_gcnet_context_block_runs_every_conv_on_triton():
    model = randomize_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ContextBlock())).eval()
    x = torch.randn(1, 3, 6, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch_gie.compile(model, x, precision="fp32", backend="triton")
    assert not [w for w in caught if "no kernel for layer" in str(w.message)]
    assert all(layer["backend"] == "triton" for layer in compiled.report()["layers"] if layer["op"] == "conv2d")


# ---------------------------------------------------------------------------------------------
# Side inputs of rank 0 or 1 (a softmax temperature, a per-column weight vector).

class WithSideInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * t


@pytest.mark.parametrize("side", [(), (1,), (6,)], ids=["0-d", "1-element", "per-column"])
def test_rank_0_and_1_inputs_compile(side):
    model, x, t = WithSideInput().eval(), torch.randn(2, 3, 5, 6), torch.rand(side) + 0.5
    compiled = torch_gie.compile(model, (x, t), precision="fp32", backend="reference")
    with torch.no_grad():
        assert rel_err(compiled(x, t), model(x, t)) < 1e-5
