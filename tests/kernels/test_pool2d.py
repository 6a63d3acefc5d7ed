"""Pooling kernels against torch.nn.functional on fp32 references, outputs poisoned first."""
import helpers
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rest_poisoned, rel_err

from torch_gie.kernels.pool2d import (
    AdaptiveAvgPool2d,
    AdaptiveMaxPool2d,
    AdaptivePool2d,
    Pool2d,
    adaptive_avg_pool2d,
    adaptive_pool2d,
    pool2d,
)

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def channel_slice(n, c, h, w, dtype, device, fill=None, extra=5):
    return helpers.channel_slice((n, c, h, w), dtype, device, fill, extra)


def check(out, ref, kind, dtype):
    if kind == "max":  # a max selects one input value: exact in any dtype
        assert torch.equal(out.float(), ref)
    else:
        assert rel_err(out, ref) < TOL[dtype]


# (kind, kernel, stride, padding, dilation, ceil_mode, count_include_pad, divisor_override)
POOLS = [
    ("max", 3, 2, 1, 1, False, True, None),  # ResNet stem
    ("avg", 3, 2, 1, 1, False, True, None),
    ("avg", 3, 2, 1, 1, False, False, None),
    ("max", 2, 2, 0, 1, False, True, None),  # VGG
    ("avg", 2, 2, 0, 1, False, True, None),  # DenseNet transition
    ("max", 3, 1, 1, 1, True, True, None),  # GoogLeNet inception branch
    ("max", 3, 2, 0, 1, True, True, None),  # GoogLeNet stem: windows overhang the input
    ("avg", 3, 2, 1, 1, True, True, None),  # overhanging windows clipped at input + padding
    ("avg", 3, 2, 1, 1, True, False, None),
    ("avg", 3, 1, 1, 1, False, True, None),  # Inception-v3 branch pool
    ("avg", 3, 1, 1, 1, False, False, None),
    ("avg", 3, 2, 1, 1, False, True, 5),
    ("max", 3, 2, 1, 2, False, True, None),
    ("max", (3, 2), (2, 1), (1, 0), (1, 2), False, True, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hw", [(9, 11), (8, 10)])
@pytest.mark.parametrize("params", POOLS, ids=lambda p: "-".join(map(str, p)))
def test_pool2d(device, dtype, hw, params):
    kind, k, s, p, d, ceil_mode, cip, div = params
    torch.manual_seed(0)
    _, x = channel_slice(2, 5, *hw, dtype, device)
    layer = Pool2d(kind, k, s, p, d, ceil_mode, cip, div)
    oh, ow = layer.output_size(*hw)
    buf, out = channel_slice(2, 5, oh, ow, dtype, device, fill=float("nan"))
    layer(x, out)
    if kind == "max":
        ref = F.max_pool2d(x.float(), k, s, p, d, ceil_mode)
    else:
        ref = F.avg_pool2d(x.float(), k, s, p, ceil_mode, cip, div)
    assert tuple(ref.shape[2:]) == (oh, ow)
    check(out, ref, kind, dtype)
    assert_rest_poisoned(buf, 5)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool2d_nchw_many_channels(device, kind):
    # Plain NCHW input (channels strided) and more channels than one block.
    torch.manual_seed(1)
    x = torch.randn(1, 70, 6, 7, device=device)
    out = pool2d(x, kind, 3, 2, 1)
    ref = F.max_pool2d(x, 3, 2, 1) if kind == "max" else F.avg_pool2d(x, 3, 2, 1)
    check(out, ref, kind, torch.float32)


# (kind, kernel, stride, (top, bottom, left, right), dilation, ceil_mode, count_include_pad,
#  divisor_override): padding folded from an explicit zero pad (pad_is_zeros).
ZERO_PADDED = [
    ("avg", 3, 2, (0, 1, 0, 1), 1, False, True, None),  # TensorFlow "SAME" (EfficientNet ports)
    ("avg", 3, 2, (0, 1, 0, 1), 1, False, False, None),  # count_include_pad: the zeros are real
    ("avg", 3, 1, (1, 1, 1, 1), 1, True, False, None),
    ("avg", 3, 2, (2, 0, 1, 2), 1, True, True, None),  # ceil_mode windows overhang the padding
    ("avg", 2, 2, (3, 0, 0, 3), 1, False, True, None),  # windows wholly inside the padding
    ("avg", 3, 2, (1, 2, 0, 1), 1, True, False, 4),
    ("max", 3, 2, (0, 1, 0, 1), 1, False, True, None),  # a max sees the zeros
    ("max", 2, 2, (1, 0, 0, 1), 1, True, True, None),
    ("max", 3, 2, (3, 1, 0, 2), 1, True, True, None),
    ("max", 3, 1, (0, 2, 1, 0), 2, False, True, None),
]


def padded(x, pads, value=0.0):
    t, b, left, r = pads
    return F.pad(x.float(), (left, r, t, b), value=value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hw", [(9, 11), (8, 10)])
@pytest.mark.parametrize("params", ZERO_PADDED, ids=lambda p: "-".join(map(str, p)))
def test_pool2d_zero_padded(device, dtype, hw, params):
    # Exactly pool(F.pad(x, pads), padding=0), whatever count_include_pad says.
    kind, k, s, pads, d, ceil_mode, cip, div = params
    torch.manual_seed(5)
    _, x = channel_slice(2, 5, *hw, dtype, device)
    layer = Pool2d(kind, k, s, pads, d, ceil_mode, cip, div, pad_is_zeros=True)
    oh, ow = layer.output_size(*hw)
    buf, out = channel_slice(2, 5, oh, ow, dtype, device, fill=float("nan"))
    layer(x, out)
    if kind == "max":
        ref = F.max_pool2d(padded(x, pads), k, s, 0, d, ceil_mode)
    else:
        ref = F.avg_pool2d(padded(x, pads), k, s, 0, ceil_mode, cip, div)
    assert tuple(ref.shape[2:]) == (oh, ow)
    check(out, ref, kind, dtype)
    assert_rest_poisoned(buf, 5)


@pytest.mark.parametrize("pads", [(0, 1, 1, 0), (1, 0, 0, 1), (1, 1, 0, 1)])
@pytest.mark.parametrize("kind,cip", [("max", True), ("avg", True), ("avg", False)])
def test_pool2d_asymmetric_implicit_padding(device, pads, kind, cip):
    # Four-sided padding that is not data: a max ignores it (-inf), an average counts it only with
    # count_include_pad, as PyTorch's symmetric padding does.
    torch.manual_seed(6)
    _, x = channel_slice(2, 5, 7, 8, torch.float32, device)
    layer = Pool2d(kind, 3, 2, pads, 1, False, cip)
    out = torch.full((2, 5, *layer.output_size(7, 8)), float("nan"), device=device)
    layer(x, out)
    if kind == "max":
        ref = F.max_pool2d(padded(x, pads, float("-inf")), 3, 2)
    elif cip:
        ref = F.avg_pool2d(padded(x, pads), 3, 2)
    else:  # window sums over the count of real input pixels under each window
        ones = torch.ones_like(x)
        ref = (F.avg_pool2d(padded(x, pads), 3, 2, divisor_override=1)
               / F.avg_pool2d(padded(ones, pads), 3, 2, divisor_override=1))
    check(out, ref, kind, torch.float32)


def test_pool2d_padding_forms(device):
    x = torch.randn(1, 3, 9, 8, device=device)
    ref = F.max_pool2d(x, 3, 2, (1, 0))
    for padding in [(1, 0), (1, 1, 0, 0)]:
        assert torch.equal(pool2d(x, "max", 3, 2, padding), ref)
    assert Pool2d("avg", 3, 2, (1, 1, 0, 0)).padding == (1, 1, 0, 0)
    assert Pool2d("avg", 3, 2, 1).padding == (1, 1, 1, 1)


ADAPTIVE = [
    ((13, 11), (1, 1), 70),  # global: two channel blocks, one split
    ((40, 41), (1, 1), 5),  # global split over programs (a partial last chunk)
    ((13, 11), (7, 7), 5),
    ((5, 7), (2, 3), 5),
    ((7, 7), (7, 7), 3),  # identity (torchvision VGG/AlexNet heads at 224)
    ((4, 6), (8, 9), 3),  # upsampling: windows of one pixel, repeated
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("in_hw,out_hw,c", ADAPTIVE)
def test_adaptive_pool2d(device, dtype, kind, in_hw, out_hw, c):
    torch.manual_seed(2)
    _, x = channel_slice(2, c, *in_hw, dtype, device)
    buf, out = channel_slice(2, c, *out_hw, dtype, device, fill=float("nan"))
    layer = AdaptiveAvgPool2d(out_hw) if kind == "avg" else AdaptiveMaxPool2d(out_hw)
    layer(x, out)
    ref = (F.adaptive_avg_pool2d if kind == "avg" else F.adaptive_max_pool2d)(x.float(), out_hw)
    check(out, ref, kind, dtype)
    assert_rest_poisoned(buf, c)


def test_adaptive_convenience_and_none(device):
    x = torch.randn(1, 4, 6, 5, device=device)
    assert rel_err(adaptive_avg_pool2d(x, 1), F.adaptive_avg_pool2d(x, 1)) < 1e-5
    assert torch.equal(adaptive_pool2d(x, "max", (2, 3)), F.adaptive_max_pool2d(x, (2, 3)))
    out = torch.empty(1, 4, 3, 5, device=device)
    AdaptiveAvgPool2d((3, None))(x, out)  # None keeps the input width, as in PyTorch
    assert rel_err(out, F.adaptive_avg_pool2d(x, (3, None))) < 1e-5


def test_pool2d_errors(device):
    x = torch.randn(1, 3, 8, 8, device=device)
    with pytest.raises(ValueError, match="kind"):
        Pool2d("min", 3)
    with pytest.raises(ValueError, match="at most half"):
        Pool2d("max", 3, 1, 2)
    with pytest.raises(ValueError, match="at most half"):
        Pool2d("avg", 3, 1, (0, 2, 0, 0))
    Pool2d("avg", 3, 1, (0, 2, 0, 0), pad_is_zeros=True)  # real zeros: any amount
    with pytest.raises(ValueError, match="padding must be"):
        Pool2d("max", 3, 1, (1, 1, 1))
    with pytest.raises(ValueError, match="padding must be"):
        Pool2d("max", 3, 1, -1)
    with pytest.raises(ValueError, match="no dilation"):
        Pool2d("avg", 3, dilation=2)
    with pytest.raises(ValueError, match="divisor_override"):
        Pool2d("avg", 3, divisor_override=0)
    with pytest.raises(ValueError, match="kernel_size"):
        Pool2d("max", 0)
    layer = Pool2d("max", 3, 2, 1)
    with pytest.raises(ValueError, match=r"gives \(4, 4\)"):
        layer(x, torch.empty(1, 3, 5, 5, device=device))
    with pytest.raises(ValueError, match="keep x's"):
        layer(x, torch.empty(1, 4, 4, 4, device=device))
    with pytest.raises(ValueError, match="dtype"):
        layer(x, torch.empty(1, 3, 4, 4, device=device, dtype=torch.float16))
    with pytest.raises(ValueError, match="4D"):
        layer(x[0], torch.empty(3, 4, 4, device=device))
    with pytest.raises(ValueError, match="out spatial size"):
        AdaptiveAvgPool2d(2)(x, torch.empty(1, 3, 3, 3, device=device))
    with pytest.raises(ValueError, match="4D"):
        adaptive_avg_pool2d(x[0], 1)
    with pytest.raises(ValueError, match="kind"):
        AdaptivePool2d("min", 1)


def test_output_size_matches_pytorch():
    # Includes ceil_mode cases where the last window would start in the right padding (dropped).
    for k, s, p, d in [(2, 2, 1, 1), (3, 2, 0, 1), (3, 2, 1, 1), (3, 1, 1, 1), (3, 3, 1, 2)]:
        for size in range(max(k, 2), 13):
            for ceil_mode in (False, True):
                x = torch.zeros(1, 1, size, size + 1)
                expected = tuple(F.max_pool2d(x, k, s, p, d, ceil_mode).shape[2:])
                assert Pool2d("max", k, s, p, d, ceil_mode).output_size(size, size + 1) == expected


@pytest.mark.gpu
def test_resnet_maxpool_gpu():
    torch.manual_seed(3)
    x = torch.randn(8, 64, 112, 112, device="cuda").half()
    x = x.contiguous(memory_format=torch.channels_last)
    buf, out = channel_slice(8, 64, 56, 56, torch.float16, "cuda", fill=float("nan"))
    Pool2d("max", 3, 2, 1)(x, out)
    check(out, F.max_pool2d(x.float(), 3, 2, 1), "max", torch.float16)
    assert_rest_poisoned(buf, 64)
