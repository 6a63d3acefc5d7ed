"""Grouped convolution (1 < groups < C_in) through super-groups: GROUPS_PER_TILE consecutive
groups as one block-diagonal GEMM, the last one partial when GROUPS_PER_TILE does not divide the
groups. Against F.conv2d on every K-loop mode, split-K, residual epilogue, output segments and
channel-slice inputs; the weight packing against torch.block_diag; the candidate configs; and
(GPU) every candidate at ResNeXt-50's and RegNetY-400MF's real shapes.

Outputs are NaN-poisoned first. CPU shapes are tiny: the kernels run in the Triton interpreter.
"""
import pytest
import torch
from helpers import check_layer_fp16, poisoned
from test_conv2d import SMALL, SMALL_FLAT, SMALL_GATHER, check, reference, run, run_gated

from torch_gie.kernels.conv2d import Conv2d
from torch_gie.kernels.conv2d_configs import (
    SUPER_GROUP_MAX,
    conv2d_configs,
    default_conv2d_config,
    group_tile_options,
)
from torch_gie.kernels.conv2d_weights import pack_conv_weight, pack_super_groups
from torch_gie.kernels.depthwise_conv2d import DepthwiseConv2d

MODES = {"unrolled": SMALL, "flat": SMALL_FLAT, "gather": SMALL_GATHER, "split": {**SMALL_FLAT, "SPLIT_K": 2}}
# (groups, C_in_g, C_out_g, GROUPS_PER_TILE): 16- and 32-wide super-groups; 24 wide (ragged K
# tail, N tile overhang); C_out_g != C_in_g; odd widths; every group in one tile.
CASES = [(8, 4, 4, 4), (8, 4, 4, 8), (6, 8, 8, 3), (4, 4, 8, 2), (4, 6, 2, 4), (6, 3, 5, 2)]
# Partial last super-groups: RegNet's 13 groups of 8 as 4 + 4 + 4 + 1 (and 7 + 6 ... in small),
# 5 groups by 2, odd widths, a super-group wider than a tile.
PARTIAL = [(13, 8, 8, 4), (5, 4, 4, 2), (3, 8, 8, 2), (7, 3, 5, 4), (5, 8, 8, 4)]


def with_gpt(config, gpt):
    return {**config, "GROUPS_PER_TILE": gpt}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("groups,c_in_g,c_out_g,gpt", CASES)
def test_super_groups_3x3(groups, c_in_g, c_out_g, gpt, mode, device):
    run(2, groups * c_in_g, groups * c_out_g, 5, 4, 3, 1, 1, 1, groups, device=device,
        act="relu", config=with_gpt(MODES[mode], gpt))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("groups,c_in_g,c_out_g,gpt", PARTIAL)
def test_partial_super_groups_3x3(groups, c_in_g, c_out_g, gpt, mode, device):
    run(2, groups * c_in_g, groups * c_out_g, 4, 3, 3, 1, 1, 1, groups, device=device,
        act="relu", config=with_gpt(MODES[mode], gpt))


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_partial_super_groups_fp16_slices_residual_and_segments(dtype, split, device):
    """13 groups of 8 as four 32-wide super-groups (the last holding one group): fp16 channel
    slices at unaligned offsets, a residual, and output segments cut inside the partial one."""
    groups, c_g, gpt, n = 13, 8, 4, 2
    c = groups * c_g
    cfg = with_gpt({**SMALL_FLAT, "SPLIT_K": split} if split > 1 else SMALL_FLAT, gpt)
    x = torch.randn(n, c + 6, 5, 4, device=device).to(dtype, memory_format=torch.channels_last)[:, 2:2 + c]
    wt = (torch.randn(c, c_g, 3, 3, device=device) / 8).to(dtype)
    b = torch.randn(c, device=device)
    res = torch.randn(n, c + 4, 5, 4, device=device).to(dtype, memory_format=torch.channels_last)[:, 4:]
    big = poisoned((n, c + 6, 5, 4), dtype, device)
    out = big[:, 3:3 + c]
    layer = Conv2d(wt, b, padding=1, groups=groups, activation="relu", post_activation="relu",
                   dtype=dtype, config=cfg)
    layer(x, [out], res)
    check(out, reference(x, wt, b, 1, 1, 1, groups, "relu", res, "relu"), dtype)
    assert big[:, :3].isnan().all() and big[:, 3 + c:].isnan().all()
    big = poisoned((n, c + 6, 5, 4), dtype, device)
    outs = [big[:, 0:50], big[:, 52:100], big[:, 101:107]]  # 96..103 is the partial super-group
    Conv2d(wt, b, padding=1, groups=groups, dtype=dtype, config=cfg)(x, outs)
    check(torch.cat(outs, 1), reference(x, wt, b, 1, 1, 1, groups), dtype)
    assert big[:, [50, 51, 100, 107, 108, 109]].isnan().all()


def test_partial_super_groups_with_gate(device):
    """The gate prologue on a partial super-group: the missing groups' channels stay zero."""
    for mode in ("flat", "gather"):
        run_gated(2, 40, 40, 4, 5, 3, 1, 1, groups=5, config=with_gpt(MODES[mode], 2),
                  device=device, dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("groups,c_in_g,c_out_g,gpt", CASES[:3])
def test_super_groups_stride2_1x1_and_slices(groups, c_in_g, c_out_g, gpt, dtype, device):
    c_in, c_out = groups * c_in_g, groups * c_out_g
    run(1, c_in, c_out, 7, 6, 3, 2, 1, 1, groups, dtype=dtype, device=device,
        config=with_gpt(SMALL_FLAT, gpt), x_slice=True)
    run(2, c_in, c_out, 5, 5, 1, 2, 0, 1, groups, dtype=dtype, device=device,
        config=with_gpt(SMALL, gpt))


@pytest.mark.parametrize("split", [1, 2])
def test_super_groups_residual_and_segments(split, device):
    groups, c_in_g, c_out_g, gpt = 8, 4, 4, 4
    n, c_in, c_out = 2, groups * c_in_g, groups * c_out_g
    cfg = with_gpt({**SMALL_FLAT, "SPLIT_K": split} if split > 1 else SMALL_FLAT, gpt)
    x = torch.randn(n, c_in, 6, 5, device=device).to(memory_format=torch.channels_last)
    wt, b = torch.randn(c_out, c_in_g, 3, 3, device=device) / 6, torch.randn(c_out, device=device)
    res = torch.randn(n, c_out, 3, 3, device=device).to(memory_format=torch.channels_last)
    out = poisoned((n, c_out, 3, 3), torch.float32, device)
    layer = Conv2d(wt, b, stride=2, padding=1, groups=groups, activation="relu",
                   post_activation="silu", dtype=torch.float32, config=cfg)
    layer(x, [out], res)
    check(out, reference(x, wt, b, 2, 1, 1, groups, "relu", res, "silu"), torch.float32)
    # Three output segments of one buffer, cut across super-group boundaries (16 channels).
    big = poisoned((n, c_out + 6, 3, 3), torch.float32, device)
    outs = [big[:, 1:12], big[:, 14:30], big[:, 31:36]]
    layer = Conv2d(wt, b, stride=2, padding=1, groups=groups, dtype=torch.float32, config=cfg)
    layer(x, outs)
    check(torch.cat(outs, 1), reference(x, wt, b, 2, 1, 1, groups), torch.float32)
    assert big[:, [0, 12, 13, 30, 36, 37]].isnan().all()


def test_pack_super_groups_is_block_diagonal():
    groups, c_in_g, c_out_g, gpt = 6, 3, 2, 3
    wt = torch.randn(groups * c_out_g, c_in_g, 3, 3)
    packed = pack_super_groups(pack_conv_weight(wt, torch.float32), groups, gpt)
    assert packed.shape == (groups * c_out_g, 3, 3, gpt * c_in_g)
    for s in range(groups // gpt):
        blocks = [wt[(s * gpt + j) * c_out_g:(s * gpt + j + 1) * c_out_g] for j in range(gpt)]
        for kh in range(3):
            for kw in range(3):
                dense = torch.block_diag(*[b[:, :, kh, kw] for b in blocks])  # [gpt·C_out_g, gpt·C_in_g]
                rows = packed[s * gpt * c_out_g:(s + 1) * gpt * c_out_g, kh, kw]
                assert torch.equal(rows, dense)
    with pytest.raises(ValueError, match="between 1 and groups"):
        pack_super_groups(pack_conv_weight(wt, torch.float32), groups, 7)


def test_pack_partial_super_groups():
    """5 groups by 2: super-groups of groups (0, 1), (2, 3), (4); the last one's weights sit in
    its first diagonal block, the rest of its row zero."""
    groups, c_in_g, c_out_g, gpt = 5, 3, 2, 2
    wt = torch.randn(groups * c_out_g, c_in_g, 1, 1)
    packed = pack_super_groups(pack_conv_weight(wt, torch.float32), groups, gpt)
    assert packed.shape == (groups * c_out_g, 1, 1, gpt * c_in_g) and packed.is_contiguous()
    dense = torch.block_diag(*[wt[g * c_out_g:(g + 1) * c_out_g, :, 0, 0] for g in range(groups)])
    for s in range(3):
        rows = slice(s * gpt * c_out_g, min((s + 1) * gpt, groups) * c_out_g)
        cols = slice(s * gpt * c_in_g, (s + 1) * gpt * c_in_g)
        expect = torch.nn.functional.pad(dense[rows, cols], (0, gpt * c_in_g - dense[rows, cols].shape[1]))
        assert torch.equal(packed[rows, 0, 0], expect)


def test_config_checks_and_weight_cache():
    layer = Conv2d(torch.randn(32, 4, 3, 3), padding=1, groups=8, dtype=torch.float32, config=SMALL)
    with pytest.raises(ValueError, match="GROUPS_PER_TILE=9 must be at most groups=8"):
        layer.config = with_gpt(SMALL, 9)
    with pytest.raises(ValueError, match="GROUPS_PER_TILE"):
        layer.config = with_gpt(SMALL, 0)
    layer.config = with_gpt(SMALL, 4)
    assert list(layer._super_group_weights) == [4]
    layer.config = with_gpt(SMALL, 2)  # one super-group weight at a time
    assert list(layer._super_group_weights) == [2]
    dw = DepthwiseConv2d(torch.randn(8, 1, 3, 3), groups=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="GROUPS_PER_TILE"):
        dw.config = {**dw.config, "GROUPS_PER_TILE": 2}


# (C_in, C_out, k, stride, pad, H, groups) of every grouped conv in the two networks.
RESNEXT50_32X4D = [(128, 128, 3, 1, 1, 56, 32), (256, 256, 3, 2, 1, 56, 32), (256, 256, 3, 1, 1, 28, 32),
                   (512, 512, 3, 2, 1, 28, 32), (512, 512, 3, 1, 1, 14, 32), (1024, 1024, 3, 2, 1, 14, 32),
                   (1024, 1024, 3, 1, 1, 7, 32)]
REGNET_Y_400MF = [(48, 48, 3, 2, 1, 112, 6), (104, 104, 3, 2, 1, 56, 13), (104, 104, 3, 1, 1, 28, 13),
                  (208, 208, 3, 2, 1, 28, 26), (208, 208, 3, 1, 1, 14, 26), (440, 440, 3, 2, 1, 14, 55),
                  (440, 440, 3, 1, 1, 7, 55)]


def test_candidates_for_real_layers():
    """Every candidate's super-group is a divisor of the groups or a power of two (partial) and
    stays within 128 channels; the default packs narrow groups (ResNeXt's 4-channel ones) and
    leaves 32-channel ones alone."""
    for c_in, c_out, k, s, _, h, g in RESNEXT50_32X4D + REGNET_Y_400MF:
        for batch in (1, 32):
            m = batch * (h // s) ** 2
            for dtype in (torch.float16, torch.float32):
                cands = conv2d_configs(c_out // g, c_in // g, dtype, k * k, m, g)
                assert cands[0] == default_conv2d_config(c_out // g, c_in // g, dtype, k * k, m, g)
                assert len(cands) == len({tuple(sorted(c.items())) for c in cands})
                for c in cands:
                    gpt = c.get("GROUPS_PER_TILE", 1)
                    assert g % gpt == 0 or gpt & (gpt - 1) == 0
                    assert gpt == 1 or gpt * c_in // g <= SUPER_GROUP_MAX
                    assert all(c[key] >= 16 and c[key] & (c[key] - 1) == 0
                               for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    assert default_conv2d_config(4, 4, torch.float16, 9, 32 * 56 * 56, 32)["GROUPS_PER_TILE"] == 8
    assert "GROUPS_PER_TILE" not in default_conv2d_config(32, 32, torch.float16, 9, 32 * 49, 32)
    # RegNetY-400MF's prime-ish group counts get 32-, 16-, 64-wide super-groups (the last one
    # partial) before the tile-misfitting divisors (13 groups: 104 channels in a 128 tile).
    assert group_tile_options(8, 8, 13) == [4, 2, 8, 13]
    assert group_tile_options(8, 8, 55) == [4, 2, 8, 16]
    assert group_tile_options(8, 8, 6) == [3, 2, 6]  # a divisor wins a tie with a partial one
    assert group_tile_options(4, 4, 32) == [8, 4, 16, 32]  # ResNeXt: as measured, 32 wide first
    assert group_tile_options(64, 64, 1) == [1]


def _gpu_case(c_in, c_out, k, s, p, h, g, batch=32):
    dev = torch.device("cuda")
    x = torch.randn(batch, c_in, h, h, device=dev).to(torch.float16, memory_format=torch.channels_last)
    wt = (torch.randn(c_out, c_in // g, k, k, device=dev) / (c_in // g * k * k) ** 0.5).half()
    b = torch.randn(c_out, device=dev)
    ref = reference(x, wt, b, s, p, 1, g, "relu")
    layer = Conv2d(wt, b, stride=s, padding=p, groups=g, activation="relu", input_hw=(h, h), batch=batch)
    return x, ref, layer


@pytest.mark.gpu
@pytest.mark.parametrize("c_in,c_out,k,s,p,h,g", RESNEXT50_32X4D + REGNET_Y_400MF)
def test_real_grouped_layers_every_config_gpu(c_in, c_out, k, s, p, h, g):
    x, ref, layer = _gpu_case(c_in, c_out, k, s, p, h, g)
    for config in layer.configs:
        layer.config = config
        check_layer_fp16(x, ref, layer)
