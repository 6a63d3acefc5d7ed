"""Implicit-GEMM conv2d against torch.nn.functional.conv2d: geometry, layouts (channel slices,
NCHW, storage offsets), output segments, fused epilogue, split-K, dtypes and input validation.

Outputs live in NaN-poisoned buffers, so an unwritten element fails the comparison and a stray
write outside the target views fails the poison check. Shapes are tiny: on CPU every kernel
runs in the Triton interpreter.
"""
import pytest
import torch
import torch.nn.functional as F
from helpers import CONV_TOL, check_layer_fp16, check_written, conv_reference, poisoned, rel_err

from torch_gie.activations import ACTIVATION_NAMES, Act, apply_activation
from torch_gie.kernels.conv2d import Conv2d, conv2d, input_args
from torch_gie.kernels.conv2d_configs import NUM_SMS, RESIDUAL_TWINS, conv2d_configs, default_conv2d_config
from torch_gie.kernels.conv_epilogue import epilogue_args, flat_pixels, segment_args
from torch_gie.kernels.depthwise_conv2d import DepthwiseConv2d, depthwise_conv2d_configs
from torch_gie.kernels.layer_args import aligned_base, vector_width

SMALL = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
SMALL_FLAT = {**SMALL, "FLAT_K": True}  # the (tap, channel block) loop as one runtime loop
SMALL_GATHER = {**SMALL, "GATHER_K": True}  # few input channels: K gathered across taps
SMALL_FOLD = {**SMALL, "FOLD_KW": True}  # few input channels: kw folded into c on NHWC, else gathered
SMALL_SPLIT = {**SMALL_FLAT, "SPLIT_K": 4}  # 4 partial sums, then the epilogue in a second kernel
TOL = CONV_TOL


# Every activation code, the parametrized ones with non-default parameters.
_PARAMS = {"leaky_relu": Act("leaky_relu", 0.2), "elu": Act("elu", 0.7), "clamp": Act("clamp", -1, 2)}
ACT_CASES = [_PARAMS.get(name, name) for name in ACTIVATION_NAMES]
assert len(ACT_CASES) == len(ACTIVATION_NAMES)


def act_id(act) -> str:
    return str(act)


def slope_for(c_out, device, *acts):
    """PReLU's per-channel slope (both signs, never trivial) when one of ``acts`` is prelu."""
    names = [a.name if isinstance(a, Act) else a for a in acts]
    if "prelu" not in names:
        return None
    return torch.linspace(-0.5, 1.5, c_out, device=device) + 0.1 * torch.rand(c_out, device=device)


def reference(x, w, b, stride, padding, dilation, groups, act=None, res=None, post=None, slope=None):
    if not isinstance(padding, int) and len(padding) == 4:  # (top, bottom, left, right)
        top, bottom, left, right = padding
        x, padding = F.pad(x.float(), (left, right, top, bottom)), 0
    if slope is None:
        return conv_reference(x, w, b, stride, padding, dilation, groups, act, res, post)
    y = F.conv2d(x.float(), w.float(), None if b is None else b.float(), stride, padding, dilation, groups)
    y = apply_activation(y, act, slope)
    return apply_activation(y if res is None else y + res.float(), post, slope)


def check(out, ref, dtype):
    check_written(out, ref, dtype)


def run(n, c_in, c_out, h, w, k, stride=1, padding=0, dilation=1, groups=1, *, dtype=torch.float32,
        device="cpu", act=None, config=SMALL, x_slice=False, nchw=False, out_slice=True):
    """Build inputs (optionally as a channel slice of a bigger buffer or NCHW), run the bound
    layer into a channel slice of a poisoned channels_last buffer and check both."""
    kh, kw = (k, k) if isinstance(k, int) else k
    if x_slice:  # channels [2, 2 + c_in) of a channels_last buffer: storage offset + pixel stride
        x = torch.randn(n, c_in + 5, h, w, device=device)
        x = x.to(dtype, memory_format=torch.channels_last)[:, 2:2 + c_in]
    elif nchw:
        x = torch.randn(n, c_in, h, w, device=device, dtype=dtype)
    else:
        x = torch.randn(n, c_in, h, w, device=device).to(dtype, memory_format=torch.channels_last)
    fan_in = c_in // groups * kh * kw
    wt = (torch.randn(c_out, c_in // groups, kh, kw, device=device) / fan_in**0.5).to(dtype)
    b = torch.randn(c_out, device=device)
    ref = reference(x, wt, b, stride, padding, dilation, groups, act)
    big = poisoned((n, c_out + 7 if out_slice else c_out, *ref.shape[2:]), dtype, device)
    out = big[:, 3:3 + c_out] if out_slice else big
    layer = Conv2d(wt, b, stride=stride, padding=padding, dilation=dilation, groups=groups,
                   activation=act, dtype=dtype, config=config)
    layer(x, [out])
    check(out, ref, dtype)
    if out_slice:
        assert big[:, :3].isnan().all() and big[:, 3 + c_out:].isnan().all()


# name: (n, c_in, c_out, h, w, k, stride, padding, dilation, groups)
GEOMETRIES = {
    "1x1": (2, 16, 32, 4, 4, 1, 1, 0, 1, 1),
    "1x1_stride2": (1, 8, 16, 7, 6, 1, 2, 0, 1, 1),
    "3x3_pad1": (1, 8, 16, 6, 5, 3, 1, 1, 1, 1),
    "3x3_stride2": (1, 8, 16, 7, 7, 3, 2, 1, 1, 1),
    "5x5_pad2": (1, 4, 8, 6, 6, 5, 1, 2, 1, 1),
    "7x7_stride2_pad3": (1, 3, 16, 9, 9, 7, 2, 3, 1, 1),
    "dilation2": (1, 8, 16, 7, 7, 3, 1, 2, 2, 1),
    "odd_sizes_batch3": (3, 3, 10, 7, 5, 3, 1, 1, 1, 1),
    "no_pad_3x3": (2, 5, 10, 5, 6, 3, 1, 0, 1, 1),
    "asymmetric": (1, 8, 16, 7, 5, (3, 1), (2, 1), (1, 0), 1, 1),
    "k_loop_ragged": (1, 40, 24, 3, 3, 3, 1, 1, 1, 1),  # 40 = 2.5 BLOCK_K
    "k_loop_even": (1, 32, 16, 3, 4, 1, 1, 0, 1, 1),
    "groups2": (1, 8, 12, 5, 5, 3, 1, 1, 1, 2),
    "groups4": (3, 16, 16, 4, 5, 3, 1, 1, 1, 4),
    "groups8_width2": (1, 16, 32, 4, 4, 3, 2, 1, 1, 8),
}


@pytest.mark.parametrize("config", [SMALL, SMALL_FLAT, SMALL_GATHER], ids=["unrolled", "flat", "gather"])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry_fp32(name, config, device):
    run(*GEOMETRIES[name], device=device, config=config)


@pytest.mark.parametrize("name", ["1x1", "3x3_pad1", "7x7_stride2_pad3", "odd_sizes_batch3",
                                  "groups4"])
def test_geometry_fp16(name, device):
    run(*GEOMETRIES[name], dtype=torch.float16, device=device, config=SMALL_FLAT)


@pytest.mark.parametrize("layout", ["x_slice", "nchw", "out_full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layouts(layout, dtype, device):
    run(2, 12, 20, 5, 6, 3, padding=1, groups=2, dtype=dtype, device=device, config=SMALL_FLAT,
        x_slice=layout == "x_slice", nchw=layout == "nchw", out_slice=layout != "out_full")


def test_nchw_output(device):
    x = torch.randn(2, 6, 5, 5, device=device)
    wt, b = torch.randn(10, 6, 3, 3, device=device), torch.randn(10, device=device)
    out = poisoned((2, 10, 5, 5), torch.float32, device, channels_last=False)
    Conv2d(wt, b, padding=1, dtype=torch.float32, config=SMALL)(x, [out])
    check(out, reference(x, wt, b, 1, 1, 1, 1), torch.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("config", [SMALL, SMALL_SPLIT], ids=["direct", "split_k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", ACT_CASES, ids=act_id)
def test_activations(act, dtype, config, device):
    """Every activation code with its parameters (PReLU with a per-channel slope) on a 20-channel
    output: the tile's columns past C_out wrap, so the slope is read in range."""
    n, c_in, c_out = 2, 8, 20
    x = (2 * torch.randn(n, c_in, 5, 4, device=device)).to(dtype, memory_format=torch.channels_last)
    wt = (torch.randn(c_out, c_in, 3, 3, device=device) / 4).to(dtype)
    b = torch.randn(c_out, device=device)
    slope = slope_for(c_out, device, act)
    out = poisoned((n, c_out, 5, 4), dtype, device)
    Conv2d(wt, b, padding=1, activation=act, act_slope=slope, dtype=dtype, config=config)(x, [out])
    check(out, reference(x, wt, b, 1, 1, 1, 1, act, slope=slope), dtype)


@pytest.mark.parametrize("config", [SMALL, SMALL_SPLIT], ids=["direct", "split_k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act,post", [
    (None, "relu"), ("relu", None), ("silu", "hardswish"), ("prelu", Act("clamp", -0.5, 1.5)),
    (Act("leaky_relu", 0.2), "prelu"), (Act("elu", 0.7), "mish"),
], ids=str)
def test_residual_post_activation(act, post, dtype, config, device):
    n, c_in, c_out = 2, 8, 12
    x = torch.randn(n, c_in, 6, 6, device=device).to(dtype, memory_format=torch.channels_last)
    wt = (torch.randn(c_out, c_in, 3, 3, device=device) / 8).to(dtype)
    b = torch.randn(c_out, device=device)
    slope = slope_for(c_out, device, act, post)
    # The residual is itself a channel slice of a channels_last buffer.
    res = torch.randn(n, c_out + 4, 3, 3, device=device)
    res = res.to(dtype, memory_format=torch.channels_last)[:, 4:]
    out = poisoned((n, c_out, 3, 3), dtype, device)
    Conv2d(wt, b, stride=2, padding=1, activation=act, post_activation=post, act_slope=slope,
           dtype=dtype, config=config)(x, [out], residual=res)
    check(out, reference(x, wt, b, 2, 1, 1, 1, act, res, post, slope), dtype)


def test_residual_twins_follow_the_first_short_k_candidates():
    """A layer built for a residual epilogue offers, after each of its first RESIDUAL_TWINS
    candidates whose K loop is short (1x1 over at most two K steps), the same tiling loading the
    residual after the loop; layers without one, or with long K loops, are unchanged."""
    w1 = torch.randn(512, 128, 1, 1)
    plain = Conv2d(w1, input_hw=(28, 28), batch=128).configs
    with_res = Conv2d(w1, input_hw=(28, 28), batch=128, residual=True).configs
    twins = [c for c in with_res if c.get("PREFETCH_RES") is False]
    assert len(twins) == RESIDUAL_TWINS
    for twin in twins:
        i = with_res.index(twin)
        assert with_res[i - 1] == {k: v for k, v in twin.items() if k != "PREFETCH_RES"}
    assert [c for c in with_res if c not in twins] == plain
    w3 = torch.randn(64, 64, 3, 3)  # nine taps: never short
    assert Conv2d(w3, padding=1, residual=True).configs == Conv2d(w3, padding=1).configs


@pytest.mark.parametrize("prefetch", [True, False])
def test_residual_after_the_loop(prefetch, device):
    x = torch.randn(2, 32, 5, 5, device=device).to(torch.float16, memory_format=torch.channels_last)
    wt = (torch.randn(24, 32, 1, 1, device=device) / 6).half()
    b = torch.randn(24, device=device)
    res = torch.randn(2, 24, 5, 5, device=device).to(torch.float16, memory_format=torch.channels_last)
    out = poisoned((2, 24, 5, 5), torch.float16, device)
    cfg = {**SMALL, "BLOCK_K": 32, "PREFETCH_RES": prefetch}
    Conv2d(wt, b, post_activation="relu", dtype=torch.float16, config=cfg, residual=True)(x, [out], residual=res)
    check(out, reference(x, wt, b, 1, 0, 1, 1, None, res, "relu"), torch.float16)


def test_act_slope_checks():
    wt = torch.randn(8, 4, 3, 3)
    with pytest.raises(ValueError, match=r"act_slope, a tensor of shape \(8,\)"):
        Conv2d(wt, activation="prelu")
    with pytest.raises(ValueError, match=r"shape \(8,\).*got \(4,\)"):
        Conv2d(wt, post_activation="prelu", act_slope=torch.rand(4))
    with pytest.raises(ValueError, match="both prelu"):
        Conv2d(wt, activation="prelu", post_activation="prelu", act_slope=torch.rand(8))
    with pytest.raises(ValueError, match="neither activation"):
        Conv2d(wt, activation="relu", act_slope=torch.rand(8))
    with pytest.raises(TypeError, match="an activation must be"):
        Conv2d(wt, activation=3)
    layer = Conv2d(wt, activation=Act("leaky_relu", 0.1), post_activation="prelu",
                   act_slope=torch.rand(8, dtype=torch.float16))
    assert layer.act_slope.dtype == torch.float32 and layer.activation == Act("leaky_relu", 0.1)
    assert (layer.act, layer.post_act) == (ACTIVATION_NAMES.index("leaky_relu"), ACTIVATION_NAMES.index("prelu"))


@pytest.mark.parametrize("config", [SMALL, SMALL_SPLIT], ids=["direct", "split_k"])
def test_residual_in_place(config, device):
    """out = relu(conv(x) + out): each element's residual is read before it is overwritten."""
    x = torch.randn(1, 8, 5, 5, device=device).to(memory_format=torch.channels_last)
    wt, b = torch.randn(16, 8, 1, 1, device=device), torch.randn(16, device=device)
    out = torch.randn(1, 16, 5, 5, device=device).to(memory_format=torch.channels_last)
    ref = reference(x, wt, b, 1, 0, 1, 1, None, out.clone(), "relu")
    Conv2d(wt, b, post_activation="relu", dtype=torch.float32, config=config)(x, [out], out)
    check(out, ref, torch.float32)


def two_buffers_in_one_storage(n, oh, ow, dtype, device):
    """Two distinct 4D buffers (channels_last with 12 channels, NCHW with 9) carved out of one
    poisoned flat storage, with a gap between them; returns (flat, buf_a, buf_b, as_views)."""
    size_a, gap, size_b = n * 12 * oh * ow, 5, n * 9 * oh * ow
    flat = torch.full((size_a + gap + size_b,), float("nan"), dtype=dtype, device=device)

    def as_views(t):
        a = t.as_strided((n, 12, oh, ow), (12 * oh * ow, 1, ow * 12, 12), 0)
        b = t.as_strided((n, 9, oh, ow), (9 * oh * ow, oh * ow, ow, 1), size_a + gap)
        return a, b

    return flat, *as_views(flat), as_views


@pytest.mark.parametrize("config", [SMALL, SMALL_SPLIT], ids=["direct", "split_k"])
@pytest.mark.parametrize("order", ["a_first", "b_first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_segments_across_buffers(order, dtype, config, device):
    n, c_in, oh, ow = 2, 6, 4, 3
    flat, buf_a, buf_b, as_views = two_buffers_in_one_storage(n, oh, ow, dtype, device)
    # 3 segments, 4 + 5 + 3 = 12 channels; "b_first" puts outs[0] after outs[1] in memory, so
    # the relative offsets go negative.
    if order == "a_first":
        pick = [lambda a, b: a[:, 2:6], lambda a, b: b[:, 1:6], lambda a, b: a[:, 8:11]]
    else:
        pick = [lambda a, b: b[:, 3:7], lambda a, b: a[:, 0:5], lambda a, b: a[:, 7:10]]
    outs = [p(buf_a, buf_b) for p in pick]
    x = torch.randn(n, c_in, oh, ow, device=device).to(dtype, memory_format=torch.channels_last)
    wt = (torch.randn(12, c_in, 3, 3, device=device) / 4).to(dtype)
    b = torch.randn(12, device=device)
    Conv2d(wt, b, padding=1, activation="relu6", dtype=dtype, config=config)(x, outs)
    ref = reference(x, wt, b, 1, 1, 1, 1, "relu6")
    check(torch.cat(outs, dim=1), ref, dtype)
    written = torch.zeros(flat.shape, dtype=torch.bool, device=device)
    for p in pick:
        p(*as_views(written)).fill_(True)
    assert flat[~written].isnan().all(), "write outside the output segments"


def test_four_segments_one_buffer(device):
    x = torch.randn(1, 4, 5, 5, device=device).to(memory_format=torch.channels_last)
    wt, b = torch.randn(20, 4, 1, 1, device=device), torch.randn(20, device=device)
    big = poisoned((1, 24, 5, 5), torch.float32, device)
    outs = [big[:, 0:3], big[:, 4:10], big[:, 10:11], big[:, 12:22]]
    Conv2d(wt, b, dtype=torch.float32, config=SMALL)(x, outs)
    check(torch.cat(outs, dim=1), reference(x, wt, b, 1, 0, 1, 1), torch.float32)
    assert big[:, [3, 11, 22, 23]].isnan().all()


def test_tf32_precision_runs(device):
    x = torch.randn(1, 16, 4, 4, device=device).to(memory_format=torch.channels_last)
    wt = torch.randn(16, 16, 3, 3, device=device)
    out = poisoned((1, 16, 4, 4), torch.float32, device)
    Conv2d(wt, padding=1, dtype=torch.float32, config=SMALL, fp32_precision="tf32")(x, [out])
    assert rel_err(out, reference(x, wt, None, 1, 1, 1, 1)) < 1e-2  # tf32 keeps 10 mantissa bits


def test_convenience_and_default_config(device):
    x = torch.randn(1, 24, 5, 5, device=device).to(memory_format=torch.channels_last)
    wt, b = torch.randn(40, 24, 3, 3, device=device), torch.randn(40, device=device)
    out = conv2d(x, wt, b, stride=2, padding=1, activation="silu")  # default (large) tiling
    assert out.shape == (1, 40, 3, 3) and out.is_contiguous(memory_format=torch.channels_last)
    check(out, reference(x, wt, b, 2, 1, 1, 1, "silu"), torch.float32)


def test_configs():
    for c_out_g, c_in_g, taps in [(4, 4, 9), (10, 3, 49), (64, 64, 9), (256, 512, 1), (2048, 8, 1)]:
        for dtype in (torch.float16, torch.float32):
            cands = conv2d_configs(c_out_g, c_in_g, dtype, taps)
            assert cands[0] == default_conv2d_config(c_out_g, c_in_g, dtype, taps)
            assert len(cands) == len({tuple(sorted(c.items())) for c in cands}) > 2
            for c in cands:
                for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
                    assert c[key] >= 16 and c[key] & (c[key] - 1) == 0
    layer = Conv2d(torch.randn(8, 16, 3, 3))
    assert layer.config == layer.configs[0] and layer.config["FLAT_K"]
    stem = Conv2d(torch.randn(64, 3, 7, 7), stride=2, padding=3)
    assert stem.config["GATHER_K"]
    layer.config = SMALL
    assert layer.config == SMALL


def test_narrow_pointwise_candidates(device):
    """1x1 convs of 16..64 channels (MnasNet's projections) get whole-channel, tall-pixel tiles
    right after the default, shorter ones first for small M; each computes the conv."""
    cands = conv2d_configs(48, 16, torch.float16, 1, 32 * 112 * 112)
    tall = cands[1:5]
    assert all(c["BLOCK_M"] >= 128 and c["BLOCK_N"] == 64 and c["BLOCK_K"] == 16 for c in tall)
    assert {c["BLOCK_M"] for c in tall} == {128, 256, 512}
    assert conv2d_configs(24, 48, torch.float16, 1, 112 * 112)[1]["BLOCK_M"] == 64  # batch 1
    assert not [c for c in conv2d_configs(128, 64, torch.float16, 1, 32 * 56 * 56) if c["BLOCK_M"] == 512]
    for config in cands[:5]:
        run(2, 16, 48, 9, 7, 1, dtype=torch.float16, device=device, act="relu6", config=config)


K_LOOPS = {"unrolled": SMALL, "flat": SMALL_FLAT, "gather": SMALL_GATHER, "fold": SMALL_FOLD}

# Asymmetric (top, bottom, left, right) padding as TensorFlow "SAME" or a folded ZeroPad2d leave
# it: name -> (n, c_in, c_out, h, w, k, stride, pads). Dense NHWC input with 8 channels, so the
# fold mode really folds.
ASYMMETRIC = {
    "same_3x3_s2": (2, 8, 16, 8, 6, 3, 2, (0, 1, 0, 1)),
    "same_5x5_s2": (1, 8, 16, 8, 7, 5, 2, (1, 2, 2, 2)),
    "bottom_right_larger": (1, 8, 12, 7, 7, 3, 2, (1, 3, 0, 2)),
    "top_and_left_zero": (1, 8, 16, 5, 6, 3, 1, (0, 2, 0, 1)),
    "only_left_1x1": (1, 8, 16, 4, 5, 1, 1, (0, 0, 2, 0)),
}
SPLIT_MODES = {"flat_split": {**SMALL_FLAT, "SPLIT_K": 2}, "fold_split": {**SMALL_FOLD, "SPLIT_K": 2},
               "unrolled_split": {**SMALL, "SPLIT_K": 2}}


@pytest.mark.parametrize("mode", list(K_LOOPS) + list(SPLIT_MODES))
@pytest.mark.parametrize("name", list(ASYMMETRIC))
def test_asymmetric_padding(name, mode, device):
    """Against F.conv2d(F.pad(x, (left, right, top, bottom))): every K-loop form and split-K."""
    n, c_in, c_out, h, w, k, stride, pads = ASYMMETRIC[name]
    run(n, c_in, c_out, h, w, k, stride, pads, device=device, act="relu",
        config={**K_LOOPS, **SPLIT_MODES}[mode])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_asymmetric_padding_fp16_groups_and_slices(dtype, device):
    run(2, 12, 20, 7, 6, 3, 2, (0, 1, 1, 0), dtype=dtype, device=device, config=SMALL_FLAT, x_slice=True)
    run(1, 16, 16, 6, 7, 3, 1, (2, 0, 0, 2), groups=4, dtype=dtype, device=device, config=SMALL)


def test_padding_forms():
    wt = torch.randn(8, 4, 3, 3)
    assert Conv2d(wt, padding=1).padding == (1, 1)
    assert Conv2d(wt, padding=(1, 2, 3, 3)).padding == (1, 2, 3, 3)
    layer = Conv2d(wt, padding=(2, 2, 0, 0))  # symmetric: kept as a pair (tuner keys unchanged)
    assert layer.padding == (2, 0) and layer.pads == (2, 2, 0, 0)
    layer = Conv2d(wt, stride=2, padding=(0, 1, 0, 1))
    assert layer.output_hw(8, 7) == (4, 3) and layer.pads == (0, 1, 0, 1)  # TF SAME on 8 rows
    for bad in ((1, 2, 3), (1, -1, 0, 0), (1.0, 1)):
        with pytest.raises(ValueError, match="padding"):
            Conv2d(wt, padding=bad)


@pytest.mark.parametrize("mode", list(K_LOOPS))
def test_split_k_every_k_loop(mode, device):
    """Each K-loop form split into contiguous shares: ragged channel blocks in fp32, then in fp16
    16 splits over fewer K iterations than that (empty splits must store zeros) on odd sizes,
    then groups."""
    config = K_LOOPS[mode]
    run(1, 40, 24, 5, 5, 3, padding=1, act="relu", device=device, config={**config, "SPLIT_K": 4})
    run(*GEOMETRIES["odd_sizes_batch3"], dtype=torch.float16, device=device,
        config={**config, "SPLIT_K": 16})
    run(*GEOMETRIES["groups4"], device=device, config={**config, "SPLIT_K": 2})


# Batch-1 ResNet-50 convs with few output tiles and a long K: (c_out_g, c_in_g, taps, m).
BATCH1_LONG_K = {"layer4_conv2": (512, 512, 9, 49), "layer3_conv2": (256, 256, 9, 196),
                 "layer4_conv3_in": (512, 2048, 1, 49)}


def _k_iters(cfg, c_in_g, taps):
    return taps * -(-c_in_g // cfg["BLOCK_K"])


def test_split_k_configs():
    for dtype in (torch.float16, torch.float32):
        for c_out_g, c_in_g, taps, m in BATCH1_LONG_K.values():
            cands = conv2d_configs(c_out_g, c_in_g, dtype, taps, m)
            default = cands[0]
            assert default == default_conv2d_config(c_out_g, c_in_g, dtype, taps, m)
            tiles = -(-m // default["BLOCK_M"]) * -(-c_out_g // default["BLOCK_N"])
            split = default["SPLIT_K"]
            assert split & (split - 1) == 0 and 4 * tiles * split >= 3 * NUM_SMS
            assert _k_iters(default, c_in_g, taps) >= 4 * split
            # The unsplit default stays within the tuner's first 8, and split or not, every
            # candidate keeps the GPU's tile limits.
            assert default_conv2d_config(c_out_g, c_in_g, dtype, taps) in cands[:8]
            assert len(cands) == len({tuple(sorted(c.items())) for c in cands})
            for c in cands:
                assert all(c[k] >= 16 and c[k] & (c[k] - 1) == 0 for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                assert c.get("SPLIT_K", 1) & (c.get("SPLIT_K", 1) - 1) == 0
            # Without the size, or with enough tiles to fill the GPU, nothing changes.
            plain = conv2d_configs(c_out_g, c_in_g, dtype, taps)
            assert all("SPLIT_K" not in c for c in plain)
            assert conv2d_configs(c_out_g, c_in_g, dtype, taps, 128 * m) == plain
    # K = 9 * 64 is too short to split, however few the tiles.
    assert "SPLIT_K" not in default_conv2d_config(64, 64, torch.float16, 9, 49)
    # Groups count as tiles.
    assert "SPLIT_K" in default_conv2d_config(64, 128, torch.float16, 9, 49, groups=64)
    assert "SPLIT_K" not in default_conv2d_config(64, 128, torch.float16, 9, 49, groups=256)


def test_split_k_layer_default_and_workspace(device):
    """A layer told its input size defaults to split-K; its workspace is allocated by the first
    call, reused by later ones (also with a smaller split) and only replaced when too small."""
    x = torch.randn(1, 128, 4, 4, device=device)
    wt, b = torch.randn(64, 128, 3, 3, device=device) / 32, torch.randn(64, device=device)
    layer = Conv2d(wt, b, padding=1, activation="relu", dtype=torch.float32, input_hw=(4, 4), batch=1)
    assert layer.config == layer.configs[0] and layer.config["SPLIT_K"] > 1
    assert Conv2d(wt, padding=1, dtype=torch.float32).configs == conv2d_configs(64, 128, torch.float32, 9)
    ref = reference(x, wt, b, 1, 1, 1, 1, "relu")
    out = poisoned((1, 64, 4, 4), torch.float32, device)
    layer(x, [out])
    check(out, ref, torch.float32)
    workspace = layer._workspace
    assert workspace.dtype == torch.float32 and workspace.device == x.device
    layer.config = {**layer.config, "SPLIT_K": 2}
    out = poisoned((1, 64, 4, 4), torch.float32, device)
    layer(x, [out])
    check(out, ref, torch.float32)
    assert layer._workspace is workspace
    x2 = torch.randn(3, 128, 4, 4, device=device)  # 3x the pixels: the workspace must grow
    out = poisoned((3, 64, 4, 4), torch.float32, device)
    layer(x2, [out])
    check(out, reference(x2, wt, b, 1, 1, 1, 1, "relu"), torch.float32)
    assert layer._workspace.numel() >= 2 * 3 * 16 * 64


def test_depthwise_accepts_input_size():
    """The compiler passes the input size to every conv layer; depthwise keeps its own configs."""
    layer = DepthwiseConv2d(torch.randn(8, 1, 3, 3), padding=1, groups=8, input_hw=(7, 7), batch=1)
    assert layer.configs == depthwise_conv2d_configs(8)


def _layer_error(**kw):
    args = {"weight": torch.randn(8, 4, 3, 3), "dtype": torch.float32}
    args.update(kw)
    return Conv2d(args.pop("weight"), **args)


@pytest.mark.parametrize("kw,match", [
    ({"weight": torch.randn(8, 4, 3)}, "4D"),
    ({"groups": 3}, "groups"),
    ({"bias": torch.randn(7)}, "bias"),
    ({"activation": "swish"}, "unknown activation"),
    ({"stride": (1, 2, 3)}, "stride"),
    ({"padding": -1}, "padding"),
    ({"dtype": torch.bfloat16}, "dtype"),
    ({"fp32_precision": "fast"}, "fp32_precision"),
    ({"config": dict(SMALL, BLOCK_K=8)}, "BLOCK_K"),
    ({"config": {"BLOCK_M": 32}}, "missing"),
    ({"config": dict(SMALL, SPLIT_K=3)}, "SPLIT_K"),
    ({"input_hw": (5, 5)}, "go together"),
    ({"input_hw": (5, 5), "batch": 0}, "go together"),
    ({"input_hw": (2, 2), "batch": 1}, "too small"),
])
def test_bad_layer_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        _layer_error(**kw)


def test_bad_call_arguments(device):
    layer = Conv2d(torch.randn(8, 4, 3, 3, device=device), padding=1, dtype=torch.float32,
                   config=SMALL)
    x = torch.randn(2, 4, 5, 5, device=device)
    out = torch.empty(2, 8, 5, 5, device=device)
    cases = [
        ((torch.randn(2, 3, 5, 5, device=device), [out]), "x must be 4D"),
        ((x.half(), [out]), "expected torch.float32, got torch.float16"),
        ((x, [torch.empty(2, 8, 4, 5, device=device)]), "expected"),
        ((x, [out[:, :6]]), "C_out=8"),
        ((x, [out.half()]), "expected torch.float32"),
        ((x, [out[:, :4], torch.empty(2, 4, 5, 5, device=device)]), "storage"),
        ((x, [out[:, :2]] * 5), "1 to 4"),
        ((x, [out[:, :4], out[:, 4:]], out), "single output view"),
        ((x, [out], torch.empty(2, 8, 5, 4, device=device)), "residual shape"),
        ((x, [out], out.half()), "residual"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            layer(*args)


# Channel counts that are not multiples of 16 (MnasNet's 24/72/120, MobileNetV3's 184): pixel
# strides and channel counts reach the kernels in units of X_VEC / OUT_VEC elements, and views at
# an unaligned channel offset through an aligned base plus a lead (layer_args.aligned_base).
# name: (n, c_in, c_out, h, w, k, stride, padding)
ODD_CHANNELS = {
    "pw_48_24": (2, 48, 24, 3, 5, 1, 1, 0),
    "pw_72_120": (1, 72, 120, 3, 3, 1, 1, 0),
    "3x3_184_24": (1, 184, 24, 3, 3, 3, 1, 1),
    "3x3_s2_24_72": (1, 24, 72, 5, 4, 3, 2, 1),
}
# (x, output) channel offsets in buffers 8 channels wider, fp16: 16-byte aligned (vectors of 8),
# leads of 4 and 2 elements, odd offsets (no vectors at all).
OFFSETS = [(0, 0), (8, 16), (4, 2), (3, 5)]


def run_offsets(n, c_in, c_out, h, w, k, stride, padding, x_off, out_off, *, config, device,
                dtype=torch.float16, residual=False):
    """relu(conv(x)) (+ residual, post relu) with x, the output and the residual as channel
    slices at the given offsets of channels_last buffers 8 channels wider; checks the values
    and the poison on both sides of the output."""
    xb = torch.randn(n, c_in + 8, h, w, device=device).to(dtype, memory_format=torch.channels_last)
    x = xb[:, x_off:x_off + c_in]
    wt = (torch.randn(c_out, c_in, k, k, device=device) / (c_in * k * k) ** 0.5).to(dtype)
    b = torch.randn(c_out, device=device)
    oh, ow = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    res = None
    if residual:  # at yet another offset
        rb = torch.randn(n, c_out + 8, oh, ow, device=device).to(dtype, memory_format=torch.channels_last)
        res = rb[:, 8 - out_off // 2:8 - out_off // 2 + c_out]
    post = "relu" if residual else None
    ref = reference(x, wt, b, stride, padding, 1, 1, "relu", res, post)
    big = poisoned((n, c_out + 8 + out_off, oh, ow), dtype, device)
    out = big[:, out_off:out_off + c_out]
    Conv2d(wt, b, stride=stride, padding=padding, activation="relu", post_activation=post,
           dtype=dtype, config=config)(x, [out], res)
    check(out, ref, dtype)
    assert big[:, :out_off].isnan().all() and big[:, out_off + c_out:].isnan().all()


@pytest.mark.parametrize("config", [SMALL, SMALL_FLAT, SMALL_SPLIT], ids=["unrolled", "flat", "split_k"])
@pytest.mark.parametrize("x_off,out_off", OFFSETS)
@pytest.mark.parametrize("name", list(ODD_CHANNELS))
def test_odd_channel_counts_at_any_offset(name, x_off, out_off, config, device):
    run_offsets(*ODD_CHANNELS[name], x_off, out_off, config=config, device=device)


@pytest.mark.parametrize("config", [SMALL, SMALL_SPLIT], ids=["direct", "split_k"])
@pytest.mark.parametrize("x_off,out_off", OFFSETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_odd_channel_residual_at_any_offset(x_off, out_off, dtype, config, device):
    run_offsets(2, 48, 24, 3, 5, 1, 1, 0, x_off, out_off, config=config, device=device,
                dtype=dtype, residual=True)


def test_odd_channel_segments(device):
    """Three output segments at unaligned offsets of one buffer: the segment starts (24, 40)
    and offsets set the output vector width, the channel count (72) the input's."""
    x = torch.randn(2, 72, 3, 4, device=device).to(torch.float16, memory_format=torch.channels_last)
    wt = (torch.randn(56, 72, 1, 1, device=device) / 8).half()
    b = torch.randn(56, device=device)
    big = poisoned((2, 70, 3, 4), torch.float16, device)
    outs = [big[:, 4:28], big[:, 32:48], big[:, 52:68]]
    Conv2d(wt, b, dtype=torch.float16, config=SMALL_FLAT)(x, outs)
    check(torch.cat(outs, dim=1), reference(x, wt, b, 1, 0, 1, 1), torch.float16)
    assert big[:, [0, 1, 2, 3, 28, 29, 30, 31, 48, 49, 50, 51, 68, 69]].isnan().all()


def test_flat_pixels_rule():
    """Pixel p of every operand at p x (column stride): dense NHWC, a channel slice of a wider
    NHWC buffer (a concat slot) and a batch-1 view whatever its image stride; not NCHW, a
    spatial crop, or offsets past int32."""
    def strides(t):
        sn, _, sh, sw = t.stride()
        return (sn, sh, sw)
    nhwc = torch.empty(2, 8, 5, 7).contiguous(memory_format=torch.channels_last)
    wide = torch.empty(2, 24, 5, 7).contiguous(memory_format=torch.channels_last)
    assert flat_pixels(2, 5, 7, [strides(nhwc), strides(wide[:, 8:16])])
    assert not flat_pixels(2, 5, 7, [strides(torch.empty(2, 8, 5, 7))])  # NCHW
    crop = torch.empty(2, 8, 6, 7).contiguous(memory_format=torch.channels_last)[:, :, :5]
    assert flat_pixels(2, 5, 7, [strides(crop)]) is False  # rows 5 of 6: the image stride is off
    assert flat_pixels(1, 5, 7, [(10 ** 6, 7 * 8, 8)])
    assert not flat_pixels(2 ** 12, 64, 64, [(64 * 64 * 256, 64 * 256, 256)])


@pytest.mark.parametrize("layout", ["flat", "nchw_out", "crop_in"])
def test_pointwise_flat_and_divided_addressing(layout, device):
    """A 1x1 conv with a residual into a channel slice: FLAT_PIXELS where every operand is flat,
    the divided addressing where one is not; the same result."""
    cl = torch.channels_last
    x = torch.randn(3, 16, 6 if layout == "crop_in" else 5, 7, device=device).to(torch.float16, memory_format=cl)
    x = x[:, :, :5]
    wt, b = (torch.randn(24, 16, 1, 1, device=device) / 4).half(), torch.randn(24, device=device)
    res = torch.randn(3, 24, 5, 7, device=device).to(torch.float16, memory_format=cl)
    buf = poisoned((3, 30, 5, 7), torch.float16, device)
    buf = buf.contiguous() if layout == "nchw_out" else buf.contiguous(memory_format=cl)
    out = buf[:, 3:27]
    layer = Conv2d(wt, b, post_activation="relu", dtype=torch.float16, config={**SMALL, "BLOCK_K": 16})
    seg = segment_args([out], 24)[1]
    assert layer._flat_pixels(x, res.stride(), seg[6:10], 5, 7, False) == (layout == "flat")
    layer(x, [out], residual=res)
    check(out, reference(x, wt, b, 1, 0, 1, 1, None, res, "relu"), torch.float16)


def test_vector_width_and_aligned_base():
    assert vector_width(2, [72 * 56 * 56, 72 * 56, 72, 24]) == 8  # fp16: 16 bytes
    assert vector_width(4, [72, 24]) == 4 and vector_width(2, [72, 4]) == 4
    assert vector_width(2, [184, 2]) == 2 and vector_width(2, [72, 3]) == 1
    assert vector_width(2, [2**31 + 8, 8]) == 1  # value // VEC * VEC must stay int32
    buf = torch.empty(1, 80, 3, 3, dtype=torch.float16).to(memory_format=torch.channels_last)
    assert buf.data_ptr() % 16 == 0  # allocations are aligned
    for off, lead, vec in [(0, 0, 8), (8, 0, 8), (4, 4, 4), (10, 2, 2), (3, 3, 1)]:
        view = buf[:, off:off + 72]
        base, got = aligned_base(view)
        assert got == lead and base.data_ptr() + lead * 2 == view.data_ptr() and base.data_ptr() % 16 == 0
        _, _, scalars, x_vec = input_args(view, None, (72,))
        assert x_vec == vec and scalars[:5] == [lead // vec, 720 // vec, 1, 240 // vec, 80 // vec]
    # Storage itself unaligned: nothing to step back to, the pointer stays (lead 0, vector 1).
    odd = torch.frombuffer(bytearray(64), dtype=torch.float16, offset=2)
    assert odd.data_ptr() % 16 == 2 and aligned_base(odd)[0] is odd and aligned_base(odd)[1] == 0
    # Outputs: the segment layout and the kernel's channel counts bound the vector too.
    num_seg, seg = segment_args([buf[:, 8:32], buf[:, 32:56]], 48)
    out, res, scalars, vec = epilogue_args(buf[:, 8:32], None, [0, 0, 0, 0], num_seg, seg, (48,))
    assert vec == 8 and out.data_ptr() == buf[:, 8:].data_ptr() and res is None
    assert scalars[:12] == [0, 0, 0, 0, 0, 3, 6, 6, 0, 3, 0, 0]  # lead, res strides, c1..3, o0..3
    assert scalars[12:16] == [720 // 8, 1, 240 // 8, 80 // 8]
    num_seg, seg = segment_args([buf[:, 8:32], buf[:, 32:56]], 48)
    assert epilogue_args(buf[:, 8:32], None, [0, 0, 0, 0], num_seg, seg, (48, 12))[3] == 4


def test_few_tile_long_k_layers_get_small_and_split_tiles_first():
    """ResNet-50's layer4 3x3 at batch 32 (1568 pixels x 512 channels: 52 tiles of 128x128 for
    132 SMs): 64x64 tiles lead unsplit (200 programs), then wider tiles split until they fill
    the GPU and split 64x64 ones; the plain default stays among the tuner's first 8."""
    m = 32 * 7 * 7
    for dtype in (torch.float16, torch.float32):
        cands = conv2d_configs(512, 512, dtype, 9, m)
        first, plain = cands[:8], default_conv2d_config(512, 512, dtype, 9)
        assert cands[0] == default_conv2d_config(512, 512, dtype, 9, m) != plain
        assert (cands[0]["BLOCK_M"], cands[0]["BLOCK_N"], cands[0].get("SPLIT_K", 1)) == (64, 64, 1)
        assert plain in first and len(cands) == len({tuple(sorted(c.items())) for c in cands})
        assert len([c for c in first if c.get("SPLIT_K", 1) > 1]) >= 2
        for c in first[:-1]:
            tiles = -(-m // c["BLOCK_M"]) * -(-512 // c["BLOCK_N"])
            assert 4 * tiles * c.get("SPLIT_K", 1) >= 3 * NUM_SMS, c
            smem = (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * c["num_stages"] * dtype.itemsize
            assert smem <= 200 * 1024, c
    # 14x14 at batch 32: 98 tiles of 128x128; 128x64 and 64x128 fill the GPU unsplit.
    cands = conv2d_configs(256, 256, torch.float16, 9, 32 * 14 * 14)[:4]
    assert [(c["BLOCK_M"], c["BLOCK_N"], c.get("SPLIT_K", 1)) for c in cands] == \
        [(64, 64, 1), (128, 64, 1), (64, 128, 1), (128, 128, 2)]


# ResNet-50 / ResNeXt layers (C_in, C_out, k, stride, pad, H, groups) at batch 8, fp16.
RESNET_LAYERS = [
    (3, 64, 7, 2, 3, 224, 1), (64, 64, 1, 1, 0, 56, 1), (64, 64, 3, 1, 1, 56, 1),
    (64, 256, 1, 1, 0, 56, 1), (256, 128, 1, 1, 0, 56, 1), (128, 128, 3, 2, 1, 56, 1),
    (256, 512, 1, 2, 0, 56, 1), (256, 256, 3, 1, 1, 14, 1), (1024, 2048, 1, 2, 0, 14, 1),
    (512, 512, 3, 1, 1, 7, 1), (2048, 512, 1, 1, 0, 7, 1), (128, 128, 3, 1, 1, 56, 32),
]


def _gpu_case(c_in, c_out, k, s, p, h, g, batch=8, sized=False):
    """Inputs, reference and layer; a ``sized`` layer is told the input size (as the compiler
    does), so its default may be split-K."""
    dev = torch.device("cuda")
    x = torch.randn(batch, c_in, h, h, device=dev).to(torch.float16, memory_format=torch.channels_last)
    wt = (torch.randn(c_out, c_in // g, k, k, device=dev) / (c_in // g * k * k) ** 0.5).half()
    b = torch.randn(c_out, device=dev)
    ref = reference(x, wt, b, s, p, 1, g, "relu")
    size = {"input_hw": (h, h), "batch": batch} if sized else {}
    return x, ref, Conv2d(wt, b, stride=s, padding=p, groups=g, activation="relu", **size)


@pytest.mark.gpu
@pytest.mark.parametrize("c_in,c_out,k,s,p,h,g", RESNET_LAYERS)
def test_resnet50_layers_gpu(c_in, c_out, k, s, p, h, g):
    check_layer_fp16(*_gpu_case(c_in, c_out, k, s, p, h, g))  # default config


@pytest.mark.gpu
@pytest.mark.parametrize("c_in,c_out,k,s,p,h,g", [RESNET_LAYERS[2], RESNET_LAYERS[6]])
def test_all_configs_gpu(c_in, c_out, k, s, p, h, g):
    x, ref, layer = _gpu_case(c_in, c_out, k, s, p, h, g)
    for config in layer.configs:
        layer.config = config
        check_layer_fp16(x, ref, layer)


# ResNet-50 at batch 1 where the default splits K: layer4 conv2, layer3 conv2, layer4 conv1.
RESNET_BATCH1_SPLIT = [(512, 512, 3, 1, 1, 7, 1), (256, 256, 3, 1, 1, 14, 1), (2048, 512, 1, 1, 0, 7, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("c_in,c_out,k,s,p,h,g", RESNET_BATCH1_SPLIT)
def test_resnet50_batch1_split_k_gpu(c_in, c_out, k, s, p, h, g):
    x, ref, layer = _gpu_case(c_in, c_out, k, s, p, h, g, batch=1, sized=True)
    assert layer.config.get("SPLIT_K", 1) > 1
    check_layer_fp16(x, ref, layer)  # default config
    for config in layer.configs[:8]:  # what the tuner times
        layer.config = config
        check_layer_fp16(x, ref, layer)


@pytest.mark.gpu
def test_split_k_cuda_graph_gpu():
    """After one warm-up call, a split-K layer allocates nothing: it captures and replays."""
    x, ref, layer = _gpu_case(*RESNET_BATCH1_SPLIT[0], batch=1, sized=True)
    out = poisoned(tuple(ref.shape), torch.float16, x.device)
    layer(x, [out])
    workspace = layer._workspace.data_ptr()
    out.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer(x, [out])
    graph.replay()
    torch.cuda.synchronize()
    assert layer._workspace.data_ptr() == workspace
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("config", [SMALL_GATHER, SMALL_FOLD], ids=["gather", "fold"])
@pytest.mark.parametrize("layout", ["nhwc", "nchw", "slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_few_channel_stem_every_input_layout(layout, dtype, config, device):
    """A 7x7/2 conv on 3 channels: dense NHWC may fold kw into c; NCHW and slices gather."""
    run(2, 3, 20, 13, 11, 7, stride=2, padding=3, dtype=dtype, device=device, act="relu",
        config=config, nchw=layout == "nchw", x_slice=layout == "slice")
    run(1, 5, 16, 9, 9, (3, 5), stride=(1, 2), padding=(1, 2), dtype=dtype, device=device,
        config={**config, "BLOCK_K": 32}, nchw=layout == "nchw", x_slice=layout == "slice")


@pytest.mark.parametrize("lanes", ["nan", "finite"])
@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fold_reads_channel_padded_input(dtype, split, lanes, device):
    """RGB stored as 4 channels (the compiler's padded input buffer): the fold path loads whole
    8-byte pixels and must ignore the padding lane, even when it holds NaN; with
    ``pad_lanes_finite`` (no select) any finite value there meets a zero weight."""
    buf = torch.randn(2, 4, 13, 11, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    if lanes == "nan":
        buf[:, 3] = float("nan")
    else:
        buf[:, 3] = 1000.0 * torch.rand(2, 13, 11, device=device).to(dtype) + 1
    x = buf[:, :3]
    wt = (torch.randn(20, 3, 7, 7, device=device) / 12).to(dtype)
    b = torch.randn(20, device=device)
    ref = reference(x, wt, b, 2, 3, 1, 1, "relu")
    out = poisoned(tuple(ref.shape), dtype, device)
    cfg = {**SMALL_FOLD, "SPLIT_K": split} if split > 1 else SMALL_FOLD
    layer = Conv2d(wt, b, stride=2, padding=3, activation="relu", dtype=dtype, config=cfg)
    layer.pad_lanes_finite = lanes == "finite"
    layer(x, [out])
    check(out, ref, dtype)
    assert 4 in layer._fold_weights  # the padded packing was used


def test_launch_count_follows_split_k_and_huge_gemms_get_wide_tiles():
    layer = Conv2d(torch.randn(64, 64, 3, 3), padding=1)
    assert layer.launches == 1
    layer.config = {**layer.config, "SPLIT_K": 2}  # the reduction is a second kernel
    assert layer.launches == 2
    wide = [c for c in conv2d_configs(256, 256, torch.float16, 9, 128 * 56 * 56)[:8]
            if 256 in (c["BLOCK_M"], c["BLOCK_N"])]
    assert {(c["BLOCK_M"], c["BLOCK_N"]) for c in wide} == {(256, 128), (128, 256)}
    assert not [c for c in conv2d_configs(256, 256, torch.float16, 9, 128 * 14 * 14) if c["BLOCK_M"] == 256]
    assert not [c for c in conv2d_configs(64, 64, torch.float32, 9, 128 * 56 * 56) if c["BLOCK_M"] == 256]


def make_gate(n, c, form, dtype, device):
    """Positive SE-like factors (sigmoid of randoms) as (N, C) or (N, C, 1, 1) views with
    non-contiguous strides: a column slice of a wider buffer, or a transposed one."""
    if form == "nc_slice":
        return torch.sigmoid(torch.randn(n, c + 3, device=device)).to(dtype)[:, 1:1 + c]
    if form == "nc_transposed":
        return torch.sigmoid(torch.randn(c, n, device=device)).to(dtype).t()
    return torch.sigmoid(torch.randn(n, 2 * c, 1, 1, device=device)).to(dtype)[:, ::2]  # (N, C, 1, 1)


def run_gated(n, c_in, c_out, h, w, k, stride=1, padding=0, groups=1, *, config, device,
              dtype=torch.float32, gate_dtype=None, form="nc_slice", x_slice=False):
    """conv(x * gate) with the gate folded into the A loads, against F.conv2d on the product."""
    if x_slice:
        x = torch.randn(n, c_in + 5, h, w, device=device).to(dtype, memory_format=torch.channels_last)[:, 2:2 + c_in]
    else:
        x = torch.randn(n, c_in, h, w, device=device).to(dtype, memory_format=torch.channels_last)
    gate = make_gate(n, c_in, form, gate_dtype or dtype, device)
    wt = (torch.randn(c_out, c_in // groups, k, k, device=device) / (c_in // groups * k * k) ** 0.5).to(dtype)
    b = torch.randn(c_out, device=device)
    ref = reference(x.float() * gate.float().reshape(n, c_in, 1, 1), wt, b, stride, padding, 1, groups, "relu")
    out = poisoned(tuple(ref.shape), dtype, device)
    Conv2d(wt, b, stride=stride, padding=padding, groups=groups, activation="relu", dtype=dtype,
           config=config)(x, [out], gate=gate)
    check(out, ref, dtype)


GATE_MODES = {**K_LOOPS, "flat_split": {**SMALL_FLAT, "SPLIT_K": 2}, "unrolled_split": {**SMALL, "SPLIT_K": 4}}


@pytest.mark.parametrize("mode", list(GATE_MODES))
def test_gate_every_k_loop(mode, device):
    """1x1 projection (the SE case) with an odd C_in (masked K tail) and a batch of 3 whose 15
    pixels per image make every 32-row tile straddle two images; then a 3x3 with padding."""
    config = GATE_MODES[mode]
    run_gated(3, 13, 20, 5, 3, 1, config=config, device=device)
    run_gated(2, 8, 16, 5, 4, 3, 1, 1, config=config, device=device, form="nc11")


@pytest.mark.parametrize("gate_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("form", ["nc_slice", "nc_transposed", "nc11"])
def test_gate_fp16_forms_and_slices(form, gate_dtype, device):
    run_gated(3, 24, 16, 4, 5, 1, config=SMALL_FLAT, device=device, dtype=torch.float16,
              gate_dtype=gate_dtype, form=form, x_slice=True)


def test_gate_even_k_groups_and_super_groups(device):
    run_gated(2, 32, 16, 4, 4, 1, config=SMALL, device=device)  # EVEN_K: unmasked gate loads
    run_gated(2, 16, 24, 5, 4, 3, 2, 1, groups=4, config=SMALL_FLAT, device=device)
    run_gated(2, 32, 32, 5, 4, 3, 1, 1, groups=8, config={**SMALL_FLAT, "GROUPS_PER_TILE": 4}, device=device)


def test_gate_with_residual_and_segments(device):
    n, c_in, c_out = 2, 12, 16
    x = torch.randn(n, c_in, 4, 4, device=device).to(memory_format=torch.channels_last)
    gate = make_gate(n, c_in, "nc11", torch.float32, device)
    wt, b = torch.randn(c_out, c_in, 1, 1, device=device) / 3, torch.randn(c_out, device=device)
    res = torch.randn(n, c_out, 4, 4, device=device).to(memory_format=torch.channels_last)
    out = poisoned((n, c_out, 4, 4), torch.float32, device)
    layer = Conv2d(wt, b, post_activation="relu", dtype=torch.float32, config=SMALL)
    layer(x, [out], res, gate=gate)
    check(out, reference(x * gate, wt, b, 1, 0, 1, 1, None, res, "relu"), torch.float32)
    big = poisoned((n, c_out + 3, 4, 4), torch.float32, device)
    layer(x, [big[:, :5], big[:, 6:17]], gate=gate)
    ref = reference(x * gate, wt, b, 1, 0, 1, 1, None, None, "relu")
    check(torch.cat([big[:, :5], big[:, 6:17]], 1), ref, torch.float32)
    assert big[:, 5].isnan().all() and big[:, 17:].isnan().all()
    layer(x, [out])  # the ungated variant still runs after the gated one
    check(out, reference(x, wt, b, 1, 0, 1, 1, None, None, "relu"), torch.float32)


def test_gate_errors(device):
    layer = Conv2d(torch.randn(8, 4, 1, 1, device=device), dtype=torch.float32, config=SMALL)
    x, out = torch.randn(2, 4, 3, 3, device=device), torch.empty(2, 8, 3, 3, device=device)
    for gate, match in ((torch.rand(2, 5, device=device), r"\(2, 4\) or \(2, 4, 1, 1\)"),
                        (torch.rand(1, 4, device=device), "one factor per image"),
                        (torch.rand(2, 4, 3, 3, device=device), "gate: expected shape"),
                        (torch.rand(2, 4, device=device, dtype=torch.float16), "float32")):
        with pytest.raises(ValueError, match=match):
            layer(x, [out], gate=gate)
    dw = DepthwiseConv2d(torch.randn(4, 1, 3, 3, device=device), groups=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="no gate"):
        dw(x, [torch.empty(2, 4, 1, 1, device=device)], gate=torch.rand(2, 4, device=device))


# 1x1 projections after a squeeze-and-excitation block (C_in, C_out, H): EfficientNet-B0 and
# MobileNetV3-Large; and narrow pointwise convs of MnasNet / MobileNetV3.
SE_PROJECTIONS = [(144, 24, 56), (480, 112, 14), (1152, 320, 7), (72, 40, 28), (672, 160, 7)]
NARROW_POINTWISE = [(32, 16, 112), (16, 48, 112), (16, 64, 112), (64, 24, 56)]


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [32, 1])
@pytest.mark.parametrize("c_in,c_out,h", SE_PROJECTIONS)
def test_gated_projection_every_config_gpu(c_in, c_out, h, batch):
    """conv(x * gate) at real shapes; the tuner's first 8 configs (split-K ones at batch 1)."""
    dev = torch.device("cuda")
    x = torch.randn(batch, c_in, h, h, device=dev).to(torch.float16, memory_format=torch.channels_last)
    gate = torch.sigmoid(torch.randn(batch, c_in, device=dev)).half()
    wt = (torch.randn(c_out, c_in, 1, 1, device=dev) / c_in ** 0.5).half()
    b = torch.randn(c_out, device=dev)
    ref = reference(x.float() * gate.float()[:, :, None, None], wt, b, 1, 0, 1, 1)
    layer = Conv2d(wt, b, input_hw=(h, h), batch=batch)
    for config in layer.configs[:8]:
        layer.config = config
        out = poisoned(tuple(ref.shape), torch.float16, dev)
        layer(x, [out], gate=gate)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-2, config


@pytest.mark.gpu
@pytest.mark.parametrize("c_in,c_out,h", NARROW_POINTWISE)
def test_narrow_pointwise_every_config_gpu(c_in, c_out, h):
    x, ref, layer = _gpu_case(c_in, c_out, 1, 1, 0, h, 1, batch=32, sized=True)
    for config in layer.configs[:8]:
        layer.config = config
        check_layer_fp16(x, ref, layer)


@pytest.mark.gpu
def test_asymmetric_padding_gpu():
    """TensorFlow "SAME" stride-2 padding (0, 1, 0, 1) at an EfficientNet-like shape, every config."""
    dev = torch.device("cuda")
    x = torch.randn(8, 32, 112, 112, device=dev).to(torch.float16, memory_format=torch.channels_last)
    wt = (torch.randn(64, 32, 3, 3, device=dev) / 17).half()
    b = torch.randn(64, device=dev)
    ref = reference(x, wt, b, 2, (0, 1, 0, 1), 1, 1, "relu")
    layer = Conv2d(wt, b, stride=2, padding=(0, 1, 0, 1), activation="relu", input_hw=(112, 112), batch=8)
    for config in layer.configs[:8]:
        layer.config = config
        check_layer_fp16(x, ref, layer)
