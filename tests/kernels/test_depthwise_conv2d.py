"""Direct depthwise conv2d against torch.nn.functional.conv2d: kernel sizes, strides, channel
multipliers, layouts, output segments, fused epilogue, dtypes and input validation.

Outputs live in NaN-poisoned buffers, so unwritten elements and stray writes both fail. Shapes
are tiny: on CPU every kernel runs in the Triton interpreter.
"""
import pytest
import torch
import torch.nn.functional as F
from helpers import CONV_TOL, check_layer_fp16, check_written, conv_reference, poisoned
from test_conv2d import ACT_CASES, act_id, slope_for

from torch_gie.activations import Act, apply_activation
from torch_gie.kernels.depthwise_conv2d import (
    DepthwiseConv2d,
    default_depthwise_config,
    depthwise_conv2d,
    depthwise_conv2d_configs,
)

SMALL = {"BLOCK_M": 16, "BLOCK_C": 16, "num_warps": 4, "num_stages": 1}
TOL = CONV_TOL


def reference(x, w, b, stride, padding, dilation, act=None, res=None, post=None):
    """groups = C_in: depthwise; a 4-tuple padding is (top, bottom, left, right)."""
    groups = x.shape[1]
    if not isinstance(padding, int) and len(padding) == 4:
        top, bottom, left, right = padding
        x, padding = F.pad(x.float(), (left, right, top, bottom)), 0
    return conv_reference(x, w, b, stride, padding, dilation, groups, act, res, post)


def check(out, ref, dtype):
    check_written(out, ref, dtype)


def run(n, c, h, w, k, stride=1, padding=0, dilation=1, mult=1, *, dtype=torch.float32,
        device="cpu", act=None, bias=True, config=SMALL, x_slice=False, nchw=False):
    """Depthwise conv of x (optionally a channel slice of a bigger buffer, or NCHW) into a
    channel slice of a poisoned channels_last buffer; checks values and the poison around."""
    if x_slice:
        x = torch.randn(n, c + 6, h, w, device=device).to(dtype, memory_format=torch.channels_last)
        x = x[:, 4:4 + c]
    elif nchw:
        x = torch.randn(n, c, h, w, device=device, dtype=dtype)
    else:
        x = torch.randn(n, c, h, w, device=device).to(dtype, memory_format=torch.channels_last)
    wt = (torch.randn(c * mult, 1, k, k, device=device) / k).to(dtype)
    b = torch.randn(c * mult, device=device) if bias else None
    ref = reference(x, wt, b, stride, padding, dilation, act)
    big = poisoned((n, c * mult + 5, *ref.shape[2:]), dtype, device)
    out = big[:, 2:2 + c * mult]
    layer = DepthwiseConv2d(wt, b, stride=stride, padding=padding, dilation=dilation, groups=c,
                            activation=act, dtype=dtype, config=config)
    layer(x, [out])
    check(out, ref, dtype)
    assert big[:, :2].isnan().all() and big[:, 2 + c * mult:].isnan().all()


# name: (n, c, h, w, k, stride, padding, dilation, multiplier)
GEOMETRIES = {
    "3x3_s1": (2, 16, 6, 5, 3, 1, 1, 1, 1),
    "3x3_s2": (1, 24, 7, 7, 3, 2, 1, 1, 1),
    "5x5_s1": (1, 10, 6, 6, 5, 1, 2, 1, 1),
    "5x5_s2": (3, 8, 9, 7, 5, 2, 2, 1, 1),
    "7x7_convnext": (1, 20, 7, 7, 7, 1, 3, 1, 1),
    "3x3_no_pad": (1, 16, 5, 6, 3, 1, 0, 1, 1),
    "dilation2": (1, 16, 7, 7, 3, 1, 2, 2, 1),
    "odd_c3": (3, 3, 7, 5, 3, 1, 1, 1, 1),
    "multiplier2": (1, 6, 5, 5, 3, 1, 1, 1, 2),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry_fp32(name, device):
    run(*GEOMETRIES[name], device=device)


# TensorFlow "SAME" / folded ZeroPad2d padding (top, bottom, left, right):
# name -> (n, c, h, w, k, stride, pads)
ASYMMETRIC = {
    "same_3x3_s2": (2, 16, 8, 6, 3, 2, (0, 1, 0, 1)),
    "same_5x5_s2": (1, 12, 8, 7, 5, 2, (1, 2, 2, 2)),
    "bottom_right_larger": (1, 8, 7, 7, 3, 2, (1, 3, 0, 2)),
    "top_and_left_zero": (2, 8, 5, 6, 5, 1, (0, 4, 0, 3)),
    "only_left": (1, 8, 4, 5, 3, 1, (0, 0, 2, 0)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", list(ASYMMETRIC))
def test_asymmetric_padding(name, dtype, device):
    n, c, h, w, k, stride, pads = ASYMMETRIC[name]
    run(n, c, h, w, k, stride, pads, dtype=dtype, device=device, act="relu6")


@pytest.mark.parametrize("name", ["3x3_s2", "5x5_s1", "7x7_convnext", "multiplier2"])
def test_geometry_fp16(name, device):
    run(*GEOMETRIES[name], dtype=torch.float16, device=device)


@pytest.mark.parametrize("layout", ["x_slice", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_input_layouts(layout, dtype, device):
    run(2, 12, 5, 6, 3, padding=1, dtype=dtype, device=device, x_slice=layout == "x_slice",
        nchw=layout == "nchw")


def test_no_bias_nchw_output(device):
    x = torch.randn(2, 10, 6, 6, device=device)
    wt = torch.randn(10, 1, 3, 3, device=device)
    out = poisoned((2, 10, 3, 3), torch.float32, device, channels_last=False)
    DepthwiseConv2d(wt, stride=2, padding=1, groups=10, dtype=torch.float32, config=SMALL)(
        x, [out])
    check(out, reference(x, wt, None, 2, 1, 1), torch.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", ACT_CASES, ids=act_id)
def test_activations(act, dtype, device):
    """Every activation code with its parameters; PReLU's slope per channel of a 20-channel
    output (two 16-channel tiles, the second one's overhang wrapping)."""
    n, c = 2, 20
    x = (2 * torch.randn(n, c, 5, 4, device=device)).to(dtype, memory_format=torch.channels_last)
    wt = (torch.randn(c, 1, 3, 3, device=device) / 2).to(dtype)
    b = torch.randn(c, device=device)
    slope = slope_for(c, device, act)
    out = poisoned((n, c, 5, 4), dtype, device)
    DepthwiseConv2d(wt, b, padding=1, groups=c, activation=act, act_slope=slope, dtype=dtype,
                    config=SMALL)(x, [out])
    ref = apply_activation(conv_reference(x, wt, b, 1, 1, 1, c), act, slope)
    check(out, ref, dtype)


def test_prelu_post_activation_with_residual(device):
    n, c = 1, 12
    x = torch.randn(n, c, 5, 5, device=device).to(memory_format=torch.channels_last)
    wt, b = torch.randn(c, 1, 3, 3, device=device) / 3, torch.randn(c, device=device)
    res = torch.randn(n, c, 5, 5, device=device)
    slope = slope_for(c, device, "prelu")
    out = poisoned((n, c, 5, 5), torch.float32, device)
    DepthwiseConv2d(wt, b, padding=1, groups=c, activation=Act("clamp", -1, 1),
                    post_activation="prelu", act_slope=slope, dtype=torch.float32,
                    config=SMALL)(x, [out], res)
    y = conv_reference(x, wt, b, 1, 1, 1, c, Act("clamp", -1, 1), res)
    check(out, apply_activation(y, "prelu", slope), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act,post", [(None, "relu"), ("relu6", None), ("silu", "hardswish")])
def test_residual_post_activation(act, post, dtype, device):
    n, c = 2, 12
    x = torch.randn(n, c, 6, 6, device=device).to(dtype, memory_format=torch.channels_last)
    wt = (torch.randn(c, 1, 5, 5, device=device) / 5).to(dtype)
    b = torch.randn(c, device=device)
    res = torch.randn(n, c + 3, 3, 3, device=device).to(dtype, memory_format=torch.channels_last)
    res = res[:, 3:]  # a channel slice: storage offset and pixel stride c + 3
    out = poisoned((n, c, 3, 3), dtype, device)
    DepthwiseConv2d(wt, b, stride=2, padding=2, groups=c, activation=act, post_activation=post,
                    dtype=dtype, config=SMALL)(x, [out], residual=res)
    check(out, reference(x, wt, b, 2, 2, 1, act, res, post), dtype)


def test_segments_across_buffers(device):
    """3 segments in two buffers (channels_last and NCHW) carved from one flat storage."""
    n, c, oh, ow = 2, 12, 4, 3
    size_a, gap = n * 10 * oh * ow, 3
    flat = torch.full((size_a + gap + n * 9 * oh * ow,), float("nan"), device=device)

    def views(t):
        a = t.as_strided((n, 10, oh, ow), (10 * oh * ow, 1, ow * 10, 10), 0)
        b = t.as_strided((n, 9, oh, ow), (9 * oh * ow, oh * ow, ow, 1), size_a + gap)
        return b[:, 2:7], a[:, 1:5], a[:, 6:9]  # 5 + 4 + 3 channels, outs[0] last in memory

    x = torch.randn(n, c, oh, ow, device=device).to(memory_format=torch.channels_last)
    wt, b = torch.randn(c, 1, 3, 3, device=device), torch.randn(c, device=device)
    outs = views(flat)
    DepthwiseConv2d(wt, b, padding=1, groups=c, activation="hardswish", dtype=torch.float32,
                    config=SMALL)(x, list(outs))
    check(torch.cat(outs, dim=1), reference(x, wt, b, 1, 1, 1, "hardswish"), torch.float32)
    written = torch.zeros(flat.shape, dtype=torch.bool, device=device)
    for v in views(written):
        v.fill_(True)
    assert flat[~written].isnan().all(), "write outside the output segments"


def test_convenience_and_default_config(device):
    x = torch.randn(1, 40, 5, 5, device=device).to(memory_format=torch.channels_last)
    wt, b = torch.randn(40, 1, 3, 3, device=device), torch.randn(40, device=device)
    out = depthwise_conv2d(x, wt, b, stride=2, padding=1, activation="relu")  # default tiling
    assert out.shape == (1, 40, 3, 3) and out.is_contiguous(memory_format=torch.channels_last)
    check(out, reference(x, wt, b, 2, 1, 1, "relu"), torch.float32)


def test_configs():
    for c in (3, 16, 96, 672, 1152):
        cands = depthwise_conv2d_configs(c)
        assert cands[0] == default_depthwise_config(c) and len(cands) > 2
        for cfg in cands:
            assert cfg["BLOCK_M"] & (cfg["BLOCK_M"] - 1) == 0
            assert cfg["BLOCK_C"] & (cfg["BLOCK_C"] - 1) == 0


# Channel counts that are not multiples of 16 at channel offsets of 16-byte aligned (8), 8- and
# 4-byte aligned (4, 2) and odd (3) fp16 elements: x, the output and the residual reach the
# kernel through aligned bases plus leads, strides in units of the common vector width.
@pytest.mark.parametrize("x_off,out_off", [(0, 0), (8, 16), (4, 2), (3, 5)])
@pytest.mark.parametrize("c", [24, 72, 120, 184])
def test_odd_channel_counts_at_any_offset(c, x_off, out_off, device):
    n, h, w = 2, 5, 4
    x = torch.randn(n, c + 8, h, w, device=device).to(torch.float16, memory_format=torch.channels_last)
    x = x[:, x_off:x_off + c]
    wt = (torch.randn(c, 1, 3, 3, device=device) / 3).half()
    b = torch.randn(c, device=device)
    res = torch.randn(n, c + 8, h, w, device=device).to(torch.float16, memory_format=torch.channels_last)
    res = res[:, 8 - out_off // 2:8 - out_off // 2 + c]
    big = poisoned((n, c + 8 + out_off, h, w), torch.float16, device)
    out = big[:, out_off:out_off + c]
    config = {"BLOCK_M": 16, "BLOCK_C": 64, "num_warps": 4, "num_stages": 1}
    DepthwiseConv2d(wt, b, padding=1, groups=c, activation="relu6", post_activation="silu",
                    dtype=torch.float16, config=config)(x, [out], res)
    check(out, reference(x, wt, b, 1, 1, 1, "relu6", res, "silu"), torch.float16)
    assert big[:, :out_off].isnan().all() and big[:, out_off + c:].isnan().all()


def test_odd_channel_counts_get_fitted_tiles():
    """72 channels fill 128-lane tiles to 56%: 16-channel tiles (80 lanes) come second and
    third; 184 gets 64-wide tiles (3 tiles, 192 lanes); 120 (94% of 128) and powers of two
    keep their candidate lists."""
    assert [(c["BLOCK_M"], c["BLOCK_C"]) for c in depthwise_conv2d_configs(72)[1:3]] == [(128, 16), (256, 16)]
    assert [(c["BLOCK_M"], c["BLOCK_C"]) for c in depthwise_conv2d_configs(184)[1:3]] == [(32, 64), (64, 64)]
    assert all(c["BLOCK_C"] == 128 for c in depthwise_conv2d_configs(120)[:5])
    assert [c["BLOCK_C"] for c in depthwise_conv2d_configs(64)[:5]] == [64] * 5
    for c in (72, 120, 184, 672):
        cands = depthwise_conv2d_configs(c)
        assert len(cands) == len({tuple(sorted(cfg.items())) for cfg in cands})


@pytest.mark.parametrize("c", [24, 72])
def test_first_candidates_compute_the_conv(c, device):
    """What the tuner times (the first 8 candidates) on a 5x5 stride-2 and a 3x3 layer."""
    for config in depthwise_conv2d_configs(c)[:8]:
        run(1, c, 9, 7, 5, 2, 2, dtype=torch.float16, device=device, config=config)
        run(2, c, 5, 4, 3, 1, 1, device=device, config=config)


@pytest.mark.parametrize("weight,kw,match", [
    ((8, 2, 3, 3), {"groups": 8}, "groups == C_in"),
    ((8, 1, 3, 3), {"groups": 16}, "groups"),
    ((8, 1, 3, 3), {"groups": 8, "config": {**SMALL, "BLOCK_M": 24}}, "BLOCK_M"),
    ((8, 1, 3, 3), {"groups": 8, "config": {"BLOCK_M": 16, "BLOCK_N": 16}}, "missing"),
])
def test_bad_layer_arguments(weight, kw, match):
    with pytest.raises(ValueError, match=match):
        DepthwiseConv2d(torch.randn(*weight), dtype=torch.float32, **kw)


def test_bad_call_arguments(device):
    layer = DepthwiseConv2d(torch.randn(8, 1, 3, 3, device=device), padding=1, groups=8,
                            dtype=torch.float32, config=SMALL)
    x = torch.randn(1, 8, 5, 5, device=device)
    out = torch.empty(1, 8, 5, 5, device=device)
    cases = [
        ((torch.randn(1, 4, 5, 5, device=device), [out]), "x must be 4D"),
        ((x.half(), [out]), "expected torch.float32, got torch.float16"),
        ((x, [torch.empty(1, 8, 3, 3, device=device)]), "expected"),
        ((x, [out[:, :4], out[:, 4:]], out), "single output view"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            layer(*args)


# MobileNetV2/V3, EfficientNet, ConvNeXt depthwise layers (C, k, stride, H) at batch 8, fp16.
MOBILE_LAYERS = [
    (32, 3, 1, 112), (96, 3, 2, 112), (144, 5, 2, 56), (240, 5, 1, 28), (672, 5, 2, 14),
    (1152, 3, 1, 7), (96, 7, 1, 56), (768, 7, 1, 7),
]


def _gpu_case(c, k, s, h):
    dev = torch.device("cuda")
    x = torch.randn(8, c, h, h, device=dev).to(torch.float16, memory_format=torch.channels_last)
    wt = (torch.randn(c, 1, k, k, device=dev) / k).half()
    b = torch.randn(c, device=dev)
    ref = reference(x, wt, b, s, k // 2, 1, "hardswish")
    return x, ref, DepthwiseConv2d(wt, b, stride=s, padding=k // 2, groups=c,
                                   activation="hardswish")


@pytest.mark.gpu
@pytest.mark.parametrize("c,k,s,h", MOBILE_LAYERS)
def test_mobile_layers_gpu(c, k, s, h):
    check_layer_fp16(*_gpu_case(c, k, s, h))  # default config


@pytest.mark.gpu
@pytest.mark.parametrize("c,k,s,h", [MOBILE_LAYERS[2], MOBILE_LAYERS[6]])
def test_all_configs_gpu(c, k, s, h):
    x, ref, layer = _gpu_case(c, k, s, h)
    for config in layer.configs:
        layer.config = config
        check_layer_fp16(x, ref, layer)
