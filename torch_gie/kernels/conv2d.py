"""Implicit-GEMM 2D convolution on strided (typically channels_last) views, fused epilogue.

Per group g the convolution is one GEMM  out[m, n] = sum_k A[m, k] * B[k, n]  with
    M = N·OH·OW   output pixels,     m = (n_img·OH + oh)·OW + ow
    N = C_out/groups                 output channels of the group
    K = KH·KW·C_in/groups            k = (kh·KW + kw)·C_in_g + c
    A[m, k] = x[n_img, g·C_in_g + c, oh·s_h - p_h + kh·d_h, ow·s_w - p_w + kw·d_w]  (0 outside)
    B[k, n] = weight[g·C_out_g + n, c, kh, kw]   (packed once as [C_out, KH, KW, C_in_g])
A is never materialized: each (kh, kw) step gathers its rows straight from x, so a 1x1, stride 1,
pad 0 conv on channels_last data is a plain GEMM over pixels. The epilogue runs on the fp32
accumulator: + bias, activation, + residual, post-activation, then one store, optionally split
along channels into up to four destination views of one buffer (so a concat costs nothing).
Split-K (for long-K layers whose few output tiles leave SMs idle, e.g. at batch 1): SPLIT_K
programs per tile sum contiguous shares of the K loop into an fp32 workspace, and a second
kernel adds the shares in a fixed order and runs that same epilogue.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from torch_gie.activations import activation_code
from torch_gie.kernels.epilogue import activate

IntPair = int | Sequence[int]
MAX_SEGMENTS = 4
# Names tl.dot accepts for fp32 operands on NVIDIA in Triton 3.x (keyword ``input_precision``).
FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")
_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
# Optional keys FLAT_K (default False): run (tap, channel block) as one loop; GATHER_K (default
# False): for convs with few input channels (a 7x7 stem on RGB), where per-tap channel blocks
# would be mostly padding: on dense NHWC input (and dilation_w 1) the KW*C_in_g values of one
# kernel row are contiguous in memory and are loaded as one run per kh ("fold kw into c");
# otherwise the flattened K is gathered element by element. SPLIT_K (default 1, a power of two):
# that many programs per output tile each sum a share of the K loop into an fp32 workspace,
# and a second kernel adds the shares and runs the epilogue.
GATHER_BELOW = 16  # C_in_g under this gathers K across taps
# Split-K pays only when the output tiles leave SMs idle (batch 1, late ResNet stages).
NUM_SMS = 132  # H100 SXM: the heuristic aims at about one program per SM
SPLIT_K_MIN_K = 1024  # shorter K loops gain too little from splitting to pay for the reduction
MAX_SPLIT_K = 16
MIN_SPLIT_ITERS = 4  # K iterations each split keeps, so its loads still pipeline


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, flat: bool, gather: bool = False,
         fold: bool = False) -> dict:
    cfg = {**dict(zip(_CONFIG_KEYS, (bm, bn, bk, warps, stages))), "FLAT_K": flat, "GATHER_K": gather}
    return {**cfg, "FOLD_KW": True} if fold else cfg


def _with_split(cfg: dict, split: int) -> dict:
    return {**cfg, "SPLIT_K": split} if split > 1 else cfg


def _unsplit_default(c_out_g: int, c_in_g: int, dtype: torch.dtype, taps: int) -> dict:
    fp16 = dtype == torch.float16
    if taps > 1 and c_in_g < GATHER_BELOW:
        bn = min(128, max(16, triton.next_power_of_2(c_out_g)))
        return _cfg(128, bn, 32, 4, 3 if fp16 else 2, False, True)
    bn = min(128, max(16, triton.next_power_of_2(c_out_g)))
    bk = min(64 if fp16 else 32, max(16, triton.next_power_of_2(c_in_g)))
    bm = 128 if fp16 else 64  # fp32 runs on FMA (ieee) or tf32 with twice the smem per tile
    warps = 8 if bm * bn >= 128 * 128 else 4
    stages = 4 if fp16 and bn * bk <= 64 * 64 else 3
    return _cfg(bm, bn, bk, warps, stages, taps > 1)


def _tiles(cfg: dict, m: int, c_out_g: int, groups: int) -> int:
    return triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(c_out_g, cfg["BLOCK_N"]) * groups


def _pick_split(tiles: int, k_iters: int) -> int:
    """Double the split while the grid is under one wave and every split keeps at least
    MIN_SPLIT_ITERS iterations of the K loop."""
    split = 1
    while split < MAX_SPLIT_K and tiles * split < NUM_SMS and k_iters >= 2 * split * MIN_SPLIT_ITERS:
        split *= 2
    return split


def _split_k_configs(base: dict, c_out_g: int, c_in_g: int, dtype: torch.dtype, taps: int,
                     m: int | None, groups: int) -> list[dict]:
    """Split-K tilings, best guess first, for a long-K conv whose output tiles under ``base``
    do not fill the GPU; [] otherwise. Tiles shrink to 64x64 or less (BLOCK_M to the pixel
    count), then K splits until about one program per SM. They keep ``base``'s K-loop form:
    FLAT_K for multi-tap convs (its (tap, channel block) loop splits evenly; the unrolled form
    would split only the few channel blocks of each tap)."""
    if m is None or taps * c_in_g < SPLIT_K_MIN_K or _tiles(base, m, c_out_g, groups) >= NUM_SMS:
        return []
    bm, bn, bk = min(64, max(16, triton.next_power_of_2(m))), min(64, base["BLOCK_N"]), base["BLOCK_K"]
    k_iters = triton.cdiv(taps * c_in_g, bk) if base["GATHER_K"] else taps * triton.cdiv(c_in_g, bk)
    stages = 4 if dtype == torch.float16 else 3
    plans = []  # (tiling, split), the widest tiles first
    for tbm, tbn in ((bm, bn), (bm, bn // 2), (bm // 2, bn)):
        if min(tbm, tbn) >= 16:
            tiling = _cfg(tbm, tbn, bk, 4, stages, base["FLAT_K"], base["GATHER_K"])
            plans.append((tiling, _pick_split(_tiles(tiling, m, c_out_g, groups), k_iters)))
    # The default: the widest tiles that reach 3/4 of a wave, else the most programs.
    programs = [_tiles(t, m, c_out_g, groups) * s for t, s in plans]
    full = [i for i, p in enumerate(programs) if 4 * p >= 3 * NUM_SMS]
    tiling, split = plans[full[0] if full else programs.index(max(programs))]
    if split == 1:
        return []  # the small tiles alone fill the GPU: leave them to the unsplit list
    cands = [_with_split(tiling, split), _with_split(tiling, split // 2)]
    if 2 * split <= MAX_SPLIT_K and k_iters >= 4 * split:
        cands.append(_with_split(tiling, 2 * split))
    cands += [_with_split(t, s) for t, s in plans]
    return [c for i, c in enumerate(cands) if "SPLIT_K" in c and c not in cands[:i]]


def default_conv2d_config(c_out_g: int, c_in_g: int, dtype: torch.dtype = torch.float16,
                          taps: int = 1, m: int | None = None, groups: int = 1) -> dict:
    """A sensible untuned tiling for H100 (taps = KH·KW): wide tiles narrowed to the channel
    counts. Multi-tap convs use the flat K loop: compiled for sm_90 it needs fewer registers
    than the unrolled one (164 vs 247 for 3x3 64->64 at 128x64x64) and never spilled in our
    checks, and its loads pipeline across taps even when C_in_g is a single BLOCK_K.
    Given m (output pixels N·OH·OW), a long-K conv with too few output tiles to fill the GPU
    gets a split-K tiling instead."""
    base = _unsplit_default(c_out_g, c_in_g, dtype, taps)
    split = _split_k_configs(base, c_out_g, c_in_g, dtype, taps, m, groups)
    return split[0] if split else base


def conv2d_configs(c_out_g: int, c_in_g: int, dtype: torch.dtype = torch.float16,
                   taps: int = 1, m: int | None = None, groups: int = 1) -> list[dict]:
    """Candidate tilings for the tuner: the default first, then larger and small-channel ones,
    with both K-loop forms for multi-tap convs. Given m, split-K candidates (if any) lead, with
    the unsplit default right after them (the tuner times only the first few)."""
    base = _unsplit_default(c_out_g, c_in_g, dtype, taps)
    cands = _split_k_configs(base, c_out_g, c_in_g, dtype, taps, m, groups) + [base]
    if taps > 1 and c_in_g < GATHER_BELOW:
        for bm, bn, bk, warps, stages, fold in ((128, 64, 32, 4, 3, True), (128, 64, 32, 4, 4, True),
                                                (128, 64, 64, 4, 3, False), (128, 128, 32, 8, 3, True),
                                                (64, 64, 32, 4, 3, False), (64, 64, 32, 4, 4, True)):
            cfg = _cfg(bm, min(bn, max(16, triton.next_power_of_2(c_out_g))), bk, warps, stages, False,
                       not fold, fold)
            if cfg not in cands:
                cands.append(cfg)
    bk_max = 64 if dtype == torch.float16 else 32  # fp32 tiles cost twice the shared memory
    for bm, bn, bk, warps, stages in (
        (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 8, 4),
        (64, 64, 32, 4, 4), (128, 32, 32, 4, 4), (64, 32, 32, 4, 3), (128, 16, 16, 4, 3),
        (64, 16, 16, 4, 3), (32, 16, 16, 2, 2),
    ):
        if bn > 2 * max(16, triton.next_power_of_2(c_out_g)):
            continue  # mostly-empty tiles: never faster
        for flat in (True, False) if taps > 1 and bn >= 64 else (taps > 1,):
            cfg = _cfg(bm, bn, min(bk, bk_max), warps, stages, flat)
            if cfg not in cands:
                cands.append(cfg)
    return cands


def check_config(config: dict, keys: Sequence[str] = _CONFIG_KEYS, min_block: int = 16) -> dict:
    """Validate a tiling dict (GPU limits the interpreter does not check) and return a copy."""
    missing = [k for k in keys if k not in config]
    if missing:
        raise ValueError(f"config is missing {missing}; expected keys {tuple(keys)}")
    for key in (k for k in keys if k.startswith("BLOCK_")):
        v = config[key]
        if v < min_block or v & (v - 1):
            raise ValueError(f"config {key} must be a power of two >= {min_block}, got {v}")
    split = config.get("SPLIT_K", 1)
    if not isinstance(split, int) or split < 1 or split & (split - 1):
        raise ValueError(f"config SPLIT_K must be a power of two >= 1, got {split!r}")
    return dict(config)


def pack_conv_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[C_out, C_in/g, KH, KW] -> contiguous [C_out, KH, KW, C_in/g]: k runs along channels, so a
    B tile reads contiguous memory in the same order as the channels_last A tile."""
    return weight.detach().permute(0, 2, 3, 1).to(dtype).contiguous()


def conv_output_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _pair(v: IntPair, name: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(isinstance(i, int) for i in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return pair


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


@triton.jit
def conv_epilogue(acc, co, nb, oh, ow, bias_ptr, res_ptr, s_rn, s_rc, s_rh, s_rw,
                  HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                  POST_ACT: tl.constexpr):
    """(acc + bias[co]) -> act -> + residual[nb, co, oh, ow] -> post_act, all in fp32.
    co: [BLOCK_N] global output channels; nb (int64), oh, ow: [BLOCK_M] pixel coordinates,
    all in range (the caller wraps the tile's overhang), so nothing here needs a mask."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co).to(tl.float32)[None, :]
    acc = activate(acc, ACT)
    if HAS_RES:
        # Unmasked: the caller wraps out-of-range rows and columns onto valid ones.
        r_off = (nb * s_rn + oh * s_rh + ow * s_rw)[:, None] + (co * s_rc)[None, :]
        acc += tl.load(res_ptr + r_off).to(tl.float32)
    return activate(acc, POST_ACT)


@triton.jit
def store_segments(out_ptr, val, co, nb, oh, ow, mask, seg_c1, seg_c2, seg_c3,
                   seg_o1, seg_o2, seg_o3, s0n, s0c, s0h, s0w, s1n, s1c, s1h, s1w,
                   s2n, s2c, s2h, s2w, s3n, s3c, s3h, s3w, NUM_SEG: tl.constexpr):
    """One masked store of val[BLOCK_M, BLOCK_N]; column co goes to the segment holding it.
    Segments are consecutive channel ranges, so each later segment overrides from its start."""
    off = (nb * s0n + oh * s0h + ow * s0w)[:, None] + (co * s0c)[None, :]
    if NUM_SEG > 1:
        off1 = seg_o1 + (nb * s1n + oh * s1h + ow * s1w)[:, None] + ((co - seg_c1) * s1c)[None, :]
        off = tl.where((co >= seg_c1)[None, :], off1, off)
    if NUM_SEG > 2:
        off2 = seg_o2 + (nb * s2n + oh * s2h + ow * s2w)[:, None] + ((co - seg_c2) * s2c)[None, :]
        off = tl.where((co >= seg_c2)[None, :], off2, off)
    if NUM_SEG > 3:
        off3 = seg_o3 + (nb * s3n + oh * s3h + ow * s3w)[:, None] + ((co - seg_c3) * s3c)[None, :]
        off = tl.where((co >= seg_c3)[None, :], off3, off)
    tl.store(out_ptr + off, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _inside(ih, iw, H, W, PAD_H: tl.constexpr, PAD_W: tl.constexpr, BLOCK_M: tl.constexpr):
    """Zero padding: which rows read inside the image. Without padding every tap is inside (OH,
    OW were checked against the conv formula), so the check vanishes at compile time."""
    inside = tl.full((BLOCK_M,), 1, tl.int1)
    if PAD_H > 0:
        inside = inside & (ih >= 0) & (ih < H)
    if PAD_W > 0:
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
def _accumulate(acc, a_rows, inside, b_cols, c, C_in_g, s_xc, EVEN_K: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """acc += A[rows, channels c] @ B[channels c, cols] for one tap; a_rows/b_cols point at the
    tap's channel 0 for each output pixel / output channel."""
    a_ptrs = a_rows[:, None] + (c * s_xc)[None, :]
    b_ptrs = b_cols[None, :] + c[:, None]
    if EVEN_K:
        a = tl.load(a_ptrs, mask=inside[:, None], other=0.0)
        b = tl.load(b_ptrs)
    else:
        a = tl.load(a_ptrs, mask=inside[:, None] & (c < C_in_g)[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=(c < C_in_g)[:, None], other=0.0)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _conv2d_kernel(
    # pointers: input, packed weight [C_out, KH, KW, C_in_g], fp32 bias, residual, outs[0],
    # fp32 split-K workspace [SPLIT_K, M, C_out] (SPLIT_K > 1 only)
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, ws_ptr,
    # sizes; channel counts are per group
    H, W, C_in_g, OH, OW, C_out_g, M,
    # strides in logical NCHW order: input, residual
    s_xn, s_xc, s_xh, s_xw, s_rn, s_rc, s_rh, s_rw,
    # output segments 1..3: first channel, element offset from out_ptr; then strides of 0..3
    seg_c1, seg_c2, seg_c3, seg_o1, seg_o2, seg_o3,
    s0n, s0c, s0h, s0w, s1n, s1c, s1h, s1w, s2n, s2c, s2h, s2w, s3n, s3c, s3h, s3w,
    # geometry: specializing on it fixes the tap loop bounds and drops needless border checks
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    # epilogue
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, POST_ACT: tl.constexpr,
    NUM_SEG: tl.constexpr,
    # tiling
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, FLAT_K: tl.constexpr, GATHER_K: tl.constexpr, FOLD_KW: tl.constexpr,
    PIX: tl.constexpr, C_IN_G: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
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
    mask_m, mask_n = offs_m < M, offs_n < C_out_g
    # Rows/columns past the end wrap onto valid ones: their loads need no mask, and the results
    # are discarded by the store mask.
    m_ld = offs_m % M
    ow = m_ld % OW
    oh = (m_ld // OW) % OH
    nb = (m_ld // (OW * OH)).to(tl.int64)  # int64: batch * image stride can pass 2**31
    co = g * C_out_g + offs_n % C_out_g
    x_rows = x_ptr + nb * s_xn + (g * C_in_g) * s_xc
    w_cols = w_ptr + co.to(tl.int64) * (KH * KW * C_in_g)
    offs_k = tl.arange(0, BLOCK_K)

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
        t_lo, t_hi = _split_range(KH * num_j, 1, SPLIT_K)
        for t in range(t_lo, t_hi):
            kh = t // num_j
            j = (t - kh * num_j) * BLOCK_K + offs_k
            ih = oh * STRIDE_H - PAD_H + kh * DIL_H
            iw = iw0[:, None] + (j // PIX)[None, :]
            a_mask = ((ih >= 0) & (ih < H))[:, None] & (j < KWC)[None, :] & (iw >= 0) & (iw < W)
            a = tl.load((x_rows + ih * s_xh + iw0 * PIX)[:, None] + j[None, :], mask=a_mask, other=0.0)
            if PIX != C_IN_G:  # padding lanes: whatever they hold must not reach the sum
                a = tl.where(((j % PIX) < C_IN_G)[None, :], a, 0.0)
            b = tl.load(w_fold[None, :] + (kh * KWC + j)[:, None], mask=(j < KWC)[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
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
            a_mask = (k < K_total)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_rows[:, None] + ih * s_xh + iw * s_xw + (c * s_xc)[None, :], mask=a_mask, other=0.0)
            b = tl.load(w_cols[None, :] + k[:, None], mask=(k < K_total)[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    elif FLAT_K:
        # One runtime loop over (tap, channel block): when C_in_g spans few BLOCK_Ks, this is
        # the only form whose loads the software pipeliner can overlap across taps.
        num_kc = tl.cdiv(C_in_g, BLOCK_K)
        t_lo, t_hi = _split_range(KH * KW * num_kc, 1, SPLIT_K)
        for t in range(t_lo, t_hi):
            tap = t // num_kc
            kh = tap // KW
            kw = tap - kh * KW
            ih = oh * STRIDE_H - PAD_H + kh * DIL_H
            iw = ow * STRIDE_W - PAD_W + kw * DIL_W
            inside = _inside(ih, iw, H, W, PAD_H, PAD_W, BLOCK_M)
            acc = _accumulate(acc, x_rows + ih * s_xh + iw * s_xw, inside, w_cols + tap * C_in_g,
                              (t - tap * num_kc) * BLOCK_K + offs_k, C_in_g, s_xc, EVEN_K,
                              DOT_PRECISION)
    else:
        # Taps unrolled, channel blocks in a runtime loop: rows, border mask and tap offsets
        # are computed once per tap; best when C_in_g spans several BLOCK_Ks. A split takes
        # a share of every tap's channel blocks.
        c_lo, c_hi = _split_range(C_in_g, BLOCK_K, SPLIT_K)
        for kh in tl.static_range(KH):
            ih = oh * STRIDE_H - PAD_H + kh * DIL_H
            for kw in tl.static_range(KW):
                iw = ow * STRIDE_W - PAD_W + kw * DIL_W
                inside = _inside(ih, iw, H, W, PAD_H, PAD_W, BLOCK_M)
                a_rows = x_rows + ih * s_xh + iw * s_xw
                b_cols = w_cols + (kh * KW + kw) * C_in_g
                for c0 in range(c_lo, c_hi, BLOCK_K):
                    acc = _accumulate(acc, a_rows, inside, b_cols, c0 + offs_k, C_in_g, s_xc,
                                      EVEN_K, DOT_PRECISION)

    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        # A partial sum, stored raw: the epilogue must see the whole sum (_split_k_reduce_kernel).
        C_out = C_out_g * tl.num_programs(1)
        rows = (tl.program_id(2) * M + offs_m).to(tl.int64) * C_out
        tl.store(ws_ptr + rows[:, None] + co[None, :], acc, mask=mask)
    else:
        acc = conv_epilogue(acc, co, nb, oh, ow, bias_ptr, res_ptr, s_rn, s_rc, s_rh, s_rw,
                            HAS_BIAS, ACT, HAS_RES, POST_ACT)
        store_segments(out_ptr, acc, co, nb, oh, ow, mask, seg_c1, seg_c2, seg_c3, seg_o1,
                       seg_o2, seg_o3, s0n, s0c, s0h, s0w, s1n, s1c, s1h, s1w, s2n, s2c, s2h,
                       s2w, s3n, s3c, s3h, s3w, NUM_SEG)


@triton.jit
def _split_k_reduce_kernel(
    # pointers: fp32 partial sums [SPLIT_K, M, C_out], fp32 bias, residual, outs[0]
    ws_ptr, bias_ptr, res_ptr, out_ptr,
    # sizes; C_out over all groups, s_ws = M·C_out elements from one split's partials to the next
    OH, OW, C_out, M, s_ws,
    # residual strides, output segments: as in _conv2d_kernel
    s_rn, s_rc, s_rh, s_rw, seg_c1, seg_c2, seg_c3, seg_o1, seg_o2, seg_o3,
    s0n, s0c, s0h, s0w, s1n, s1c, s1h, s1w, s2n, s2c, s2h, s2w, s3n, s3c, s3h, s3w,
    # epilogue
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, POST_ACT: tl.constexpr,
    NUM_SEG: tl.constexpr,
    # tiling
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Sum the SPLIT_K partials of a [BLOCK_M pixels, BLOCK_N channels] tile in a fixed order
    (deterministic, no atomics), then the conv's epilogue and its one store."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < C_out)[None, :]
    # As in the conv kernel, overhanging rows/columns wrap onto valid ones (no load masks).
    m_ld = offs_m % M
    ow = m_ld % OW
    oh = (m_ld // OW) % OH
    nb = (m_ld // (OW * OH)).to(tl.int64)
    co = offs_n % C_out
    ptrs = ws_ptr + (m_ld.to(tl.int64) * C_out)[:, None] + co[None, :]
    acc = tl.load(ptrs)
    for _ in tl.static_range(1, SPLIT_K):
        ptrs += s_ws
        acc += tl.load(ptrs)
    acc = conv_epilogue(acc, co, nb, oh, ow, bias_ptr, res_ptr, s_rn, s_rc, s_rh, s_rw,
                        HAS_BIAS, ACT, HAS_RES, POST_ACT)
    store_segments(out_ptr, acc, co, nb, oh, ow, mask, seg_c1, seg_c2, seg_c3, seg_o1, seg_o2,
                   seg_o3, s0n, s0c, s0h, s0w, s1n, s1c, s1h, s1w, s2n, s2c, s2h, s2w,
                   s3n, s3c, s3h, s3w, NUM_SEG)


class Conv2d:
    """A convolution bound at build time to its packed weights, geometry and fused epilogue.

    Calling it writes ``epilogue(conv(x))`` into ``outs``, a list of 1..4 views of one buffer
    splitting C_out in order. ``configs`` lists candidate tilings for the tuner, built for the
    real problem size when ``input_hw`` and ``batch`` are given (split-K ones for long-K convs
    with few output tiles); ``config`` is the one used (settable).

    A split-K config needs an fp32 workspace [SPLIT_K, N·OH·OW, C_out]. It is allocated on the
    layer's device by the first call that needs more than the layer holds, and kept for the
    layer's lifetime; later calls allocate nothing. So CUDA graph capture works after one
    warm-up call with the final config and input size, and must not be followed by a call
    needing a bigger workspace (a new, larger config or batch): that would replace the buffer
    the graph writes to.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1,
                 groups: int = 1, activation: str | None = None,
                 post_activation: str | None = None, dtype: torch.dtype = torch.float16,
                 config: dict | None = None, fp32_precision: str = "ieee",
                 input_hw: tuple[int, int] | None = None, batch: int | None = None) -> None:
        if weight.dim() != 4:
            raise ValueError(f"weight must be 4D [C_out, C_in/groups, KH, KW], "
                             f"got shape {tuple(weight.shape)}")
        if dtype not in (torch.float16, torch.float32):
            raise ValueError(f"dtype must be torch.float16 or torch.float32, got {dtype}")
        if fp32_precision not in FP32_PRECISIONS:
            raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, "
                             f"got {fp32_precision!r}")
        c_out, c_in_g, kh, kw = weight.shape
        if groups < 1 or c_out % groups:
            raise ValueError(f"groups={groups} must be >= 1 and divide C_out={c_out}")
        self.stride, self.padding = _pair(stride, "stride"), _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        if min(self.stride + self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f"need stride, dilation >= 1 and padding >= 0, got stride="
                             f"{self.stride}, padding={self.padding}, dilation={self.dilation}")
        self.groups, self.kernel_size = groups, (kh, kw)
        self.out_channels, self.in_channels = c_out, c_in_g * groups
        self.dtype, self.fp32_precision = dtype, fp32_precision
        # Output pixels the configs are built for. The _config prefix keeps it out of the
        # tuner's layer signature, which already holds the input shape: timing-cache keys stay
        # as they were.
        self._config_m = self._problem_pixels(input_hw, batch)
        self._workspace: torch.Tensor | None = None
        self.act, self.post_act = activation_code(activation), activation_code(post_activation)
        self._check_groups()
        if bias is not None and tuple(bias.shape) != (c_out,):
            raise ValueError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")
        # Bias stays fp32: it is added to the fp32 accumulator.
        self.bias = None if bias is None else bias.detach().to(weight.device, torch.float32).contiguous()
        self.weight = self._pack(weight)
        self.configs = self._candidate_configs()
        self.config = config if config is not None else self.configs[0]

    @property
    def config(self) -> dict:
        return self._config

    @config.setter
    def config(self, config: dict) -> None:
        self._config = check_config(config, self._config_keys, self._min_block)

    _config_keys = _CONFIG_KEYS
    _min_block = 16  # every tl.dot dimension must be >= 16

    # Hooks the depthwise variant overrides.
    def _check_groups(self) -> None:
        pass

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        return pack_conv_weight(weight, self.dtype)

    def _candidate_configs(self) -> list[dict]:
        return conv2d_configs(self.out_channels // self.groups, self.in_channels // self.groups,
                              self.dtype, self.kernel_size[0] * self.kernel_size[1],
                              self._config_m, self.groups)

    def _problem_pixels(self, input_hw: IntPair | None, batch: int | None) -> int | None:
        """N·OH·OW for the input size given at build time, or None when it is not given."""
        if input_hw is None and batch is None:
            return None
        if input_hw is None or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"input_hw and batch >= 1 go together, got input_hw={input_hw!r}, "
                             f"batch={batch!r}")
        oh, ow = self.output_hw(*_pair(input_hw, "input_hw"))
        if min(oh, ow) < 1:
            raise ValueError(f"input_hw={input_hw!r} is too small for this convolution")
        return batch * oh * ow

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        """(OH, OW) of this convolution for an (H, W) input."""
        return tuple(conv_output_size(*a) for a in zip(
            (h, w), self.kernel_size, self.stride, self.padding, self.dilation))

    def __call__(self, x: torch.Tensor, outs: torch.Tensor | Sequence[torch.Tensor],
                 residual: torch.Tensor | None = None) -> None:
        outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be 4D (N, {self.in_channels}, H, W), "
                             f"got shape {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise ValueError(f"x dtype: expected {self.dtype}, got {x.dtype}")
        if x.device != self.weight.device:
            raise ValueError(f"x is on {x.device}, weights on {self.weight.device}")
        num_seg, seg = segment_args(outs, self.out_channels)
        if outs[0].dtype != self.dtype or outs[0].device != x.device:
            raise ValueError(f"outs: expected {self.dtype} on {x.device}, "
                             f"got {outs[0].dtype} on {outs[0].device}")
        n, _, h, w = x.shape
        oh, ow = self.output_hw(h, w)
        for i, t in enumerate(outs):
            if (t.shape[0], t.shape[2], t.shape[3]) != (n, oh, ow):
                raise ValueError(f"outs[{i}] has shape {tuple(t.shape)}, expected "
                                 f"(N, C, OH, OW) = ({n}, C, {oh}, {ow}) for x {tuple(x.shape)}")
        res_strides = [0, 0, 0, 0]
        if residual is not None:
            if num_seg != 1:
                raise ValueError(f"a residual needs a single output view, got {num_seg}")
            if tuple(residual.shape) != (n, self.out_channels, oh, ow):
                raise ValueError(f"residual shape: expected {(n, self.out_channels, oh, ow)}, "
                                 f"got {tuple(residual.shape)}")
            if residual.dtype != self.dtype or residual.device != x.device:
                raise ValueError(f"residual: expected {self.dtype} on {x.device}, "
                                 f"got {residual.dtype} on {residual.device}")
            res_strides = list(residual.stride())
        if n * oh * ow == 0:
            return
        self._launch(x, outs[0], residual, res_strides, num_seg, seg, oh, ow)

    def _launch(self, x, out, residual, res_strides, num_seg, seg, oh, ow) -> None:
        n, _, h, w = x.shape
        c_in_g, c_out_g = self.in_channels // self.groups, self.out_channels // self.groups
        cfg, m = self._config, n * oh * ow
        split = cfg.get("SPLIT_K", 1)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(c_out_g, cfg["BLOCK_N"]),
                self.groups, split)
        # The precision only matters for fp32 operands; "tf32" is Triton's own default, so fp16
        # compiles exactly as if none were given.
        precision = self.fp32_precision if self.dtype == torch.float32 else "tf32"
        # Folding kw into channels needs NHWC input with a small pixel stride (dense, or channels
        # padded up to 8), one group and dilation_w == 1; otherwise a fold config gathers.
        pix = x.stride(3)
        fold = cfg.get("FOLD_KW", False) and self.groups == 1 and self.dilation[1] == 1 \
            and x.stride(1) == 1 and self.in_channels <= pix <= max(8, self.in_channels)
        gather = cfg.get("GATHER_K", False) or cfg.get("FOLD_KW", False)
        epilogue = {"HAS_BIAS": self.bias is not None, "ACT": self.act,
                    "HAS_RES": residual is not None, "POST_ACT": self.post_act, "NUM_SEG": num_seg}
        bias, res, ws = self.bias, residual, None
        if split > 1:
            # The epilogue moves to the reduction: one partial kernel serves every epilogue.
            ws = self._split_k_workspace(split * m * self.out_channels, x.device)
            bias, res = None, None
            epilogue = {"HAS_BIAS": False, "ACT": 0, "HAS_RES": False, "POST_ACT": 0, "NUM_SEG": 1}
        _conv2d_kernel[grid](
            x, self._fold_weight(pix) if fold else self.weight, bias, res, out, ws,
            h, w, c_in_g, oh, ow, c_out_g, m,
            *x.stride(), *res_strides, *seg,
            KH=self.kernel_size[0], KW=self.kernel_size[1],
            STRIDE_H=self.stride[0], STRIDE_W=self.stride[1],
            PAD_H=self.padding[0], PAD_W=self.padding[1],
            DIL_H=self.dilation[0], DIL_W=self.dilation[1], **epilogue,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=8,
            EVEN_K=c_in_g % cfg["BLOCK_K"] == 0, FLAT_K=cfg.get("FLAT_K", False),
            GATHER_K=gather and not fold, FOLD_KW=fold, PIX=pix if fold else 1,
            C_IN_G=c_in_g if fold else 1, SPLIT_K=split, DOT_PRECISION=precision,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        if split > 1:
            self._reduce_split_k(ws, residual, out, res_strides, seg, m, oh, ow, split, num_seg)

    def _fold_weight(self, pix: int) -> torch.Tensor:
        """The packed weight with its channels padded to the input's pixel stride (zeros), made
        once per stride on the first call (before any CUDA graph capture)."""
        if pix == self.in_channels:
            return self.weight
        cache = self.__dict__.setdefault("_fold_weights", {})
        if pix not in cache:
            c_out, kh, kw, c_in = self.weight.shape
            padded = self.weight.new_zeros((c_out, kh, kw, pix))
            padded[..., :c_in] = self.weight
            cache[pix] = padded
        return cache[pix]

    def _reduce_split_k(self, ws, residual, out, res_strides, seg, m, oh, ow, split,
                        num_seg) -> None:
        # Small tiles: split-K shapes have few outputs (49 x 512 for ResNet-50 layer4 at batch
        # 1), and a reduction of about a MB is quicker spread over many SMs (64 programs there).
        c_out = self.out_channels
        block_m, block_n = 16, min(32, max(16, triton.next_power_of_2(c_out)))
        grid = (triton.cdiv(m, block_m), triton.cdiv(c_out, block_n))
        _split_k_reduce_kernel[grid](
            ws, self.bias, residual, out, oh, ow, c_out, m, m * c_out, *res_strides, *seg,
            HAS_BIAS=self.bias is not None, ACT=self.act, HAS_RES=residual is not None,
            POST_ACT=self.post_act, NUM_SEG=num_seg,
            SPLIT_K=split, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
        )

    def _split_k_workspace(self, numel: int, device: torch.device) -> torch.Tensor:
        """The layer's fp32 split-K workspace, replaced only when too small (see the class
        docstring: never during CUDA graph capture once a warm-up call has sized it)."""
        ws = self._workspace
        if ws is None or ws.numel() < numel or ws.device != device:
            ws = self._workspace = torch.empty(numel, dtype=torch.float32, device=device)
        return ws


def allocate_output(x: torch.Tensor, layer: Conv2d) -> torch.Tensor:
    """A channels_last output of the conv's full shape (for the convenience functions)."""
    n, _, h, w = x.shape
    return torch.empty((n, layer.out_channels, *layer.output_hw(h, w)), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1,
           activation: str | None = None, residual: torch.Tensor | None = None,
           post_activation: str | None = None, out: torch.Tensor | None = None,
           config: dict | None = None) -> torch.Tensor:
    """One-shot ``post_act(act(conv2d(x, weight) + bias) + residual)``; packs weights per call,
    so compiled models use :class:`Conv2d` instead."""
    layer = Conv2d(weight, bias, stride=stride, padding=padding, dilation=dilation,
                   groups=groups, activation=activation, post_activation=post_activation,
                   dtype=x.dtype, config=config)
    out = allocate_output(x, layer) if out is None else out
    layer(x, [out], residual)
    return out
