"""What every convolution kernel does after its K loop, shared by ``conv2d.py`` and
``depthwise_conv2d.py``: the fused epilogue on the fp32 accumulator (bias, activation, residual,
post-activation), the store split over up to four destination views of one buffer (how a
removed concat lands on the GPU), and the split-K reduction that applies both to summed shares.

int8 (``torch_gie.quantize.arith``): with QUANT the accumulator holds the int32 sum of codes and
is first scaled per output channel (``scale_ptr``: s_x * s_w[n]; the bias is then the folded
one); a residual of codes (RES_QUANT) is dequantized, and OUT_QUANT requantizes the result
instead of casting it to the output's dtype. Zero points are constexprs (0 or -128). With
OUT_PRESCALED (``output_prescaled``) the output's 1 / scale is already folded into the
per-channel scale, the bias and the residual's scale, so the epilogue computes in output code
units and the store only rounds: one multiply less per element, in an epilogue whose issue rate
bounds the memory-bound int8 layers (benchmarks/NOTES.md 53, 54).

Activations come as three constexprs each (code, alpha, beta: ``act_constexprs``), and PReLU's
per-channel slope as ``slope_ptr`` (fp32 [C_out]), shared by the activation and the
post-activation (at most one of them is prelu). Pixel strides, offsets and channel counts arrive
in units of the constexpr VEC (``epilogue_args``), so channel rows store as 16-byte vectors even
when the channel count (24, 72, 184) is not a multiple of 16.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from torch_gie.activations import activation_code
from torch_gie.kernels.epilogue import activate_channels
from torch_gie.kernels.launch import launch
from torch_gie.kernels.layer_args import aligned_base, vector_width
from torch_gie.kernels.quant import dequantize, requantize, round_to_codes
from torch_gie.quantize.arith import LayerQuant

MAX_SEGMENTS = 4


def segment_args(outs: Sequence[torch.Tensor], c_out: int) -> tuple[int, list[int]]:
    """Kernel scalars describing the output segments: (NUM_SEG, [c1, c2, c3, o1, o2, o3, 16
    strides]) with c_i the first channel of segment i and o_i its element offset from outs[0]."""
    n = len(outs)
    if not 1 <= n <= MAX_SEGMENTS:
        raise ValueError(f"expected 1 to {MAX_SEGMENTS} output views, got {n}")
    base, storage = outs[0], outs[0].untyped_storage().data_ptr()
    starts, offs, strides, c = [], [], [], 0
    for i, t in enumerate(outs):
        if t.dim() != 4:
            raise ValueError(f"outs[{i}] must be 4D (N, C, OH, OW), got shape {tuple(t.shape)}")
        if t.dtype != base.dtype or t.device != base.device:
            raise ValueError(f"outs[{i}] is {t.dtype} on {t.device}, expected "
                             f"{base.dtype} on {base.device} like outs[0]")
        if t.untyped_storage().data_ptr() != storage:
            raise ValueError(f"outs[{i}] must share outs[0]'s storage (one buffer, many views)")
        delta = t.data_ptr() - base.data_ptr()
        if delta % t.element_size():
            raise ValueError(f"outs[{i}] is not element-aligned with outs[0]")
        starts.append(c)
        offs.append(delta // t.element_size())
        strides += list(t.stride())
        c += t.shape[1]
    if c != c_out:
        raise ValueError(f"output views hold {c} channels in all, expected C_out={c_out}")
    pad = MAX_SEGMENTS - n
    return n, starts[1:] + [c_out] * pad + offs[1:] + [0] * pad + strides + [0] * 4 * pad


def epilogue_args(out: torch.Tensor, residual: torch.Tensor | None, res_strides: Sequence[int],
                  num_seg: int, seg: Sequence[int], channels: Sequence[int]
                  ) -> tuple[torch.Tensor, torch.Tensor | None, list[int], int]:
    """(out, residual, scalars, VEC) as the kernels take them: outs[0] and the residual rebased
    to aligned addresses (``aligned_base``), and the scalars r_lead, s_rn, s_rc, s_rh, s_rw,
    seg_c1..3, seg_o0..3 (seg_o0: outs[0]'s lead), 16 segment strides, all but the channel
    strides in units of VEC. ``channels`` (the kernel's channel counts: C_out, per group) must be
    multiples of VEC too; the caller divides them. Channel strides stay as they are: Triton
    specializes a stride of 1, which makes the channel rows contiguous in the first place."""
    out, o_lead = aligned_base(out)
    residual, r_lead = (None, 0) if residual is None else aligned_base(residual)
    rn, rc, rh, rw = res_strides
    starts, offs, strides = list(seg[:3]), [o_lead] + [o_lead + o for o in seg[3:6]], list(seg[6:])
    pixel_strides = [v for i, v in enumerate(strides[:4 * num_seg]) if i % 4 != 1]
    vec = vector_width(out.element_size(), [r_lead, rn, rh, rw, *starts, *offs, *pixel_strides,
                                            *channels])
    scalars = [r_lead // vec, rn // vec, rc, rh // vec, rw // vec, *(c // vec for c in starts),
               *(o // vec for o in offs), *(v if i % 4 == 1 else v // vec for i, v in enumerate(strides))]
    return out, residual, scalars, vec


def flat_pixels(n: int, oh: int, ow: int, pixel_strides: Sequence[tuple[int, int, int]]) -> bool:
    """Whether every operand given by its (image, row, column) strides in elements holds its
    N x OH x OW pixels at offsets p · (column stride), p = (nb·OH + oh)·OW + ow, and those
    offsets fit in int32: then a kernel may address pixel rows as p times the column stride
    (``output_pixels`` with FLAT), with no division of p into (nb, oh, ow). True of dense NHWC
    tensors and of channel slices of them (a concat's slots)."""
    for sn, sh, sw in pixel_strides:
        if (oh > 1 and sh != ow * sw) or (n > 1 and sn != oh * ow * sw) or (n * oh * ow + 1) * sw >= 2 ** 31:
            return False
    return True


@triton.jit
def output_pixels(offs_m, M, OH, OW, FLAT: tl.constexpr = False):
    """(m_ld, nb, oh, ow) of output pixel rows offs_m = (nb·OH + oh)·OW + ow. Rows past M wrap
    onto valid ones (m_ld = offs_m mod M): their loads need no mask, and the store mask drops
    their results. nb is int64: batch times the image stride can pass 2**31. FLAT (every
    operand ``flat_pixels``): nb = oh = 0 and ow = m_ld, clamped to M - 1, which addresses the
    same elements through nb·s_n + oh·s_h + ow·s_w without the divisions (three per row, in
    each register layout that needs the rows: a sixth of a 1x1 int8 kernel's instructions)."""
    if FLAT:
        m_ld = tl.minimum(offs_m, M - 1)
        ow = m_ld
        oh = tl.zeros_like(m_ld)
        nb = tl.zeros_like(m_ld).to(tl.int64)
    else:
        m_ld = offs_m % M
        ow = m_ld % OW
        oh = (m_ld // OW) % OH
        nb = (m_ld // (OW * OH)).to(tl.int64)
    return m_ld, nb, oh, ow


# Activations with act(a * y) = a * act(y) for a > 0: a positive scale commutes with them.
_POSITIVELY_HOMOGENEOUS = tuple(activation_code(a) for a in (None, "relu", "leaky_relu", "prelu"))


def output_prescaled(quant: LayerQuant | None, acts: dict) -> bool:
    """Whether a layer folds its output's 1 / scale into its epilogue's constants (scale, bias,
    residual scale): it requantizes (an int8 output), and both of its activations commute with
    a positive scale. Then rint((acc s + b) inv) becomes rint(acc (s inv) + b inv): the same
    codes but where the two roundings of a product land on opposite sides of a half (at most
    one code apart, on a small fraction of elements, as an FMA contraction already allows)."""
    return (quant is not None and quant.output is not None
            and acts["ACT"] in _POSITIVELY_HOMOGENEOUS and acts["POST_ACT"] in _POSITIVELY_HOMOGENEOUS)


def prescale(scale: torch.Tensor, bias: torch.Tensor, quant: LayerQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias) times the output's 1 / scale (``output_prescaled``), rounded once to fp32."""
    inv = 1.0 / quant.output.scale
    return ((scale.to(torch.float64) * inv).to(torch.float32),
            (bias.to(torch.float64) * inv).to(torch.float32))


def quant_args(quant: LayerQuant | None, prescaled: bool = False) -> tuple[list[float], dict]:
    """(runtime scalars res_scale, out_inv_scale; constexprs QUANT, X_ZP, RES_QUANT, RES_ZP,
    OUT_QUANT, OUT_ZP, OUT_PRESCALED) of a layer's int8 contract; neutral values without one.
    ``prescaled``: the layer's scale and bias carry the output's 1 / scale (``prescale``), and
    so does res_scale here (a real residual's too)."""
    if quant is None:
        return [1.0, 1.0], {"QUANT": False, "X_ZP": 0, "RES_QUANT": False, "RES_ZP": 0,
                            "OUT_QUANT": False, "OUT_ZP": 0, "OUT_PRESCALED": False}
    res, out = quant.residual, quant.output
    res_scale, out_inv = 1.0 if res is None else res.scale, 1.0 if out is None else out.inv_scale
    if prescaled:
        res_scale, out_inv = float(torch.tensor(res_scale / out.scale, dtype=torch.float32)), 1.0
    return ([res_scale, out_inv],
            {"QUANT": True, "X_ZP": quant.input.zero_point, "RES_QUANT": res is not None,
             "RES_ZP": 0 if res is None else res.zero_point, "OUT_QUANT": out is not None,
             "OUT_ZP": 0 if out is None else out.zero_point, "OUT_PRESCALED": prescaled})


def saturation_implied(acts: dict, quant: LayerQuant | None, has_residual: bool) -> dict:
    """The activation constexprs a kernel needs before requantizing: with unsigned output codes
    (zero point -128) the lower saturation clamps at 0, so a ReLU applied last (POST_ACT, or ACT
    when no residual or post-activation follows it) is implied and dropped, exactly."""
    if quant is None or quant.output is None or quant.output.zero_point != -128:
        return acts
    relu, identity = activation_code("relu"), activation_code(None)
    if acts["POST_ACT"] == relu:
        return {**acts, "POST_ACT": identity}
    if acts["POST_ACT"] == identity and not has_residual and acts["ACT"] == relu:
        return {**acts, "ACT": identity}
    return acts


@triton.jit
def load_residual(res_ptr, r_lead, nb, oh, ow, co, s_rn, s_rc, s_rh, s_rw, VEC: tl.constexpr):
    """The residual tile [rows (nb, oh, ow), columns co]; unmasked: the caller wraps
    out-of-range rows and columns onto valid ones. Lead and pixel strides in units of VEC."""
    rows = (r_lead + nb * s_rn + oh * s_rh + ow * s_rw) * VEC
    return tl.load(res_ptr + rows[:, None] + (co * s_rc)[None, :])


@triton.jit
def conv_epilogue(acc, co, nb, oh, ow, bias_ptr, scale_ptr, res_ptr, slope_ptr, r_lead, s_rn, s_rc,
                  s_rh, s_rw, res_scale, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                  ACT_ALPHA: tl.constexpr, ACT_BETA: tl.constexpr, HAS_RES: tl.constexpr,
                  POST_ACT: tl.constexpr, POST_ACT_ALPHA: tl.constexpr,
                  POST_ACT_BETA: tl.constexpr, VEC: tl.constexpr, QUANT: tl.constexpr,
                  RES_QUANT: tl.constexpr, RES_ZP: tl.constexpr, res_tile, RES_LOADED: tl.constexpr,
                  OUT_PRESCALED: tl.constexpr):
    """(acc + bias[co]) -> act -> + residual[nb, co, oh, ow] -> post_act, all in fp32.
    co: [BLOCK_N] global output channels; nb (int64), oh, ow: [BLOCK_M] pixel coordinates,
    all in range (the caller wraps the tile's overhang), so nothing here needs a mask. The
    residual's lead and pixel strides are in units of VEC elements; RES_LOADED: the caller
    loaded it already (``res_tile``, from ``load_residual``). QUANT: acc is an int32 sum of
    codes, scaled by scale_ptr[co] first; RES_QUANT: the residual holds codes (res_scale,
    RES_ZP); OUT_PRESCALED: everything is in output code units, a real residual too (times
    res_scale)."""
    if QUANT:
        acc = acc.to(tl.float32) * tl.load(scale_ptr + co)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co).to(tl.float32)[None, :]
    acc = activate_channels(acc, co, slope_ptr, ACT, ACT_ALPHA, ACT_BETA)
    if HAS_RES:
        if RES_LOADED:
            res = res_tile
        else:
            res = load_residual(res_ptr, r_lead, nb, oh, ow, co, s_rn, s_rc, s_rh, s_rw, VEC)
        if RES_QUANT:
            acc += dequantize(res, res_scale, RES_ZP)
        elif OUT_PRESCALED:
            acc += res.to(tl.float32) * res_scale
        else:
            acc += res.to(tl.float32)
    return activate_channels(acc, co, slope_ptr, POST_ACT, POST_ACT_ALPHA, POST_ACT_BETA)


@triton.jit
def _segment_offsets(co, nb, oh, ow, seg_c, seg_o, sn, sc, sh, sw, VEC: tl.constexpr):
    """Element offsets from out_ptr of [rows, columns co] in the segment starting at channel
    seg_c (lead, pixel strides and seg_c in units of VEC)."""
    rows = (seg_o + nb * sn + oh * sh + ow * sw) * VEC
    return rows[:, None] + ((co - seg_c * VEC) * sc)[None, :]


@triton.jit
def store_segments(out_ptr, val, co, nb, oh, ow, mask, seg_c1, seg_c2, seg_c3, seg_o0,
                   seg_o1, seg_o2, seg_o3, s0n, s0c, s0h, s0w, s1n, s1c, s1h, s1w,
                   s2n, s2c, s2h, s2w, s3n, s3c, s3h, s3w, out_inv_scale, NUM_SEG: tl.constexpr,
                   VEC: tl.constexpr, OUT_QUANT: tl.constexpr, OUT_ZP: tl.constexpr,
                   OUT_PRESCALED: tl.constexpr):
    """One masked store of val[BLOCK_M, BLOCK_N]; column co goes to the segment holding it.
    Segments are consecutive channel ranges, so each later segment overrides from its start.
    Segment starts, offsets (seg_o0: outs[0]'s own lead) and pixel strides are in units of VEC.
    OUT_QUANT: val is requantized to int8 codes (out_inv_scale, OUT_ZP), one QParams for every
    segment; OUT_PRESCALED: val is in code units already and is only rounded."""
    off = _segment_offsets(co, nb, oh, ow, 0, seg_o0, s0n, s0c, s0h, s0w, VEC)
    if NUM_SEG > 1:
        off1 = _segment_offsets(co, nb, oh, ow, seg_c1, seg_o1, s1n, s1c, s1h, s1w, VEC)
        off = tl.where((co >= seg_c1 * VEC)[None, :], off1, off)
    if NUM_SEG > 2:
        off2 = _segment_offsets(co, nb, oh, ow, seg_c2, seg_o2, s2n, s2c, s2h, s2w, VEC)
        off = tl.where((co >= seg_c2 * VEC)[None, :], off2, off)
    if NUM_SEG > 3:
        off3 = _segment_offsets(co, nb, oh, ow, seg_c3, seg_o3, s3n, s3c, s3h, s3w, VEC)
        off = tl.where((co >= seg_c3 * VEC)[None, :], off3, off)
    if OUT_QUANT:
        if OUT_PRESCALED:
            val = round_to_codes(val, OUT_ZP)
        else:
            val = requantize(val, out_inv_scale, OUT_ZP)
    tl.store(out_ptr + off, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_k_reduce_kernel(
    # pointers: partial sums [SPLIT_K, M, C_out] (fp32; int32 with QUANT), fp32 bias, fp32
    # combined scale [C_out] (QUANT only), residual, outs[0], fp32 slope
    ws_ptr, bias_ptr, scale_ptr, res_ptr, out_ptr, slope_ptr,
    # sizes; C_out over all groups, in units of VEC; s_ws = M·C_out elements from one split's
    # partials to the next, in units of WS_VEC
    OH, OW, C_out, M, s_ws,
    # residual, output segments, int8 scalars: as in _conv2d_kernel (epilogue_args, quant_args)
    r_lead, s_rn, s_rc, s_rh, s_rw, seg_c1, seg_c2, seg_c3, seg_o0, seg_o1, seg_o2, seg_o3,
    s0n, s0c, s0h, s0w, s1n, s1c, s1h, s1w, s2n, s2c, s2h, s2w, s3n, s3c, s3h, s3w,
    res_scale, out_inv_scale,
    # epilogue
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ACT_ALPHA: tl.constexpr, ACT_BETA: tl.constexpr,
    HAS_RES: tl.constexpr, POST_ACT: tl.constexpr, POST_ACT_ALPHA: tl.constexpr,
    POST_ACT_BETA: tl.constexpr, NUM_SEG: tl.constexpr, VEC: tl.constexpr, WS_VEC: tl.constexpr,
    # int8 (quant_args; X_ZP unused here)
    QUANT: tl.constexpr, X_ZP: tl.constexpr, RES_QUANT: tl.constexpr, RES_ZP: tl.constexpr,
    OUT_QUANT: tl.constexpr, OUT_ZP: tl.constexpr, OUT_PRESCALED: tl.constexpr,
    # tiling
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Sum the SPLIT_K partials of a [BLOCK_M pixels, BLOCK_N channels] tile in a fixed order
    (deterministic, no atomics; exact in int32), then the conv's epilogue and its one store."""
    C_out = C_out * VEC
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < C_out)[None, :]
    m_ld, nb, oh, ow = output_pixels(offs_m, M, OH, OW)  # and overhanging columns wrap too
    co = offs_n % C_out
    ptrs = ws_ptr + (m_ld.to(tl.int64) * C_out)[:, None] + co[None, :]
    acc = tl.load(ptrs)
    for _ in tl.static_range(1, SPLIT_K):
        ptrs += s_ws * WS_VEC  # the next split's partials
        acc += tl.load(ptrs)
    acc = conv_epilogue(acc, co, nb, oh, ow, bias_ptr, scale_ptr, res_ptr, slope_ptr, r_lead, s_rn,
                        s_rc, s_rh, s_rw, res_scale, HAS_BIAS, ACT, ACT_ALPHA, ACT_BETA, HAS_RES,
                        POST_ACT, POST_ACT_ALPHA, POST_ACT_BETA, VEC, QUANT, RES_QUANT, RES_ZP, 0, False,
                        OUT_PRESCALED)
    store_segments(out_ptr, acc, co, nb, oh, ow, mask, seg_c1, seg_c2, seg_c3, seg_o0, seg_o1,
                   seg_o2, seg_o3, s0n, s0c, s0h, s0w, s1n, s1c, s1h, s1w, s2n, s2c, s2h, s2w,
                   s3n, s3c, s3h, s3w, out_inv_scale, NUM_SEG, VEC, OUT_QUANT, OUT_ZP, OUT_PRESCALED)


def reduce_split_k(ws, bias, out, residual, slope, oh, ow, c_out, m, scalars, vec, split,
                   num_seg, activations: dict, scale: torch.Tensor | None = None,
                   quant: LayerQuant | None = None, prescaled: bool = False) -> None:
    """Launch the split-K reduction of ``split`` partial sums in ``ws`` into the output views;
    ``out``, ``residual``, ``scalars`` and ``vec`` as ``epilogue_args`` gives them (c_out a
    multiple of vec), ``activations`` the ACT*/POST_ACT* constexprs (``act_constexprs``),
    ``slope`` PReLU's. int8: ``ws`` holds int32 sums, ``scale`` the combined scale [C_out] and
    ``quant`` the layer's contract (``quant_args``; ``prescaled`` as there)."""
    # Small tiles: split-K shapes have few outputs (49 x 512 for ResNet-50 layer4 at batch 1),
    # and a reduction of about a MB is quicker spread over many SMs (64 programs there).
    block_m, block_n = 16, min(32, max(16, triton.next_power_of_2(c_out)))
    grid = (triton.cdiv(m, block_m), triton.cdiv(c_out, block_n))
    ws_vec = vector_width(ws.element_size(), [m * c_out])
    q_scalars, q_constexprs = quant_args(quant, prescaled)
    launch(_split_k_reduce_kernel, grid,
        ws, bias, scale, residual, out, slope, oh, ow, c_out // vec, m, m * c_out // ws_vec,
        *scalars, *q_scalars,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, **activations, NUM_SEG=num_seg,
        VEC=vec, WS_VEC=ws_vec, **q_constexprs, SPLIT_K=split, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4,
    )
