"""Direct depthwise 2D convolution on strided (typically channels_last) views, fused epilogue.

groups == C_in and C_out = C_in·mult, so each output sums only KH·KW products:
    out[n, co, oh, ow] = sum_{kh, kw} weight[co, 0, kh, kw]
                         · x[n, co // mult, oh·s_h - p_t + kh·d_h, ow·s_w - p_l + kw·d_w]
As a GEMM that is K = KH·KW with N = 1 per group, far below tensor-core tiles, so this kernel
multiplies directly on [BLOCK_M pixels, BLOCK_C channels] tiles (channels contiguous), taps
along kw unrolled. Epilogue, output segments, (asymmetric) padding, the bound-layer interface
and the vector alignment of channel rows (counts and pixel strides in units of X_VEC / OUT_VEC)
are conv2d's, and so is the int8 path (``quant=LayerQuant(...)``): codes summed exactly in int32
(padding reads the input zero point), then the shared epilogue scales and requantizes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch_gie.activations import ActLike
from torch_gie.kernels.conv2d import Conv2d, IntPair, Padding, allocate_output, input_args
from torch_gie.kernels.conv_epilogue import (
    conv_epilogue,
    epilogue_args,
    output_pixels,
    quant_args,
    saturation_implied,
    store_segments,
)
from torch_gie.kernels.launch import launch
from torch_gie.kernels.quant import load_codes

_CONFIG_KEYS = ("BLOCK_M", "BLOCK_C", "num_warps", "num_stages")


def _cfg(bm: int, bc: int, warps: int) -> dict:
    # One stage: without tl.dot there is nothing for the pipeliner to stage in shared memory.
    return dict(zip(_CONFIG_KEYS, (bm, bc, warps, 1)))


def default_depthwise_config(c_out: int) -> dict:
    """Untuned H100 tiling: up to 128 channels (256 B of fp16) per pixel row and 16 outputs per
    thread; compiled for sm_90, 32 per thread took 150-200 registers where 16 take 80-115."""
    bc = min(128, max(16, triton.next_power_of_2(c_out)))
    return _cfg(max(16, 4096 // bc), bc, 8)


def _fitted_width(c_out: int) -> int:
    """The widest channel tile (a power of two, 32..128) whose tiles cover c_out with at most
    1/8 more lanes, else 16: 32 for 144 channels (5 tiles, 160 lanes), 64 for 184, 16 for 72."""
    return next((bc for bc in (128, 64, 32) if 8 * triton.cdiv(c_out, bc) * bc <= 9 * c_out), 16)


def depthwise_conv2d_configs(c_out: int) -> list[dict]:
    """Candidate tilings for the tuner, the default first. Depthwise convs are memory-bound (9
    or 25 FMAs per output element), so the first ones vary the bytes each program moves at full
    channel width (contiguous 32..256-byte channel rows: vector loads) and rows per thread;
    narrow layers (16..48 channels at 112x112) get tall pixel tiles, whose taps one row above
    and below are more often in the same program's cache lines. A channel count that fills
    full-width tiles poorly (72 in 128 lanes) gets its fitted width second and third. Then
    fixed shapes."""
    bc = min(128, max(16, triton.next_power_of_2(c_out)))
    cands = [default_depthwise_config(c_out)]
    fit = _fitted_width(c_out)
    if fit != bc:
        cands += [_cfg(2048 // fit, fit, 4), _cfg(4096 // fit, fit, 8)]
    for elems, warps in ((2048, 4), (8192, 8), (2048, 8), (4096, 4)):
        if _cfg(elems // bc, bc, warps) not in cands:
            cands.append(_cfg(elems // bc, bc, warps))
    half = _cfg(4096 // (bc // 2), bc // 2, 8)
    if bc >= 64 and half not in cands:  # twice the programs for late, small-image layers
        cands.append(half)
    for bm, bc, warps in ((16, 128, 4), (32, 128, 8), (32, 64, 4), (64, 64, 8), (64, 32, 4),
                          (128, 32, 8), (128, 16, 4), (256, 16, 8), (64, 64, 4)):
        if bc > 2 * max(16, triton.next_power_of_2(c_out)):
            continue  # mostly-empty tiles: never faster
        if _cfg(bm, bc, warps) not in cands:
            cands.append(_cfg(bm, bc, warps))
    return cands


def pack_depthwise_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[C_out, 1, KH, KW] -> contiguous [KH, KW, C_out]: one tap's weights for a channel tile
    are one contiguous vector."""
    return weight.detach()[:, 0].permute(1, 2, 0).to(dtype).contiguous()


@triton.jit
def _depthwise_conv2d_kernel(
    # pointers: input, packed weight [KH, KW, C_out], fp32 bias, fp32 combined scale [C_out]
    # (QUANT only), residual, outs[0], fp32 slope
    x_ptr, w_ptr, bias_ptr, scale_ptr, res_ptr, out_ptr, slope_ptr,
    # sizes; C_out in units of OUT_VEC
    H, W, OH, OW, C_out, M,
    # input: lead and strides in logical NCHW order, all but the channel stride in units of X_VEC
    x_lead, s_xn, s_xc, s_xh, s_xw,
    # residual, output segments: as in conv2d (units of OUT_VEC)
    r_lead, s_rn, s_rc, s_rh, s_rw, seg_c1, seg_c2, seg_c3, seg_o0, seg_o1, seg_o2, seg_o3,
    s0n, s0c, s0h, s0w, s1n, s1c, s1h, s1w, s2n, s2c, s2h, s2w, s3n, s3c, s3h, s3w,
    # int8: the residual codes' scale, 1 / the output's scale (quant_args)
    res_scale, out_inv_scale,
    # geometry; MULT = C_out / C_in (output channels per input channel); PAD_H/PAD_W are the
    # top/left padding, BORDER_H/W whether that axis pads at all (as in conv2d)
    MULT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    BORDER_H: tl.constexpr, BORDER_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    # epilogue; activations as (code, alpha, beta), see act_constexprs
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ACT_ALPHA: tl.constexpr, ACT_BETA: tl.constexpr,
    HAS_RES: tl.constexpr, POST_ACT: tl.constexpr, POST_ACT_ALPHA: tl.constexpr,
    POST_ACT_BETA: tl.constexpr, NUM_SEG: tl.constexpr,
    # tiling; alignment (elements per vector access) of input and output channel rows
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, X_VEC: tl.constexpr, OUT_VEC: tl.constexpr,
    # int8 (quant_args, as in conv2d): codes in, int32 sums, padding reads X_ZP
    QUANT: tl.constexpr, X_ZP: tl.constexpr, RES_QUANT: tl.constexpr, RES_ZP: tl.constexpr,
    OUT_QUANT: tl.constexpr, OUT_ZP: tl.constexpr, OUT_PRESCALED: tl.constexpr,
):
    C_out = C_out * OUT_VEC
    s_xn, s_xh, s_xw = s_xn * X_VEC, s_xh * X_VEC, s_xw * X_VEC
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_m < M)[:, None] & (offs_c < C_out)[None, :]
    # Overhanging rows/columns wrap onto valid ones so only the zero padding masks loads.
    m_ld, nb, oh, ow = output_pixels(offs_m, M, OH, OW)
    co = offs_c % C_out
    x_rows = x_ptr + x_lead * X_VEC + nb * s_xn
    x_cols = (co // MULT) * s_xc

    if QUANT:
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.int32)  # exact for any KH·KW
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    # kw unrolls, kh stays a runtime loop: fully unrolling a 7x7 let LLVM hoist all 49 taps'
    # loads and spill ~14 KB per thread on sm_90; one row of taps at a time does not spill.
    for kh in range(KH):
        ih = oh * STRIDE_H - PAD_H + kh * DIL_H
        for kw in tl.static_range(KW):
            iw = ow * STRIDE_W - PAD_W + kw * DIL_W
            # Along an unpadded axis every tap is inside (OH, OW match the conv formula).
            inside = tl.full((BLOCK_M,), 1, tl.int1)
            if BORDER_H:
                inside = inside & (ih >= 0) & (ih < H)
            if BORDER_W:
                inside = inside & (iw >= 0) & (iw < W)
            xv = load_codes((x_rows + ih * s_xh + iw * s_xw)[:, None] + x_cols[None, :], inside[:, None], X_ZP)
            wv = tl.load(w_ptr + (kh * KW + kw) * C_out + co)
            acc += xv.to(acc.dtype) * wv.to(acc.dtype)[None, :]

    acc = conv_epilogue(acc, co, nb, oh, ow, bias_ptr, scale_ptr, res_ptr, slope_ptr, r_lead, s_rn,
                        s_rc, s_rh, s_rw, res_scale, HAS_BIAS, ACT, ACT_ALPHA, ACT_BETA, HAS_RES,
                        POST_ACT, POST_ACT_ALPHA, POST_ACT_BETA, OUT_VEC, QUANT, RES_QUANT, RES_ZP, 0, False,
                        OUT_PRESCALED)
    store_segments(out_ptr, acc, co, nb, oh, ow, mask, seg_c1, seg_c2, seg_c3, seg_o0, seg_o1,
                   seg_o2, seg_o3, s0n, s0c, s0h, s0w, s1n, s1c, s1h, s1w, s2n, s2c, s2h, s2w,
                   s3n, s3c, s3h, s3w, out_inv_scale, NUM_SEG, OUT_VEC, OUT_QUANT, OUT_ZP,
                   OUT_PRESCALED)


class DepthwiseConv2d(Conv2d):
    """Conv2d's bound-layer interface for groups == C_in (weight [C_out, 1, KH, KW]), on the
    direct kernel; configs hold BLOCK_M, BLOCK_C, num_warps, num_stages."""

    _config_keys = _CONFIG_KEYS
    _min_block = 1  # no tl.dot: any power of two works
    _group_tiles = False

    def _check_groups(self) -> None:
        if self.groups != self.in_channels:
            raise ValueError(f"DepthwiseConv2d needs groups == C_in (weight [C_out, 1, KH, KW]); "
                             f"got groups={self.groups}, C_in={self.in_channels}")

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        return pack_depthwise_weight(weight, self.dtype)

    def _candidate_configs(self) -> list[dict]:
        return depthwise_conv2d_configs(self.out_channels)

    def _check_gate(self, gate: torch.Tensor, x: torch.Tensor) -> None:
        # SE gates sit after the depthwise conv of an inverted residual block, in front of the
        # 1x1 projection (a Conv2d), so the depthwise kernel has no gated variant.
        raise ValueError("DepthwiseConv2d takes no gate: fold the gate into the next Conv2d")

    def _launch(self, x, out, residual, res_strides, num_seg, seg, oh, ow, gate=None) -> None:
        n, _, h, w = x.shape
        cfg, m = self._launch_config(), n * oh * ow
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(self.out_channels, cfg["BLOCK_C"]))
        out, residual, out_scalars, out_vec = epilogue_args(
            out, residual, res_strides, num_seg, seg, (self.out_channels,))
        x, _, in_scalars, x_vec = input_args(x, None, (self.in_channels,))
        q_scalars, q_constexprs = quant_args(self.quant, self.out_prescaled)
        launch(_depthwise_conv2d_kernel, grid,
            x, self.weight, self.bias, self.scale, residual, out, self.act_slope,
            h, w, oh, ow, self.out_channels // out_vec, m, *in_scalars[:5], *out_scalars, *q_scalars,
            MULT=self.out_channels // self.in_channels, **self._geometry(),
            HAS_BIAS=self.bias is not None, HAS_RES=residual is not None,
            **saturation_implied(self._act_constexprs, self.quant, residual is not None), NUM_SEG=num_seg,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], X_VEC=x_vec, OUT_VEC=out_vec,
            **q_constexprs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1,
                     groups: int | None = None, activation: ActLike = None,
                     residual: torch.Tensor | None = None, post_activation: ActLike = None,
                     out: torch.Tensor | None = None, config: dict | None = None,
                     act_slope: torch.Tensor | None = None) -> torch.Tensor:
    """One-shot depthwise ``post_act(act(conv2d(x, weight) + bias) + residual)``; groups
    defaults to C_in. Packs weights per call, so compiled models use :class:`DepthwiseConv2d`."""
    layer = DepthwiseConv2d(weight, bias, stride=stride, padding=padding, dilation=dilation,
                            groups=x.shape[1] if groups is None else groups,
                            activation=activation, post_activation=post_activation,
                            act_slope=act_slope, dtype=x.dtype, config=config)
    out = allocate_output(x, layer) if out is None else out
    layer(x, [out], residual)
    return out
