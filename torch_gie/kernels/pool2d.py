"""2D max / average / adaptive pooling on NCHW-shaped strided views (channels_last).

Windowed pooling: output ``(n, c, oh, ow)`` reduces the taps ``ih = oh*SH - PT + kh*DH``
(kh < KH), likewise for w, with four-sided padding (top PT, bottom PB, left PL, right PR). Max
ignores taps in the padding (as -inf), average divides by PyTorch's count; with ``pad_is_zeros``
(a folded explicit zero pad) the padding is real zeros: max sees 0, average counts them. Adaptive
pooling reduces ``[floor(oh*H/OH), ceil((oh+1)*H/OH))``. Programs tile (output pixels x channels),
channels contiguous.

A 1x1 adaptive output (classifier heads, squeeze-and-excitation) is a global pool: see
``global_pool``.

int8 (``dtype=torch.int8, quant=LayerQuant``): a max of codes is exact (padding reads -128, which
never wins; folded zero padding reads the zero point) and keeps the input's QParams, or is
dequantized; an average sums codes less the zero point (padding: real 0), scales by s_x / count
and requantizes to the output's QParams or stores fp16/fp32. A windowed int8 max whose channel
rows are whole 4-byte words (channels, strides and addresses multiples of 4) runs
``_max_pool_words_kernel``: it moves and compares four codes per 32-bit word (max pools are
issue-bound, not memory-bound: compiled for sm_90, loading codes one by one cost 39.5
instructions per output element of a 3x3 window, more than fp16's 29).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
import triton
import triton.language as tl

from torch_gie.kernels.global_pool import GlobalPool2d, check_pool_io, check_quant, sm_count
from torch_gie.kernels.quant import (
    dequantize,
    load_codes,
    max_code_pairs,
    merge_code_words,
    packed_max_supported,
    requantize,
    split_code_words,
)
from torch_gie.quantize.arith import LayerQuant

IntPair = int | tuple[int, int]
Padding = int | Sequence[int]  # int, (h, w), or (top, bottom, left, right)

_MAX, _AVG, _ADAPTIVE_AVG, _ADAPTIVE_MAX = 0, 1, 2, 3  # windowed kernel modes


def _tile(channels: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): up to 64 contiguous channels, about 2048 elements per tile."""
    block_c = min(64, triton.next_power_of_2(channels))
    return 2048 // block_c, block_c


@triton.jit
def _pool2d_kernel(
    # pointers
    x_ptr, out_ptr,
    # sizes; P = N * OH * OW output pixels
    P, C, H, W, OH, OW,
    # strides of the logical NCHW views
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    # int8: x's scale, the output's 1 / scale
    x_scale, out_inv_scale,
    # meta-parameters: window extent (adaptive: the largest window), stride, padding (top,
    # bottom, left, right), dilation
    MODE: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PT: tl.constexpr, PB: tl.constexpr, PL: tl.constexpr, PR: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    COUNT_INCLUDE_PAD: tl.constexpr, DIVISOR: tl.constexpr,  # DIVISOR 0: no divisor_override
    PAD_IS_ZEROS: tl.constexpr,  # the padding holds real zeros (max reads 0 there)
    IS_MAX: tl.constexpr,  # MODE is 0 or 3
    # int8: x holds codes (zero point X_ZP); out codes (OUT_ZP; a max: x's own QParams)
    X_QUANT: tl.constexpr, X_ZP: tl.constexpr, OUT_QUANT: tl.constexpr, OUT_ZP: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < P
    c_ok = c < C
    ow = p % OW
    oh = (p // OW) % OH
    n = p // (OW * OH)
    if MODE >= 2:  # adaptive: taps from h0 up to (not including) h_hi
        h0 = (oh * H) // OH
        w0 = (ow * W) // OW
        h_hi = ((oh + 1) * H + OH - 1) // OH
        w_hi = ((ow + 1) * W + OW - 1) // OW
    else:
        h0 = oh * SH - PT
        w0 = ow * SW - PL
        h_hi = H
        w_hi = W

    x_pix = x_ptr + n.to(tl.int64) * sxn
    x_chan = c[None, :] * sxc
    # A max is exact in the input's own type: codes compare as int32 and fp16 as fp16, with no
    # conversion per tap (compiled for sm_90, the int8 3x3 max took 52 instructions per output
    # element through fp32, more than fp16's 45).
    if IS_MAX and X_QUANT:
        acc = tl.full([BLOCK_P, BLOCK_C], -128, tl.int32)
    elif IS_MAX:
        acc = tl.full([BLOCK_P, BLOCK_C], float("-inf"), x_ptr.dtype.element_ty)
    else:
        acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for kh in tl.static_range(KH):
        ih = h0 + kh * DH
        h_ok = p_ok & (ih >= 0) & (ih < h_hi)
        for kw in tl.static_range(KW):
            iw = w0 + kw * DW
            ok = h_ok & (iw >= 0) & (iw < w_hi)
            ptrs = x_pix[:, None] + (ih * sxh + iw * sxw)[:, None] + x_chan
            mask = ok[:, None] & c_ok[None, :]
            if IS_MAX:
                if X_QUANT:  # codes: -128 is the least code, so padding never wins
                    v = load_codes(ptrs, mask, -128).to(tl.int32)
                else:
                    v = tl.load(ptrs, mask=mask, other=float("-inf"))
                if PAD_IS_ZEROS:  # taps in the zero padding read 0; past it (ceil_mode) nothing
                    in_pad = (ih < H + PB) & (iw < W + PR) & ~ok
                    v = tl.where(in_pad[:, None], X_ZP, v)  # real 0 (int8: the zero point)
                acc = tl.maximum(acc, v)
            elif X_QUANT:  # codes less the zero point: exact integers; padding reads real 0
                acc += load_codes(ptrs, mask, X_ZP).to(tl.float32) - X_ZP
            else:
                acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)

    if X_QUANT and not IS_MAX:
        acc = acc * x_scale
    if MODE == 1:
        if DIVISOR != 0:
            acc = acc / DIVISOR
        else:
            acc = acc / _avg_count(h0, w0, H, W, KH, KW, PB, PR, COUNT_INCLUDE_PAD)[:, None]
    elif MODE == 2:
        acc = acc / ((h_hi - h0) * (w_hi - w0)).to(tl.float32)[:, None]
    out_ptrs = (out_ptr + n.to(tl.int64)[:, None] * son + (oh * soh + ow * sow)[:, None]
                + c[None, :] * soc)
    out_mask = p_ok[:, None] & c_ok[None, :]
    if X_QUANT and IS_MAX:  # acc holds codes
        if OUT_QUANT:
            tl.store(out_ptrs, acc.to(tl.int8), mask=out_mask)
        else:
            tl.store(out_ptrs, dequantize(acc, x_scale, X_ZP).to(out_ptr.dtype.element_ty),
                     mask=out_mask)
    elif OUT_QUANT:
        tl.store(out_ptrs, requantize(acc, out_inv_scale, OUT_ZP), mask=out_mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


MIN_WORD = tl.constexpr(-0x7F7F7F80)  # 0x80808080: four codes of -128, which never win a max


@triton.jit
def _max_pool_words_kernel(
    # int8 pointers, read and written as int32 words of four channels
    x_ptr, out_ptr,
    # sizes (CW: channels / 4 / WVEC); P = N * OH * OW output pixels
    P, CW, H, W, OH, OW,
    # pixel strides of the logical NCHW views, in units of WVEC words (channel stride: 1 byte)
    sxn, sxh, sxw, son, soh, sow,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PT: tl.constexpr, PB: tl.constexpr, PL: tl.constexpr, PR: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    PAD_IS_ZEROS: tl.constexpr, ZP_WORD: tl.constexpr,  # the zero point in all four bytes
    ASM: tl.constexpr,  # the code-word helpers' packed compare (quant.py)
    WVEC: tl.constexpr,  # words per vector the strides are multiples of (4: 16-byte loads)
    BLOCK_P: tl.constexpr, BLOCK_W: tl.constexpr,
):
    CW = CW * WVEC  # passed in vectors, so the compiler sees rows of whole vectors
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cw = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    p_ok = p < P
    cw_ok = cw < CW
    ow = p % OW
    oh = (p // OW) % OH
    n = p // (OW * OH)
    h0 = oh * SH - PT
    w0 = ow * SW - PL
    xw = x_ptr.to(tl.pointer_type(tl.int32))
    x_pix = xw + n.to(tl.int64) * (sxn * WVEC)
    even, odd = split_code_words(tl.full([BLOCK_P, BLOCK_W], MIN_WORD, tl.int32), ASM)
    for kh in tl.static_range(KH):
        ih = h0 + kh * DH
        h_ok = p_ok & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = w0 + kw * DW
            ok = h_ok & (iw >= 0) & (iw < W)
            ptrs = x_pix[:, None] + ((ih * sxh + iw * sxw) * WVEC)[:, None] + cw[None, :]
            v = tl.load(ptrs, mask=ok[:, None] & cw_ok[None, :], other=MIN_WORD)
            if PAD_IS_ZEROS:  # taps in the zero padding read 0; past it (ceil_mode) nothing
                in_pad = (ih < H + PB) & (iw < W + PR) & ~ok
                v = tl.where(in_pad[:, None], ZP_WORD, v)
            v_even, v_odd = split_code_words(v, ASM)
            even = max_code_pairs(even, v_even, ASM)
            odd = max_code_pairs(odd, v_odd, ASM)
    acc = merge_code_words(even, odd, ASM)
    out_ptrs = (out_ptr.to(tl.pointer_type(tl.int32)) + n.to(tl.int64)[:, None] * (son * WVEC)
                + ((oh * soh + ow * sow) * WVEC)[:, None] + cw[None, :])
    tl.store(out_ptrs, acc, mask=p_ok[:, None] & cw_ok[None, :])


@triton.jit
def _avg_count(h0, w0, H, W, KH: tl.constexpr, KW: tl.constexpr, PB: tl.constexpr,
               PR: tl.constexpr, COUNT_INCLUDE_PAD: tl.constexpr):
    # PyTorch's divisor: the window clipped to the padded input (ceil_mode windows can overhang),
    # then, without count_include_pad, clipped again to the input itself. Windows start at or
    # after the top/left padding, so only their far ends need clipping to it.
    h1 = tl.minimum(h0 + KH, H + PB)
    w1 = tl.minimum(w0 + KW, W + PR)
    if not COUNT_INCLUDE_PAD:
        h1 = tl.minimum(h1, H)
        w1 = tl.minimum(w1, W)
        h0 = tl.maximum(h0, 0)
        w0 = tl.maximum(w0, 0)
    return ((h1 - h0) * (w1 - w0)).to(tl.float32)


def _pad4(padding: Padding) -> tuple[int, int, int, int]:
    pads = (padding,) * 4 if isinstance(padding, int) else tuple(padding)
    if len(pads) == 2:
        pads = (pads[0], pads[0], pads[1], pads[1])
    if len(pads) != 4 or not all(isinstance(p, int) and p >= 0 for p in pads):
        raise ValueError(f"padding must be an int >= 0, a pair (h, w) or (top, bottom, left, right) "
                         f"of them, got {padding!r}")
    return pads


def _pair(v: IntPair, name: str, minimum: int) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(isinstance(i, int) and i >= minimum for i in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {v!r}")
    return pair


def _quant_meta(quant: LayerQuant | None) -> dict:
    if quant is None:
        return dict(x_scale=1.0, out_inv_scale=1.0, X_QUANT=False, X_ZP=0, OUT_QUANT=False,
                    OUT_ZP=0)
    out = quant.output
    return dict(x_scale=quant.input.scale, out_inv_scale=1.0 if out is None else out.inv_scale,
                X_QUANT=True, X_ZP=quant.input.zero_point, OUT_QUANT=out is not None,
                OUT_ZP=0 if out is None else out.zero_point)


def _word_vec(*tensors: torch.Tensor) -> int:
    """Words per vector (4, 2 or 1) that every tensor's address, channel count and pixel strides
    are multiples of, or 0 when their channel rows are not whole 4-byte words (channels dense,
    C % 4 == 0)."""
    vec = 4
    for t in tensors:
        if t.stride(1) != 1 or t.shape[1] % 4:
            return 0
        for v in (t.data_ptr(), t.shape[1], *(t.stride(d) for d in (0, 2, 3))):
            while vec and v % (4 * vec):
                vec //= 2
            if not vec:
                return 0
    return vec


# Words per program: at most MAX_TILE_WORDS (16 per thread of 4 warps: measured at batch 128,
# NOTES 50), fewer where that would leave fewer than PROGRAMS_PER_SM programs per SM (a small
# map at batch 1 is latency-bound: its time is one program's chain of loads), at least
# MIN_TILE_WORDS (two per thread).
MAX_TILE_WORDS, MIN_TILE_WORDS, PROGRAMS_PER_SM = 2048, 256, 4


def _word_tile(p: int, cw: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_W) for ``p`` output pixels of ``cw`` words."""
    block_w = min(32, triton.next_power_of_2(cw))
    share = triton.next_power_of_2(triton.cdiv(p * cw, PROGRAMS_PER_SM * sm_count(device)))
    words = max(MIN_TILE_WORDS, min(MAX_TILE_WORDS, share))
    return max(1, words // block_w), block_w


def _launch_max_words(x: torch.Tensor, out: torch.Tensor, quant: LayerQuant, vec: int,
                      meta: dict) -> None:
    n, c, h, w = x.shape
    oh, ow = out.shape[2:]
    p, cw = n * oh * ow, c // 4  # words per pixel
    block_p, block_w = _word_tile(p, cw, x.device)
    zp = quant.input.zero_point & 0xFF
    zp_word = zp * 0x01010101 - (1 << 32 if zp & 0x80 else 0)
    grid = (triton.cdiv(p, block_p), triton.cdiv(cw, block_w))
    strides = [t.stride(d) // (4 * vec) for t in (x, out) for d in (0, 2, 3)]
    _max_pool_words_kernel[grid](
        x, out, p, cw // vec, h, w, oh, ow, *strides, **{k: meta[k] for k in _WINDOW_KEYS},
        PAD_IS_ZEROS=meta["PAD_IS_ZEROS"], ZP_WORD=zp_word, ASM=packed_max_supported(x.device),
        WVEC=vec, BLOCK_P=block_p, BLOCK_W=block_w, num_warps=4)


_WINDOW_KEYS = ("KH", "KW", "SH", "SW", "PT", "PB", "PL", "PR", "DH", "DW")


def _launch_windowed(x: torch.Tensor, out: torch.Tensor, quant: LayerQuant | None, **meta) -> None:
    n, c, h, w = x.shape
    oh, ow = out.shape[2:]
    p = n * oh * ow
    if p == 0 or c == 0:
        return
    if meta["MODE"] == _MAX and quant is not None and quant.output is not None:
        vec = _word_vec(x, out)
        if vec:
            _launch_max_words(x, out, quant, vec, meta)
            return
    block_p, block_c = _tile(c)
    grid = (triton.cdiv(p, block_p), triton.cdiv(c, block_c))
    _pool2d_kernel[grid](x, out, p, c, h, w, oh, ow, *x.stride(), *out.stride(),
                         BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4, **_quant_meta(quant),
                         **meta)


def pooled_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int,
                dilation: int, ceil_mode: bool, pad_is_zeros: bool = False) -> int:
    """PyTorch's pooling output size, including the ceil_mode rule that the last window must
    start inside the input or its leading padding. With ``pad_is_zeros`` the padding is part of
    the input (pooling ``F.pad(x)`` with no padding of its own)."""
    if pad_is_zeros:
        size, pad_before, pad_after = size + pad_before + pad_after, 0, 0
    span = size + pad_before + pad_after - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad_before:
        out -= 1
    return out


class Pool2d:
    """Max or average pooling bound at compile time; ``layer(x, out)`` writes out per forward.

    ``padding``: int, (h, w) or (top, bottom, left, right). ``pad_is_zeros``: the padding was
    folded from an explicit zero pad, so it holds real zeros: the layer computes
    ``pool(F.pad(x, pads), padding=0)`` (max sees the zeros; average counts them, so
    ``count_include_pad`` does not matter) and the padding may exceed half the window.

    int8: ``dtype=torch.int8, quant=LayerQuant(...)``: x holds codes of ``quant.input``; out codes
    of ``quant.output`` (a max: must equal ``quant.input``), or real values in
    ``quant.out_dtype`` when that is None."""

    def __init__(
        self,
        kind: str,
        kernel_size: IntPair,
        stride: IntPair | None = None,
        padding: Padding = 0,
        dilation: IntPair = 1,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
        pad_is_zeros: bool = False,
        *,
        dtype: torch.dtype | None = None,
        quant: LayerQuant | None = None,
    ) -> None:
        if kind not in ("max", "avg"):
            raise ValueError(f"kind must be 'max' or 'avg', got {kind!r}")
        check_quant(kind, dtype, quant)
        self.quant = quant
        self.kind = kind
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = self.kernel_size if stride is None else _pair(stride, "stride", 1)
        self.padding = _pad4(padding)
        self.dilation = _pair(dilation, "dilation", 1)
        kh, kw = self.kernel_size
        if not pad_is_zeros and any(p > k // 2 for p, k in zip(self.padding, (kh, kh, kw, kw))):
            raise ValueError(f"padding (top, bottom, left, right) {self.padding} must be at most "
                             f"half of kernel_size {self.kernel_size} (or pad_is_zeros=True)")
        if kind == "avg" and self.dilation != (1, 1):
            raise ValueError(f"average pooling has no dilation (as in PyTorch), "
                             f"got {self.dilation}")
        if divisor_override is not None and (kind == "max" or divisor_override == 0):
            raise ValueError(f"divisor_override must be a nonzero int for average pooling, got "
                             f"{divisor_override!r} for {kind} pooling")
        self.ceil_mode = ceil_mode
        self.count_include_pad = count_include_pad
        self.divisor_override = divisor_override
        self.pad_is_zeros = pad_is_zeros

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """(OH, OW) for an (h, w) input, by PyTorch's formula."""
        t, b, left, r = self.padding
        dims = zip((h, w), self.kernel_size, self.stride, (t, left), (b, r), self.dilation)
        return tuple(pooled_size(*dim, self.ceil_mode, self.pad_is_zeros) for dim in dims)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        check_pool_io(x, out, quant=self.quant)
        expected = self.output_size(*x.shape[2:])
        if tuple(out.shape[2:]) != expected or min(expected) < 1:
            raise ValueError(f"{self.kind} pool {self.kernel_size}, stride {self.stride}, padding "
                             f"{self.padding} of a {tuple(x.shape[2:])} input gives {expected}; "
                             f"out has {tuple(out.shape[2:])}")
        (kh, kw), (sh, sw), (pt, pb, pl, pr), (dh, dw) = (self.kernel_size, self.stride,
                                                          self.padding, self.dilation)
        _launch_windowed(x, out, self.quant, MODE=_MAX if self.kind == "max" else _AVG,
                         IS_MAX=self.kind == "max",
                         KH=kh, KW=kw, SH=sh, SW=sw, PT=pt, PB=pb, PL=pl, PR=pr, DH=dh, DW=dw,
                         COUNT_INCLUDE_PAD=self.count_include_pad or self.pad_is_zeros,
                         DIVISOR=self.divisor_override or 0, PAD_IS_ZEROS=self.pad_is_zeros)


@cache
def _largest_window(size: int, out_size: int) -> int:
    return max(-(-(i + 1) * size // out_size) - i * size // out_size for i in range(out_size))


class AdaptivePool2d:
    """Adaptive max or average pooling to out's spatial size; ``output_size``, if given, is
    checked too. A 1x1 output (out may then also be (N, C)) is a ``GlobalPool2d``. int8:
    ``dtype=torch.int8, quant=LayerQuant(...)`` as ``Pool2d``."""

    def __init__(self, kind: str, output_size: int | tuple[int | None, int | None] | None = None,
                 *, dtype: torch.dtype | None = None, quant: LayerQuant | None = None) -> None:
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.kind = kind
        self.output_size = output_size
        self.quant = quant
        self._global = GlobalPool2d(kind, dtype=dtype, quant=quant)  # checks kind and quant
        self._is_global = False

    @property
    def launches(self) -> int:
        """Kernels the last call launched (a split global pool: 2)."""
        return self._global.launches if self._is_global else 1

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        check_pool_io(x, out, (2, 4), self.quant)
        n, c, h, w = x.shape
        oh, ow = out.shape[2:] if out.dim() == 4 else (1, 1)
        if self.output_size is not None:
            # None in output_size keeps that input dim, as in PyTorch.
            expected = tuple(s if e is None else e
                             for e, s in zip(self.output_size, (h, w), strict=True))
            if (oh, ow) != expected:
                raise ValueError(f"out spatial size must be {expected}, got {(oh, ow)}")
        if min(h, w, oh, ow) < 1:
            raise ValueError(f"adaptive pooling needs nonempty input and output, "
                             f"got {(h, w)} -> {(oh, ow)}")
        self._is_global = (oh, ow) == (1, 1)
        if self._is_global:
            self._global(x, out)
            return
        # KH, KW bound the largest window; shorter windows mask their extra taps.
        _launch_windowed(x, out, self.quant,
                         MODE=_ADAPTIVE_MAX if self.kind == "max" else _ADAPTIVE_AVG,
                         IS_MAX=self.kind == "max",
                         KH=_largest_window(h, oh), KW=_largest_window(w, ow),
                         SH=1, SW=1, PT=0, PB=0, PL=0, PR=0, DH=1, DW=1,
                         COUNT_INCLUDE_PAD=True, DIVISOR=0, PAD_IS_ZEROS=False)


class AdaptiveAvgPool2d(AdaptivePool2d):
    """``AdaptivePool2d("avg", output_size)``."""

    def __init__(self, output_size: int | tuple[int | None, int | None] | None = None, *,
                 dtype: torch.dtype | None = None, quant: LayerQuant | None = None) -> None:
        super().__init__("avg", output_size, dtype=dtype, quant=quant)


class AdaptiveMaxPool2d(AdaptivePool2d):
    """``AdaptivePool2d("max", output_size)``."""

    def __init__(self, output_size: int | tuple[int | None, int | None] | None = None, *,
                 dtype: torch.dtype | None = None, quant: LayerQuant | None = None) -> None:
        super().__init__("max", output_size, dtype=dtype, quant=quant)


def pool2d(
    x: torch.Tensor,
    kind: str,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: Padding = 0,
    dilation: IntPair = 1,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    out: torch.Tensor | None = None,
    pad_is_zeros: bool = False,
) -> torch.Tensor:
    """Max/avg pooling of x, allocating ``out`` (channels_last) when not given."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4D (N, C, H, W), got shape {tuple(x.shape)}")
    layer = Pool2d(kind, kernel_size, stride, padding, dilation, ceil_mode, count_include_pad,
                   divisor_override, pad_is_zeros)
    if out is None:
        oh, ow = layer.output_size(*x.shape[-2:])
        out = torch.empty((x.shape[0], x.shape[1], oh, ow), dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last)
    layer(x, out)
    return out


def adaptive_pool2d(x: torch.Tensor, kind: str, output_size: IntPair,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Adaptive max/avg pooling of x, allocating ``out`` (channels_last) when not given."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4D (N, C, H, W), got shape {tuple(x.shape)}")
    oh, ow = _pair(output_size, "output_size", 1)
    if out is None:
        out = torch.empty((x.shape[0], x.shape[1], oh, ow), dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last)
    AdaptivePool2d(kind, (oh, ow))(x, out)
    return out


def adaptive_avg_pool2d(x: torch.Tensor, output_size: IntPair,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Adaptive average pooling of x, allocating ``out`` (channels_last) when not given."""
    return adaptive_pool2d(x, "avg", output_size, out)
