"""2D max / average / adaptive-average pooling on NCHW-shaped strided views (channels_last).

Output ``(n, c, oh, ow)`` reduces the taps ``ih = oh*SH - PH + kh*DH`` (kh < KH), likewise for w;
max ignores taps in the padding (as -inf), average divides by PyTorch's count. Adaptive pooling
reduces ``[floor(oh*H/OH), ceil((oh+1)*H/OH))``. Programs tile (output pixels x channels), with
channels contiguous.
"""
from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

IntPair = int | tuple[int, int]

_DTYPES = (torch.float16, torch.float32)
_MAX, _AVG, _ADAPTIVE_AVG = 0, 1, 2  # kernel modes


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
    # meta-parameters: window extent (adaptive: the largest window), stride, padding, dilation
    MODE: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    COUNT_INCLUDE_PAD: tl.constexpr, DIVISOR: tl.constexpr,  # DIVISOR 0: no divisor_override
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < P
    c_ok = c < C
    ow = p % OW
    oh = (p // OW) % OH
    n = p // (OW * OH)
    if MODE == 2:  # adaptive: taps from h0 up to (not including) h_hi
        h0 = (oh * H) // OH
        w0 = (ow * W) // OW
        h_hi = ((oh + 1) * H + OH - 1) // OH
        w_hi = ((ow + 1) * W + OW - 1) // OW
    else:
        h0 = oh * SH - PH
        w0 = ow * SW - PW
        h_hi = H
        w_hi = W

    x_pix = x_ptr + n.to(tl.int64) * sxn
    x_chan = c[None, :] * sxc
    if MODE == 0:
        acc = tl.full([BLOCK_P, BLOCK_C], float("-inf"), tl.float32)
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
            if MODE == 0:
                v = tl.load(ptrs, mask=mask, other=float("-inf"))
                acc = tl.maximum(acc, v.to(tl.float32))
            else:
                acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)

    if MODE == 1:
        if DIVISOR != 0:
            acc = acc / DIVISOR
        else:
            acc = acc / _avg_count(h0, w0, H, W, KH, KW, PH, PW, COUNT_INCLUDE_PAD)[:, None]
    elif MODE == 2:
        acc = acc / ((h_hi - h0) * (w_hi - w0)).to(tl.float32)[:, None]
    out_ptrs = (out_ptr + n.to(tl.int64)[:, None] * son + (oh * soh + ow * sow)[:, None]
                + c[None, :] * soc)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


@triton.jit
def _avg_count(h0, w0, H, W, KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr,
               PW: tl.constexpr, COUNT_INCLUDE_PAD: tl.constexpr):
    # PyTorch's divisor: the window clipped to the padded input (ceil_mode windows can overhang),
    # then, without count_include_pad, clipped again to the input itself.
    h1 = tl.minimum(h0 + KH, H + PH)
    w1 = tl.minimum(w0 + KW, W + PW)
    if not COUNT_INCLUDE_PAD:
        h1 = tl.minimum(h1, H)
        w1 = tl.minimum(w1, W)
        h0 = tl.maximum(h0, 0)
        w0 = tl.maximum(w0, 0)
    return ((h1 - h0) * (w1 - w0)).to(tl.float32)


@triton.jit
def _global_avg_kernel(
    x_ptr, out_ptr,  # pointers
    C, H, W,  # sizes
    sxn, sxc, sxh, sxw, son, soc,  # strides
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program per (image, channel block) reduces all H*W pixels: the classifier-head pooling.
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    x_img = x_ptr + n.to(tl.int64) * sxn + c[None, :] * sxc
    acc = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
    for hw0 in range(0, H * W, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        ptrs = x_img + ((hw // W) * sxh + (hw % W) * sxw)[:, None]
        acc += tl.load(ptrs, mask=(hw < H * W)[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / (H * W)
    tl.store(out_ptr + n.to(tl.int64) * son + c * soc, mean.to(out_ptr.dtype.element_ty), mask=c_ok)


def _pair(v: IntPair, name: str, minimum: int) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(isinstance(i, int) and i >= minimum for i in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {v!r}")
    return pair


def _check_io(x: torch.Tensor, out: torch.Tensor) -> None:
    if x.dim() != 4 or out.dim() != 4:
        raise ValueError(f"x and out must be 4D (N, C, H, W), got shapes {tuple(x.shape)} "
                         f"and {tuple(out.shape)}")
    if out.shape[:2] != x.shape[:2]:
        raise ValueError(f"out must keep x's (N, C) = {tuple(x.shape[:2])}, "
                         f"got {tuple(out.shape[:2])}")
    if x.dtype not in _DTYPES or out.dtype != x.dtype:
        raise ValueError(f"x and out must share a dtype in {_DTYPES}, "
                         f"got {x.dtype} and {out.dtype}")
    if x.device != out.device:
        raise ValueError(f"x and out must be on one device, got {x.device} and {out.device}")


def _launch_windowed(x: torch.Tensor, out: torch.Tensor, **meta) -> None:
    n, c, h, w = x.shape
    oh, ow = out.shape[2:]
    p = n * oh * ow
    if p == 0 or c == 0:
        return
    block_p, block_c = _tile(c)
    grid = (triton.cdiv(p, block_p), triton.cdiv(c, block_c))
    _pool2d_kernel[grid](x, out, p, c, h, w, oh, ow, *x.stride(), *out.stride(),
                         BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4, **meta)


def pooled_size(size: int, kernel: int, stride: int, pad: int, dilation: int,
                ceil_mode: bool) -> int:
    """PyTorch's pooling output size, including the ceil_mode rule that the last window must
    start inside the input or its left padding."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


class Pool2d:
    """Max or average pooling bound at compile time; ``layer(x, out)`` writes out per forward."""

    def __init__(
        self,
        kind: str,
        kernel_size: IntPair,
        stride: IntPair | None = None,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
    ) -> None:
        if kind not in ("max", "avg"):
            raise ValueError(f"kind must be 'max' or 'avg', got {kind!r}")
        self.kind = kind
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = self.kernel_size if stride is None else _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)
        if any(p > k // 2 for p, k in zip(self.padding, self.kernel_size, strict=True)):
            raise ValueError(f"padding {self.padding} must be at most half of kernel_size "
                             f"{self.kernel_size}")
        if kind == "avg" and self.dilation != (1, 1):
            raise ValueError(f"average pooling has no dilation (as in PyTorch), "
                             f"got {self.dilation}")
        if divisor_override is not None and (kind == "max" or divisor_override == 0):
            raise ValueError(f"divisor_override must be a nonzero int for average pooling, got "
                             f"{divisor_override!r} for {kind} pooling")
        self.ceil_mode = ceil_mode
        self.count_include_pad = count_include_pad
        self.divisor_override = divisor_override

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """(OH, OW) for an (h, w) input, by PyTorch's formula."""
        dims = zip((h, w), self.kernel_size, self.stride, self.padding, self.dilation, strict=True)
        return tuple(pooled_size(*dim, self.ceil_mode) for dim in dims)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        _check_io(x, out)
        expected = self.output_size(*x.shape[2:])
        if tuple(out.shape[2:]) != expected or min(expected) < 1:
            raise ValueError(f"{self.kind} pool {self.kernel_size}, stride {self.stride}, padding "
                             f"{self.padding} of a {tuple(x.shape[2:])} input gives {expected}; "
                             f"out has {tuple(out.shape[2:])}")
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (self.kernel_size, self.stride, self.padding,
                                                  self.dilation)
        _launch_windowed(x, out, MODE=_MAX if self.kind == "max" else _AVG,
                         KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
                         COUNT_INCLUDE_PAD=self.count_include_pad,
                         DIVISOR=self.divisor_override or 0)


@cache
def _largest_window(size: int, out_size: int) -> int:
    return max(-(-(i + 1) * size // out_size) - i * size // out_size for i in range(out_size))


class AdaptiveAvgPool2d:
    """Adaptive average pooling to out's spatial size; ``output_size``, if given, is checked too."""

    def __init__(self, output_size: int | tuple[int | None, int | None] | None = None) -> None:
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.output_size = output_size

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        _check_io(x, out)
        n, c, h, w = x.shape
        oh, ow = out.shape[2:]
        if self.output_size is not None:
            # None in output_size keeps that input dim, as in PyTorch.
            expected = tuple(s if e is None else e
                             for e, s in zip(self.output_size, (h, w), strict=True))
            if (oh, ow) != expected:
                raise ValueError(f"out spatial size must be {expected}, got {(oh, ow)}")
        if min(h, w, oh, ow) < 1:
            raise ValueError(f"adaptive pooling needs nonempty input and output, "
                             f"got {(h, w)} -> {(oh, ow)}")
        if n * c == 0:
            return
        if (oh, ow) == (1, 1):
            block_c = min(64, triton.next_power_of_2(c))
            block_hw = min(4096 // block_c, triton.next_power_of_2(h * w))
            grid = (n, triton.cdiv(c, block_c))
            _global_avg_kernel[grid](x, out, c, h, w, *x.stride(), out.stride(0), out.stride(1),
                                     BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=4)
            return
        # KH, KW bound the largest window; shorter windows mask their extra taps.
        _launch_windowed(x, out, MODE=_ADAPTIVE_AVG,
                         KH=_largest_window(h, oh), KW=_largest_window(w, ow),
                         SH=1, SW=1, PH=0, PW=0, DH=1, DW=1, COUNT_INCLUDE_PAD=True, DIVISOR=0)


def pool2d(
    x: torch.Tensor,
    kind: str,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Max/avg pooling of x, allocating ``out`` (channels_last) when not given."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4D (N, C, H, W), got shape {tuple(x.shape)}")
    layer = Pool2d(kind, kernel_size, stride, padding, dilation, ceil_mode, count_include_pad,
                   divisor_override)
    if out is None:
        oh, ow = layer.output_size(*x.shape[-2:])
        out = torch.empty((x.shape[0], x.shape[1], oh, ow), dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last)
    layer(x, out)
    return out


def adaptive_avg_pool2d(x: torch.Tensor, output_size: IntPair,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Adaptive average pooling of x, allocating ``out`` (channels_last) when not given."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4D (N, C, H, W), got shape {tuple(x.shape)}")
    oh, ow = _pair(output_size, "output_size", 1)
    if out is None:
        out = torch.empty((x.shape[0], x.shape[1], oh, ow), dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last)
    AdaptiveAvgPool2d((oh, ow))(x, out)
    return out
