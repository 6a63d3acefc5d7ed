"""Implicit-GEMM 2D convolution on strided (typically channels_last) views, fused epilogue.

Per group g the convolution is one GEMM  out[m, n] = sum_k A[m, k] * B[k, n]  with
    M = N·OH·OW   output pixels,     m = (n_img·OH + oh)·OW + ow
    N = C_out/groups                 output channels of the group
    K = KH·KW·C_in/groups            k = (kh·KW + kw)·C_in_g + c
    A[m, k] = x[n_img, g·C_in_g + c, oh·s_h - p_t + kh·d_h, ow·s_w - p_l + kw·d_w]  (0 outside)
    B[k, n] = weight[g·C_out_g + n, c, kh, kw]   (packed once as [C_out, KH, KW, C_in_g])
A is never materialized: each (kh, kw) step gathers its rows straight from x, so a 1x1, stride 1,
pad 0 conv on channels_last data is a plain GEMM over pixels. Padding may be asymmetric (top p_t,
bottom, left p_l, right: TensorFlow "SAME", a folded ZeroPad2d); taps are offset by top/left and
bounds-checked along an axis that pads on either side. The epilogue runs on the fp32
accumulator: + bias, activation, + residual, post-activation, then one store, optionally split
along channels into up to four destination views of one buffer (so a concat costs nothing).
Split-K (for long-K layers whose few output tiles leave SMs idle, e.g. at batch 1): SPLIT_K
programs per tile sum contiguous shares of the K loop into an fp32 workspace, and a second
kernel adds the shares in a fixed order and runs that same epilogue. Narrow groups (ResNeXt's
32 groups of 4..32 channels) run as super-groups of GROUPS_PER_TILE groups with a block-diagonal
weight (``conv2d_weights.py``): the kernel just sees fewer, wider groups. GROUPS_PER_TILE need
not divide the groups (RegNet's 13 or 55): the last super-group is partial (PAD_GROUPS), its
missing input channels masked and its missing output channels dropped.
An optional gate (a squeeze-and-excitation multiply folded into the conv) scales every A element
x[n, c, ih, iw] by gate[n, c] as the tile loads (HAS_GATE): conv(x * gate) in one pass over x.
Channel counts, pixel strides and pointer leads come in units of X_VEC / OUT_VEC elements
(``vector_width``): the compiler then knows channel rows are 16-byte aligned and moves them as
vectors even for channel counts that are not multiples of 16 (24, 72, 104).
int8 (QUANT, ``torch_gie.quantize.arith``): x holds codes, whose padding and masked loads read the
input zero point X_ZP (real zero); the weight holds per-channel codes; tl.dot sums int8 products
into an int32 accumulator (an int32 split-K workspace); a gate rescales each code at x's scale;
the epilogue computes acc * s_x·s_w[n] + folded bias[n] in fp32 before the usual steps.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from torch_gie.activations import ActLike, act_constexprs
from torch_gie.kernels.conv2d_configs import (
    CONFIG_KEYS,
    INT8_MIN_BLOCK_K,
    check_config,
    conv2d_configs,
    residual_twins,
)
from torch_gie.kernels.conv2d_weights import (
    pack_conv_weight,
    pack_super_groups,
    pad_channels,
    padding_taps,
    zero_point_digits,
)
from torch_gie.kernels.conv_epilogue import (
    conv_epilogue,
    epilogue_args,
    flat_pixels,
    load_residual,
    output_pixels,
    output_prescaled,
    prescale,
    quant_args,
    reduce_split_k,
    saturation_implied,
    segment_args,
    store_segments,
)
from torch_gie.kernels.launch import compiling_only, config_override, launch
from torch_gie.kernels.layer_args import (
    IntPair,
    Padding,
    aligned_base,
    as_padding,
    as_pair,
    bind_activations,
    check_conv_input,
    check_conv_outputs,
    check_gate,
    conv_output_size,
    four_sided,
    problem_pixels,
    vector_width,
)
from torch_gie.kernels.quant import dequantize, load_codes, round_to_codes
from torch_gie.quantize.arith import LayerQuant, fold_zero_point, quantize_weight

# Names tl.dot accepts for fp32 operands on NVIDIA in Triton 3.x (keyword ``input_precision``).
FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")


@triton.jit
def _inside(ih, iw, H, W, BORDER_H: tl.constexpr, BORDER_W: tl.constexpr, BLOCK_M: tl.constexpr):
    """Zero padding: which rows read inside the image. Along an axis without padding every tap
    is inside (OH, OW were checked against the conv formula), so its check vanishes at compile
    time; BORDER_H/W say the axis pads on either side."""
    inside = tl.full((BLOCK_M,), 1, tl.int1)
    if BORDER_H:
        inside = inside & (ih >= 0) & (ih < H)
    if BORDER_W:
        inside = inside & (iw >= 0) & (iw < W)
    return inside


@triton.jit
def _split_range(total, STEP: tl.constexpr, SPLIT_K: tl.constexpr):
    """This program's contiguous share [lo, hi) of a K loop ``range(0, total, STEP)``: split
    program_id(2) of SPLIT_K gets 1/SPLIT_K of the iterations, rounded; a share may be empty
    (its program then stores zeros). Unsplit, the loop keeps its literal bounds."""
    lo = 0
    hi = total
    if SPLIT_K > 1:
        iters = tl.cdiv(total, STEP)
        split = tl.program_id(2)
        lo = split * iters // SPLIT_K * STEP
        hi = (split + 1) * iters // SPLIT_K * STEP
    return lo, hi


@triton.jit
def _gated(a, gate_rows, c, s_gc, mask, HAS_GATE: tl.constexpr, MASKED: tl.constexpr,
           QUANT: tl.constexpr, X_ZP: tl.constexpr):
    """a [rows, k] * gate[row's image, channel c] (gate_rows: each row's gate at channel 0; the
    mask only if MASKED) in fp32, back in a's dtype for the dot: the same rounding as an eager
    fp16 ``x * gate`` before the conv. int8 codes (QUANT) are gated at x's own scale:
    clamp(rint((code - X_ZP) * gate) + X_ZP), so padding (code X_ZP) stays padding. Without a
    gate, a passes through untouched."""
    if HAS_GATE:
        gate_ptrs = gate_rows[:, None] + (c * s_gc)[None, :]
        if MASKED:
            gv = tl.load(gate_ptrs, mask=mask, other=0.0)
        else:
            gv = tl.load(gate_ptrs)
        if QUANT:
            a = round_to_codes(dequantize(a, gv.to(tl.float32), X_ZP), X_ZP)
        else:
            a = (a.to(tl.float32) * gv.to(tl.float32)).to(a.dtype)
    return a


@triton.jit
def _accumulate(acc, a_rows, inside, b_cols, c, c_end, s_xc, gate_rows, s_gc,
                HAS_GATE: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                QUANT: tl.constexpr, X_ZP: tl.constexpr, A_FILL: tl.constexpr):
    """acc += A[rows, channels c] @ B[channels c, cols] for one tap; a_rows/b_cols point at the
    tap's channel 0 for each output pixel / output channel, gate_rows at each pixel's image's
    gate for channel 0 (HAS_GATE). Unless EVEN_K, channels from c_end on count as zeros (their
    weights do). Padding reads A_FILL: X_ZP, real zero (0 but for unsigned int8 codes), or 0 when
    the kernel adds the zero point's share of the padding after the loop (_zero_point_padding)."""
    a_ptrs = a_rows[:, None] + (c * s_xc)[None, :]
    b_ptrs = b_cols[None, :] + c[:, None]
    if EVEN_K:
        a = load_codes(a_ptrs, inside[:, None], A_FILL)
        a = _gated(a, gate_rows, c, s_gc, inside[:, None], HAS_GATE, False, QUANT, X_ZP)
        b = tl.load(b_ptrs)
    else:
        a = load_codes(a_ptrs, inside[:, None] & (c < c_end)[None, :], A_FILL)
        a = _gated(a, gate_rows, c, s_gc, (c < c_end)[None, :], HAS_GATE, True, QUANT, X_ZP)
        b = tl.load(b_ptrs, mask=(c < c_end)[:, None], other=0)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def _zero_point_padding(acc, digits_ptr, outside_ptr, offs_m, co, OHW, C_out, DIGITS: tl.constexpr,
                        TAPS: tl.constexpr):
    """The padding's share of an int8 sum whose padded taps were loaded as 0 instead of the zero
    point X_ZP: acc[m, n] += X_ZP · wsum[tap, n] over the taps of pixel m that fall outside the
    image (wsum: the per-tap sums of the weight codes). Exact in int32. Loading padding as 0 is
    what lets the A tiles of a zero-point input move as asynchronous copies (which fill masked
    lanes with zeros only): a select to X_ZP after the load would take every tile through
    registers.
    On the tensor cores, as small int8 dots: the output pixel's row of ``outside_ptr``
    (``padding_taps``: int8 [OH·OW, TAPS], X_ZP where a tap is outside) times wsum in DIGITS
    base-128 digits (``zero_point_digits``: int8 [DIGITS, TAPS, C_out]). Per output element,
    with a select and an add per tap, it took 25 instructions on a 3x3 conv, more than the rest
    of the requantizing epilogue (benchmarks/NOTES.md 54)."""
    taps = tl.arange(0, TAPS)
    pixel = offs_m % OHW  # the same for every image; rows past M wrap (their stores are masked)
    a = tl.load(outside_ptr + (pixel * TAPS)[:, None] + taps[None, :])
    rows = digits_ptr + taps[:, None] * C_out + co[None, :]
    acc = tl.dot(a, tl.load(rows), acc, out_dtype=tl.int32)
    for d in tl.static_range(1, DIGITS):
        acc += tl.dot(a, tl.load(rows + d * TAPS * C_out), out_dtype=tl.int32) << (7 * d)
    return acc


# A residual is loaded before the K loop when each program runs at most this many K steps (0:
# never), unless its config sets PREFETCH_RES False (``conv2d_configs.residual_twins``).
PREFETCH_RESIDUAL_MAX_STEPS = 2


@triton.jit
def _conv2d_kernel(
    # pointers: input, packed weight [C_out, KH, KW, C_in_g], fp32 bias, fp32 combined scale
    # [C_out] (QUANT only), residual, outs[0], split-K workspace [SPLIT_K, M, C_out] (SPLIT_K > 1
    # only; fp32, int32 with QUANT), fp32 PReLU slope [C_out], input gate [N, C_in] (HAS_GATE
    # only), the zero-point padding's int8 tables (ZP_PADDING only: zero_point_digits,
    # padding_taps); x, gate, residual
    # and outs[0] start at an aligned address a lead of a few elements before the view
    # (aligned_base)
    x_ptr, w_ptr, bias_ptr, scale_ptr, res_ptr, out_ptr, ws_ptr, slope_ptr, gate_ptr, zpd_ptr,
    zpt_ptr,
    # sizes; channel counts per (super-)group and in all, in units of X_VEC (input channels) and
    # OUT_VEC (output channels)
    H, W, C_in_g, C_in, OH, OW, C_out_g, C_out, M,
    # input, gate: lead and strides in logical NCHW order (image, channel for the gate); all
    # but the channel strides in units of X_VEC
    x_lead, s_xn, s_xc, s_xh, s_xw, g_lead, s_gn, s_gc,
    # residual: lead, strides; output segments 1..3: first channel; segments 0..3: offset from
    # out_ptr, then strides. All but the channel strides in units of OUT_VEC (epilogue_args).
    r_lead, s_rn, s_rc, s_rh, s_rw, seg_c1, seg_c2, seg_c3, seg_o0, seg_o1, seg_o2, seg_o3,
    s0n, s0c, s0h, s0w, s1n, s1c, s1h, s1w, s2n, s2c, s2h, s2w, s3n, s3c, s3h, s3w,
    # int8: the residual codes' scale, 1 / the output's scale (quant_args)
    res_scale, out_inv_scale,
    # geometry: specializing on it fixes the tap loop bounds and drops needless border checks;
    # PAD_H/PAD_W are the top/left padding, BORDER_H/W whether that axis pads at all
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr, BORDER_H: tl.constexpr, BORDER_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    # epilogue; activations as (code, alpha, beta), see act_constexprs
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ACT_ALPHA: tl.constexpr, ACT_BETA: tl.constexpr,
    HAS_RES: tl.constexpr, POST_ACT: tl.constexpr, POST_ACT_ALPHA: tl.constexpr,
    POST_ACT_BETA: tl.constexpr, NUM_SEG: tl.constexpr,
    # tiling
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, FLAT_K: tl.constexpr, GATHER_K: tl.constexpr, FOLD_KW: tl.constexpr,
    PIX: tl.constexpr, C_IN_G: tl.constexpr, PAD_LANES_FINITE: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_GATE: tl.constexpr,
    # alignment (elements per vector access) of the input and output operands; whether the
    # last super-group is partial (GROUPS_PER_TILE does not divide the groups)
    X_VEC: tl.constexpr, OUT_VEC: tl.constexpr, PAD_GROUPS: tl.constexpr,
    # int8 (quant_args): x holds codes (int8 dot, int32 accumulator) whose padding reads X_ZP;
    # the residual holds codes (RES_QUANT); the output is requantized (OUT_QUANT), its 1 / scale
    # already in the scale, bias and res_scale with OUT_PRESCALED (output_prescaled). ZP_PADDING
    # (the digits of zpd_ptr's table; 0: off): the tap loops load padding as 0 and
    # _zero_point_padding adds X_ZP's share after them, over ZP_TAPS taps (KH·KW rounded up to a
    # dot's K); A_FILL is what their padding reads (0 then, else X_ZP)
    QUANT: tl.constexpr, X_ZP: tl.constexpr, RES_QUANT: tl.constexpr, RES_ZP: tl.constexpr,
    OUT_QUANT: tl.constexpr, OUT_ZP: tl.constexpr, OUT_PRESCALED: tl.constexpr,
    ZP_PADDING: tl.constexpr, ZP_TAPS: tl.constexpr, A_FILL: tl.constexpr,
    PREFETCH_RES: tl.constexpr,
    # a 1x1 stride-1 conv whose input, residual and outputs are all ``flat_pixels``: pixel rows
    # are addressed without dividing the row index into (image, row, column)
    FLAT_PIXELS: tl.constexpr,
    # FLAT_K: channel blocks per tap, cdiv(C_in_g, BLOCK_K) (1 for the other loops)
    NUM_KC: tl.constexpr,
):
    C_in_g, C_in = C_in_g * X_VEC, C_in * X_VEC
    C_out_g, C_out = C_out_g * OUT_VEC, C_out * OUT_VEC
    s_xn, s_xh, s_xw, s_gn = s_xn * X_VEC, s_xh * X_VEC, s_xw * X_VEC, s_gn * X_VEC
    # Grouped launch order (as in Triton's matmul tutorial): GROUP_M row tiles share their
    # input rows in L2 while all column tiles go through them. Axis 2 is the K split.
    pid, g = tl.program_id(0), tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(C_out_g, BLOCK_N)
    group_id = pid // (GROUP_M * num_pid_n)
    first_m = group_id * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # The (super-)group's real output and input channels: fewer in a partial last super-group,
    # whose missing groups' input channels read as zeros and output columns are not stored.
    n_end, c_end = C_out_g, C_in_g
    if PAD_GROUPS:
        n_end = min(C_out_g, C_out - g * C_out_g)
        c_end = min(C_in_g, C_in - g * C_in_g)
    mask_m, mask_n = offs_m < M, offs_n < n_end
    # Rows/columns past the end wrap onto valid ones: their loads need no mask, and the results
    # are discarded by the store mask. (Wrapping within the group keeps whole vectors of
    # columns contiguous: n_end is a multiple of OUT_VEC.)
    m_ld, nb, oh, ow = output_pixels(offs_m, M, OH, OW, FLAT_PIXELS)
    co = g * C_out_g + offs_n % n_end
    x_rows = x_ptr + x_lead * X_VEC + nb * s_xn + (g * C_in_g) * s_xc
    # Each row's own image's gate: an M tile may straddle two images.
    gate_rows = nb  # unused without a gate
    if HAS_GATE:
        gate_rows = gate_ptr + g_lead * X_VEC + nb * s_gn + (g * C_in_g) * s_gc
    w_cols = w_ptr + co.to(tl.int64) * (KH * KW * C_in_g)
    offs_k = tl.arange(0, BLOCK_K)

    # A short K loop leaves the residual's load exposed after it; issued first, it overlaps
    # the loop's loads (PREFETCH_RES, chosen by the launcher).
    res_tile = 0
    if PREFETCH_RES:
        res_tile = load_residual(res_ptr, r_lead, nb, oh, ow, co, s_rn, s_rc, s_rh, s_rw, OUT_VEC)
    if QUANT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # exact: no rounding before the scale
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FOLD_KW:
        # NHWC with pixel stride PIX >= C_in_g (PIX > C_in_g: channels padded, e.g. RGB stored as
        # 4), dilation_w 1: for one kh the (kw, c) values sit in one contiguous run of KW*PIX at
        # (iw0 + kw) * PIX + c. w_ptr then holds weights packed as [C_out, KH, KW, PIX] (zero for
        # c >= C_in_g) so k = kh*KW*PIX + j. PIX is a constexpr: runs start at multiples of PIX,
        # which lets the loads vectorize. One runtime loop over (kh, j block) pipelines across rows.
        KWC = KW * PIX
        num_j = tl.cdiv(KWC, BLOCK_K)
        iw0 = ow * STRIDE_W - PAD_W
        w_fold = w_ptr + co.to(tl.int64) * (KH * KWC)
        # One group (the launcher folds only then): rows start at the image, not at a group's
        # first channel, so the compiler sees runs aligned to PIX elements and vectorizes them.
        x_img = x_ptr + x_lead * X_VEC + nb * s_xn
        t_lo, t_hi = _split_range(KH * num_j, 1, SPLIT_K)
        for t in range(t_lo, t_hi):
            kh = t // num_j
            j = (t - kh * num_j) * BLOCK_K + offs_k
            ih = oh * STRIDE_H - PAD_H + kh * DIL_H
            iw = iw0[:, None] + (j // PIX)[None, :]
            a_mask = ((ih >= 0) & (ih < H))[:, None] & (j < KWC)[None, :] & (iw >= 0) & (iw < W)
            a = load_codes((x_img + ih * s_xh + iw0 * PIX)[:, None] + j[None, :], a_mask, X_ZP)
            if PIX != C_IN_G and not PAD_LANES_FINITE:
                # Padding lanes meet zero weights; only NaN/Inf there could reach the sum. A select
                # here keeps the tile out of the asynchronous copy path (a synchronous load through
                # registers), so it is skipped when the caller vouches for finite lanes.
                a = tl.where(((j % PIX) < C_IN_G)[None, :], a, X_ZP)
            b = tl.load(w_fold[None, :] + (kh * KWC + j)[:, None], mask=(j < KWC)[:, None], other=0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
    elif GATHER_K:
        # K flattened across taps: each element of a K chunk decodes its own (kh, kw, c), so a
        # 3-channel input fills the tile instead of padding every tap to BLOCK_K channels.
        K_total = KH * KW * C_in_g
        k_lo, k_hi = _split_range(K_total, BLOCK_K, SPLIT_K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + offs_k
            c = k % C_in_g
            tap = k // C_in_g
            kh = tap // KW
            kw = tap - kh * KW
            ih = (oh * STRIDE_H - PAD_H)[:, None] + (kh * DIL_H)[None, :]
            iw = (ow * STRIDE_W - PAD_W)[:, None] + (kw * DIL_W)[None, :]
            k_ok = (k < K_total) & (c < c_end)
            a_mask = k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = load_codes(x_rows[:, None] + ih * s_xh + iw * s_xw + (c * s_xc)[None, :], a_mask, X_ZP)
            a = _gated(a, gate_rows, c, s_gc, k_ok[None, :], HAS_GATE, True, QUANT, X_ZP)
            b = tl.load(w_cols[None, :] + k[:, None], mask=k_ok[:, None], other=0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
    elif FLAT_K:
        # One runtime loop over (tap, channel block): when C_in_g spans few BLOCK_Ks, this is
        # the only form whose loads the software pipeliner can overlap across taps.
        # Each row's window corner and its address are computed once; a step adds its tap's
        # offset, the same for every row (one add per row instead of two multiplies and adds).
        t_lo, t_hi = _split_range(KH * KW * NUM_KC, 1, SPLIT_K)
        h0 = oh * STRIDE_H - PAD_H
        w0 = ow * STRIDE_W - PAD_W
        corner_rows = x_rows + h0 * s_xh + w0 * s_xw
        for t in range(t_lo, t_hi):
            tap = t // NUM_KC  # a constant divisor: a multiply and a shift, not a division
            kh = tap // KW
            kw = tap - kh * KW
            inside = _inside(h0 + kh * DIL_H, w0 + kw * DIL_W, H, W, BORDER_H, BORDER_W, BLOCK_M)
            tap_offset = (kh * DIL_H) * s_xh + (kw * DIL_W) * s_xw
            acc = _accumulate(acc, corner_rows + tap_offset, inside, w_cols + tap * C_in_g,
                              (t - tap * NUM_KC) * BLOCK_K + offs_k, c_end, s_xc, gate_rows,
                              s_gc, HAS_GATE, EVEN_K, DOT_PRECISION, QUANT, X_ZP, A_FILL)
    else:
        # Taps unrolled, channel blocks in a runtime loop: rows, border mask and tap offsets
        # are computed once per tap; best when C_in_g spans several BLOCK_Ks. A split takes
        # a share of every tap's channel blocks.
        c_lo, c_hi = _split_range(C_in_g, BLOCK_K, SPLIT_K)
        for kh in tl.static_range(KH):
            ih = oh * STRIDE_H - PAD_H + kh * DIL_H
            for kw in tl.static_range(KW):
                iw = ow * STRIDE_W - PAD_W + kw * DIL_W
                inside = _inside(ih, iw, H, W, BORDER_H, BORDER_W, BLOCK_M)
                a_rows = x_rows + ih * s_xh + iw * s_xw
                b_cols = w_cols + (kh * KW + kw) * C_in_g
                for c0 in range(c_lo, c_hi, BLOCK_K):
                    acc = _accumulate(acc, a_rows, inside, b_cols, c0 + offs_k, c_end, s_xc,
                                      gate_rows, s_gc, HAS_GATE, EVEN_K, DOT_PRECISION, QUANT,
                                      X_ZP, A_FILL)

    if ZP_PADDING:
        if SPLIT_K == 1:
            acc = _zero_point_padding(acc, zpd_ptr, zpt_ptr, offs_m, co, OH * OW, C_out,
                                      ZP_PADDING, ZP_TAPS)
        elif tl.program_id(2) == 0:  # once per output tile: split 0 of a split-K sum
            acc = _zero_point_padding(acc, zpd_ptr, zpt_ptr, offs_m, co, OH * OW, C_out,
                                      ZP_PADDING, ZP_TAPS)
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        # A partial sum, stored raw: the epilogue must see the whole sum (_split_k_reduce_kernel).
        rows = (tl.program_id(2) * M + offs_m).to(tl.int64) * C_out
        tl.store(ws_ptr + rows[:, None] + co[None, :], acc, mask=mask)
    else:
        acc = conv_epilogue(acc, co, nb, oh, ow, bias_ptr, scale_ptr, res_ptr, slope_ptr, r_lead,
                            s_rn, s_rc, s_rh, s_rw, res_scale, HAS_BIAS, ACT, ACT_ALPHA, ACT_BETA,
                            HAS_RES, POST_ACT, POST_ACT_ALPHA, POST_ACT_BETA, OUT_VEC, QUANT,
                            RES_QUANT, RES_ZP, res_tile, PREFETCH_RES, OUT_PRESCALED)
        store_segments(out_ptr, acc, co, nb, oh, ow, mask, seg_c1, seg_c2, seg_c3, seg_o0,
                       seg_o1, seg_o2, seg_o3, s0n, s0c, s0h, s0w, s1n, s1c, s1h, s1w, s2n, s2c,
                       s2h, s2w, s3n, s3c, s3h, s3w, out_inv_scale, NUM_SEG, OUT_VEC, OUT_QUANT,
                       OUT_ZP, OUT_PRESCALED)


class Conv2d:
    """A convolution bound at build time to its packed weights, geometry and fused epilogue.

    Calling it writes ``epilogue(conv(x))`` into ``outs``, a list of 1..4 views of one buffer
    splitting C_out in order. ``activation`` and ``post_activation`` are an ``Act``, a name or
    None; ``act_slope`` (fp32 [C_out]) is PReLU's per-channel slope, for whichever of the two is
    prelu (at most one). ``configs`` lists candidate tilings for the tuner, built for the
    real problem size when ``input_hw`` and ``batch`` are given (split-K ones for long-K convs
    with few output tiles, and, with ``residual=True`` (calls will pass a residual), both orders
    of the residual's load for the first short-K ones); ``config`` is the one used (settable). Setting a config with
    GROUPS_PER_TILE > 1 packs the block-diagonal super-group weight then (never during a CUDA
    graph capture, since configs are set before); the layer keeps only the latest one.

    ``layer(x, outs, residual=None, gate=None)``: a gate ((N, C_in) or (N, C_in, 1, 1), any
    strides, the layer's dtype or fp32) computes conv(x * gate[:, :, None, None]) in the same
    single pass (a squeeze-and-excitation scale folded into the next conv). The gated kernel is
    compiled on the first gated call; a kw-folding config gathers instead when gated.

    int8 (``dtype=torch.int8, quant=LayerQuant(...)``): ``weight`` and ``bias`` stay real; the
    layer quantizes the weight per output channel (``arith.quantize_weight``) and folds the
    input zero point into the bias (``arith.fold_zero_point``). x holds int8 codes under
    ``quant.input``; the outputs hold codes under ``quant.output``, or real values in
    ``quant.out_dtype`` when it is None (every segment alike); a residual holds codes under
    ``quant.residual``, or real fp16/fp32 values when it is None; a gate is real (fp16/fp32).
    Configs then have BLOCK_K >= 32 (``INT8_MIN_BLOCK_K``).

    Input channels padded to the pixel stride (RGB stored as 4 channels) are masked out in the
    kw-folding loads; setting ``pad_lanes_finite`` (the caller guarantees the padding lanes hold
    finite values: they meet zero weights) skips that select, which lets the loads run as
    asynchronous copies. int8 codes are always finite.

    A split-K config needs an fp32 workspace [SPLIT_K, N·OH·OW, C_out] (int32 for int8). It is
    allocated on the layer's device by the first call that needs more than the layer holds, and
    kept for the layer's lifetime; later calls allocate nothing. So CUDA graph capture works after one
    warm-up call with the final config and input size, and must not be followed by a call
    needing a bigger workspace (a new, larger config or batch): that would replace the buffer
    the graph writes to.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1,
                 groups: int = 1, activation: ActLike = None, post_activation: ActLike = None,
                 act_slope: torch.Tensor | None = None, dtype: torch.dtype = torch.float16,
                 config: dict | None = None, fp32_precision: str = "ieee",
                 input_hw: tuple[int, int] | None = None, batch: int | None = None,
                 quant: LayerQuant | None = None, residual: bool = False) -> None:
        if weight.dim() != 4:
            raise ValueError(f"weight must be 4D [C_out, C_in/groups, KH, KW], "
                             f"got shape {tuple(weight.shape)}")
        if dtype not in (torch.float16, torch.float32, torch.int8):
            raise ValueError(f"dtype must be torch.float16, torch.float32 or torch.int8, got {dtype}")
        if (dtype == torch.int8) != (quant is not None):
            raise ValueError("dtype=torch.int8 needs quant=LayerQuant(...), and quant needs dtype=torch.int8")
        if quant is not None and quant.output is None and quant.out_dtype not in (torch.float16,
                                                                                  torch.float32):
            raise ValueError(f"quant.out_dtype must be torch.float16 or torch.float32, got {quant.out_dtype}")
        if fp32_precision not in FP32_PRECISIONS:
            raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, "
                             f"got {fp32_precision!r}")
        c_out, c_in_g, kh, kw = weight.shape
        if groups < 1 or c_out % groups:
            raise ValueError(f"groups={groups} must be >= 1 and divide C_out={c_out}")
        # padding: (ph, pw) when symmetric, else (top, bottom, left, right); see ``pads``.
        self.stride, self.padding = as_pair(stride, "stride"), as_padding(padding)
        self.dilation = as_pair(dilation, "dilation")
        if min(self.stride + self.dilation) < 1:
            raise ValueError(f"need stride, dilation >= 1, got stride={self.stride}, "
                             f"dilation={self.dilation}")
        self.groups, self.kernel_size = groups, (kh, kw)
        self.out_channels, self.in_channels = c_out, c_in_g * groups
        self.dtype, self.fp32_precision = dtype, fp32_precision
        # Output pixels the configs are built for. The _config prefix keeps it out of the
        # tuner's layer signature, which already holds the input shape: timing-cache keys stay
        # as they were.
        self._config_m = problem_pixels(self.output_hw, input_hw, batch)
        self._config_residual = residual  # calls will add a residual: offer its twins too
        self._workspace: torch.Tensor | None = None
        self.activation, self.post_activation, self.act_slope, self._act_constexprs = \
            bind_activations(activation, post_activation, act_slope, c_out, weight.device)
        # The integer codes are part of the tuner's layer signature (timing-cache keys).
        self.act, self.post_act = self._act_constexprs["ACT"], self._act_constexprs["POST_ACT"]
        self._check_groups()
        if bias is not None and tuple(bias.shape) != (c_out,):
            raise ValueError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")
        # Bias stays fp32: it is added to the fp32 accumulator.
        self.bias = None if bias is None else bias.detach().to(weight.device, torch.float32).contiguous()
        # int8: the weight as codes, and the fp32 per-channel scale s_x * s_w[n] and bias with
        # the input zero point folded in (quantize.arith), both applied to the int32 sum; with
        # an int8 output that commutes with its activations, both carry 1 / s_out as well.
        self.quant, self.scale = quant, None
        if quant is not None:
            weight, w_scale = quantize_weight(weight)
            scale, folded = fold_zero_point(self.bias, weight, w_scale, quant.input)
            if self.out_prescaled:
                scale, folded = prescale(scale, folded, quant)
            self.scale, self.bias = scale.to(weight.device), folded.to(weight.device)
        self._padding_digits = self._tap_sum_digits(weight)
        self.weight = self._pack(weight)
        self._super_group_weights: dict[int, torch.Tensor] = {}  # GROUPS_PER_TILE -> weight
        self.configs = self._candidate_configs()
        self.config = config if config is not None else self.configs[0]

    @property
    def config(self) -> dict:
        return self._config

    @config.setter
    def config(self, config: dict) -> None:
        config = check_config(config, self._config_keys, self._min_block,
                              INT8_MIN_BLOCK_K if self.dtype == torch.int8 else None)
        gpt = config.get("GROUPS_PER_TILE", 1)
        if gpt > 1 and (not self._group_tiles or gpt > self.groups):
            raise ValueError(f"config GROUPS_PER_TILE={gpt} must be at most groups={self.groups}"
                             + ("" if self._group_tiles else f" and needs {Conv2d.__name__}"))
        if gpt > 1 and gpt not in self._super_group_weights:
            self._super_group_weights.clear()  # one at a time: the tuner tries several
            self._super_group_weights[gpt] = pack_super_groups(self.weight, self.groups, gpt)
        self._config = config

    @property
    def out_prescaled(self) -> bool:
        """Whether the scale and bias carry the output's 1 / scale (``output_prescaled``). A
        property, not an attribute: the tuner keys layers by their plain attributes, and a new
        one would change every timing-cache key (it follows from quant and the activations)."""
        return output_prescaled(self.quant, self._act_constexprs)

    @property
    def launches(self) -> int:
        """Kernels per call under the current config: a split-K config adds its reduction."""
        return 2 if self._config.get("SPLIT_K", 1) > 1 else 1

    pad_lanes_finite = False  # see the class docstring
    supports_compile_only = True  # its launches honour kernels.launch.compile_only

    def _launch_config(self) -> dict:
        """The config this launch uses: the layer's, or another one a ``compile_only`` thread is
        compiling (the layer itself is left as it is)."""
        override = config_override()
        return self._config if override is None else override
    _config_keys = CONFIG_KEYS
    _min_block = 16  # every tl.dot dimension must be >= 16
    _group_tiles = True  # GROUPS_PER_TILE configs (super-groups) are supported

    # Hooks the depthwise variant overrides.
    def _check_groups(self) -> None:
        pass

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        return pack_conv_weight(weight, self.dtype)

    def _candidate_configs(self) -> list[dict]:
        cands = conv2d_configs(self.out_channels // self.groups, self.in_channels // self.groups,
                               self.dtype, self.kernel_size[0] * self.kernel_size[1],
                               self._config_m, self.groups)
        return residual_twins(cands, self._short_k) if self._config_residual else cands

    def _flat_pixels(self, x: torch.Tensor, res_strides: Sequence[int] | None, out_strides: Sequence[int],
                     oh: int, ow: int, gathered: bool) -> bool:
        """FLAT_PIXELS for this call: a 1x1 stride-1 conv without padding (input pixel p is
        output pixel p), not gathered or gated (those address by image), whose input, residual
        and output segments (strides (n, c, h, w) each) are all ``flat_pixels``."""
        if self.kernel_size != (1, 1) or self.stride != (1, 1) or any(self.pads) or gathered:
            return False
        strides = [x.stride()] + ([] if res_strides is None else [tuple(res_strides)])
        strides += [tuple(out_strides[i:i + 4]) for i in range(0, len(out_strides), 4)]
        return flat_pixels(x.shape[0], oh, ow, [(sn, sh, sw) for sn, _, sh, sw in strides])

    def _short_k(self, cfg: dict) -> bool:
        """Whether each program of ``cfg`` runs at most PREFETCH_RESIDUAL_MAX_STEPS K steps (a
        bottleneck's 1x1 conv3 over 64..256 channels runs one or two), so that a residual may be
        loaded before its loop (PREFETCH_RES)."""
        taps = self.kernel_size[0] * self.kernel_size[1]
        c_in_g = cfg.get("GROUPS_PER_TILE", 1) * (self.in_channels // self.groups)
        if cfg.get("GATHER_K", False) or cfg.get("FOLD_KW", False):
            steps = triton.cdiv(taps * c_in_g, cfg["BLOCK_K"])
        else:
            steps = taps * triton.cdiv(c_in_g, cfg["BLOCK_K"])
        return triton.cdiv(steps, cfg.get("SPLIT_K", 1)) <= PREFETCH_RESIDUAL_MAX_STEPS

    @property
    def pads(self) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) zero padding."""
        return four_sided(self.padding)

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        """(OH, OW) of this convolution for an (H, W) input."""
        top, bottom, left, right = self.pads
        return (conv_output_size(h, self.kernel_size[0], self.stride[0], top, self.dilation[0], bottom),
                conv_output_size(w, self.kernel_size[1], self.stride[1], left, self.dilation[1], right))

    def _geometry(self) -> dict:
        """The kernels' geometry constexprs (pads as top/left offsets and per-axis border flags)."""
        top, bottom, left, right = self.pads
        return {"KH": self.kernel_size[0], "KW": self.kernel_size[1], "STRIDE_H": self.stride[0],
                "STRIDE_W": self.stride[1], "PAD_H": top, "PAD_W": left,
                "BORDER_H": top + bottom > 0, "BORDER_W": left + right > 0,
                "DIL_H": self.dilation[0], "DIL_W": self.dilation[1]}

    def __call__(self, x: torch.Tensor, outs: torch.Tensor | Sequence[torch.Tensor],
                 residual: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> None:
        outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
        n, _, h, w = check_conv_input(x, self.in_channels, self.dtype, self.weight.device)
        oh, ow = self.output_hw(h, w)
        num_seg, seg = segment_args(outs, self.out_channels)
        shape = (n, self.out_channels, oh, ow)
        if self.quant is None:
            res_strides = check_conv_outputs(outs, residual, num_seg, shape, x)
        else:
            res = (torch.int8,) if self.quant.residual is not None else (torch.float16, torch.float32)
            res_strides = check_conv_outputs(outs, residual, num_seg, shape, x, self.quant.store_dtype, res)
        if gate is not None:
            self._check_gate(gate, x)
        if n * oh * ow == 0:
            return
        self._launch(x, outs[0], residual, res_strides, num_seg, seg, oh, ow, gate)

    def _check_gate(self, gate: torch.Tensor, x: torch.Tensor) -> None:
        # An int8 layer's gate is real: fp16 or fp32.
        check_gate(gate, x, self.in_channels, torch.float16 if self.quant is not None else self.dtype)

    def _launch(self, x, out, residual, res_strides, num_seg, seg, oh, ow, gate=None) -> None:
        n, _, h, w = x.shape
        cfg, m = self._launch_config(), n * oh * ow
        split, gpt = cfg.get("SPLIT_K", 1), cfg.get("GROUPS_PER_TILE", 1)
        # The kernel sees cdiv(groups, gpt) (super-)groups of gpt times the channels, the last
        # one partial when gpt does not divide the groups.
        groups, pad_groups = triton.cdiv(self.groups, gpt), self.groups % gpt != 0
        c_in_g = gpt * (self.in_channels // self.groups)
        c_out_g = gpt * (self.out_channels // self.groups)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(c_out_g, cfg["BLOCK_N"]), groups, split)
        # The precision only matters for fp32 operands; "tf32" is Triton's own default, so fp16
        # compiles exactly as if none were given.
        precision = self.fp32_precision if self.dtype == torch.float32 else "tf32"
        # Folding kw into channels needs NHWC input with a small pixel stride (dense, or channels
        # padded up to 8), one group and dilation_w == 1; otherwise a fold config gathers.
        pix = x.stride(3)
        # A gated conv gathers too: the folded loads would need the gate of every (kw, c) lane.
        fold = cfg.get("FOLD_KW", False) and self.groups == 1 and self.dilation[1] == 1 \
            and x.stride(1) == 1 and self.in_channels <= pix <= max(8, self.in_channels) \
            and gate is None
        gather = cfg.get("GATHER_K", False) or cfg.get("FOLD_KW", False)
        acts = saturation_implied(self._act_constexprs, self.quant, residual is not None)
        epilogue = {"HAS_BIAS": self.bias is not None, "HAS_RES": residual is not None, **acts,
                    "NUM_SEG": num_seg}
        flat = self._flat_pixels(x, res_strides if residual is not None else None, seg[6:6 + 4 * num_seg],
                                 oh, ow, gather or gate is not None)
        out, residual, out_scalars, out_vec = epilogue_args(
            out, residual, res_strides, num_seg, seg, (c_out_g, self.out_channels))
        x, gate, in_scalars, x_vec = input_args(x, gate, (c_in_g, self.in_channels))
        bias, res, ws = self.bias, residual, None
        q_scalars, q_constexprs = quant_args(self.quant, self.out_prescaled)
        if split > 1:
            # The epilogue moves to the reduction: one partial kernel serves every epilogue.
            ws = self._split_k_workspace(split * m * self.out_channels, x.device, compiling_only())
            bias, res = None, None
            epilogue = {"HAS_BIAS": False, "HAS_RES": False, **act_constexprs(None, "ACT"),
                        **act_constexprs(None, "POST_ACT"), "NUM_SEG": 1}
        weight = self._fold_weight(pix) if fold else self._super_group_weights.get(gpt, self.weight)
        # Zero-point padding as an epilogue term (the tap loops only; folded and gathered loads
        # and gated ones select the zero point as they load).
        zp_padding = self._padding_digits is not None and not gather and gate is None
        digits, taps = self._padding_digits, None
        if zp_padding:
            taps = self._padding_taps(h, w, oh, ow, x.device)
        q_constexprs = {**q_constexprs, "ZP_PADDING": digits.shape[0] if zp_padding else 0,
                        "ZP_TAPS": digits.shape[1] if zp_padding else 1,
                        "A_FILL": 0 if zp_padding or not any(self.pads) else q_constexprs["X_ZP"]}
        # The residual tile loads before a short K loop unless the config says after it.
        prefetch = res is not None and cfg.get("PREFETCH_RES", True) and self._short_k(cfg)
        launch(_conv2d_kernel, grid,
            x, weight, bias, self.scale, res, out, ws, self.act_slope, gate,
            digits if zp_padding else None, taps,
            h, w, c_in_g // x_vec, self.in_channels // x_vec, oh, ow, c_out_g // out_vec,
            self.out_channels // out_vec, m, *in_scalars, *out_scalars, *q_scalars,
            **self._geometry(), **epilogue,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=8,
            EVEN_K=c_in_g % cfg["BLOCK_K"] == 0 and not pad_groups, FLAT_K=cfg.get("FLAT_K", False),
            GATHER_K=gather and not fold, FOLD_KW=fold, PIX=pix if fold else 1,
            C_IN_G=c_in_g if fold else 1,
            PAD_LANES_FINITE=fold and pix != self.in_channels and (self.quant is not None or self.pad_lanes_finite),
            SPLIT_K=split, DOT_PRECISION=precision,
            HAS_GATE=gate is not None, X_VEC=x_vec, OUT_VEC=out_vec, PAD_GROUPS=pad_groups,
            **q_constexprs, PREFETCH_RES=prefetch, FLAT_PIXELS=flat,
            NUM_KC=triton.cdiv(c_in_g, cfg["BLOCK_K"]) if cfg.get("FLAT_K", False) and not gather else 1,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        if split > 1:
            reduce_split_k(ws, self.bias, out, residual, self.act_slope, oh, ow, self.out_channels,
                           m, out_scalars, out_vec, split, num_seg, acts,
                           self.scale, self.quant, self.out_prescaled)

    def _tap_sum_digits(self, codes: torch.Tensor) -> torch.Tensor | None:
        """Each tap's sum of weight codes per output channel as int8 digits
        (``zero_point_digits``), for the zero-point padding term (``_zero_point_padding``); None
        when padding reads code 0 (float layers, signed inputs, no padding)."""
        if self.quant is None or self.quant.input.zero_point == 0 or not any(self.pads):
            return None
        return zero_point_digits(codes)

    def _padding_taps(self, h: int, w: int, oh: int, ow: int, device: torch.device) -> torch.Tensor:
        """``padding_taps`` for an h x w input, made once per size on the first call (before any
        CUDA graph capture)."""
        cache = self.__dict__.setdefault("_padding_tap_tables", {})
        if (h, w) not in cache:
            cache[(h, w)] = padding_taps((h, w), (oh, ow), self.kernel_size, self.stride, self.pads,
                                         self.dilation, self._padding_digits.shape[1],
                                         self.quant.input.zero_point, device)
        return cache[(h, w)]

    def _fold_weight(self, pix: int) -> torch.Tensor:
        """The packed weight with its channels padded to the input's pixel stride (zeros), made
        once per stride on the first call (before any CUDA graph capture)."""
        if pix == self.in_channels:
            return self.weight
        cache = self.__dict__.setdefault("_fold_weights", {})
        if pix not in cache:
            cache[pix] = pad_channels(self.weight, pix)
        return cache[pix]

    def _split_k_workspace(self, numel: int, device: torch.device, compile_only: bool = False) -> torch.Tensor:
        """The layer's split-K workspace, replaced only when too small (see the class
        docstring: never during CUDA graph capture once a warm-up call has sized it). int32 for
        int8 layers: fp32 partial sums would round above 2**24. A launch that only compiles
        gets a one-element stand-in (the kernel specializes on its dtype and alignment) and
        leaves the layer's workspace alone."""
        dtype = torch.int32 if self.quant is not None else torch.float32
        if compile_only:
            return torch.empty(1, dtype=dtype, device=device)
        ws = self._workspace
        if ws is None or ws.numel() < numel or ws.device != device:
            ws = self._workspace = torch.empty(numel, dtype=dtype, device=device)
        return ws


def input_args(x: torch.Tensor, gate: torch.Tensor | None, channels: Sequence[int]
               ) -> tuple[torch.Tensor, torch.Tensor | None, list[int], int]:
    """(x, gate, scalars, VEC) as the conv kernels take them: x and the gate rebased to aligned
    addresses (``aligned_base``) and the scalars x_lead, s_xn, s_xc, s_xh, s_xw, g_lead, s_gn,
    s_gc, all but the channel strides in units of VEC. ``channels`` (the kernel's input channel
    counts) must be multiples of VEC too; the caller divides them."""
    s_xn, s_xc, s_xh, s_xw = x.stride()
    x, x_lead = aligned_base(x)
    g_lead, s_gn, s_gc = 0, 0, 0
    if gate is not None:
        s_gn, s_gc = gate.stride()[:2]
        gate, g_lead = aligned_base(gate)
    vec = vector_width(x.element_size(), [x_lead, s_xn, s_xh, s_xw, g_lead, s_gn, *channels])
    return x, gate, [x_lead // vec, s_xn // vec, s_xc, s_xh // vec, s_xw // vec, g_lead // vec,
                     s_gn // vec, s_gc], vec


def allocate_output(x: torch.Tensor, layer: Conv2d) -> torch.Tensor:
    """A channels_last output of the conv's full shape (for the convenience functions)."""
    n, _, h, w = x.shape
    dtype = x.dtype if layer.quant is None else layer.quant.store_dtype
    return torch.empty((n, layer.out_channels, *layer.output_hw(h, w)), dtype=dtype, device=x.device,
                       memory_format=torch.channels_last)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1, groups: int = 1,
           activation: ActLike = None, residual: torch.Tensor | None = None,
           post_activation: ActLike = None, out: torch.Tensor | None = None,
           config: dict | None = None, act_slope: torch.Tensor | None = None) -> torch.Tensor:
    """One-shot ``post_act(act(conv2d(x, weight) + bias) + residual)``; packs weights per call,
    so compiled models use :class:`Conv2d` instead."""
    layer = Conv2d(weight, bias, stride=stride, padding=padding, dilation=dilation,
                   groups=groups, activation=activation, post_activation=post_activation,
                   act_slope=act_slope, dtype=x.dtype, config=config)
    out = allocate_output(x, layer) if out is None else out
    layer(x, [out], residual)
    return out
