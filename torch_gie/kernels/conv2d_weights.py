"""Weight layouts of the implicit-GEMM conv kernel (``conv2d.py``), made once per layer (or per
config, before any CUDA graph capture): the plain [C_out, KH, KW, C_in_g] packing, its channels
padded to the input's pixel stride (kw folded into c), and the block-diagonal packing of
"super-groups" that lets a grouped conv with narrow groups fill tensor-core tiles.

Super-groups: a grouped conv with G groups of C_in_g -> C_out_g channels is also a grouped conv
with G/GPT groups of GPT·C_in_g -> GPT·C_out_g channels whose weight is zero outside the GPT
diagonal blocks. Input and output channels keep their order, so the kernel runs unchanged on the
repacked weight; the zeros cost GPT-fold MMA work, which narrow groups (4..16 channels, far below
a 16-wide MMA tile) waste anyway, in exchange for GPT times fewer, fuller tiles. GPT need not
divide G: the last super-group then holds G mod GPT groups (the kernel masks the rest).
"""
from __future__ import annotations

import torch


def pack_conv_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[C_out, C_in/g, KH, KW] -> contiguous [C_out, KH, KW, C_in/g]: k runs along channels, so a
    B tile reads contiguous memory in the same order as the channels_last A tile."""
    return weight.detach().permute(0, 2, 3, 1).to(dtype).contiguous()


def pad_channels(packed: torch.Tensor, pix: int) -> torch.Tensor:
    """A packed [C_out, KH, KW, C_in_g] weight with its channels zero-padded to ``pix`` (the
    input's pixel stride, for the kw-folded K loop)."""
    c_out, kh, kw, c_in = packed.shape
    padded = packed.new_zeros((c_out, kh, kw, pix))
    padded[..., :c_in] = packed
    return padded


def pack_super_groups(packed: torch.Tensor, groups: int, gpt: int) -> torch.Tensor:
    """A packed grouped weight [C_out, KH, KW, C_in_g] -> [C_out, KH, KW, GPT·C_in_g]: output
    channel co of group g (g = co // C_out_g) keeps its weights at input channels
    (g mod GPT)·C_in_g + c of its super-group, zeros elsewhere (block-diagonal). When GPT does
    not divide the groups, the last super-group simply has fewer groups (fewer rows)."""
    if not 1 <= gpt <= groups:
        raise ValueError(f"GROUPS_PER_TILE={gpt} must be between 1 and groups={groups}")
    c_out, kh, kw, c_in_g = packed.shape
    c_out_g, supers = c_out // groups, -(-groups // gpt)
    src = packed.new_zeros((supers * gpt * c_out_g, kh, kw, c_in_g))
    src[:c_out] = packed  # the missing groups of a partial last super-group: zero rows, dropped below
    src = src.reshape(supers, gpt, c_out_g, kh, kw, c_in_g)
    out = packed.new_zeros((supers, gpt, c_out_g, kh, kw, gpt, c_in_g))
    for j in range(gpt):
        out[:, j, :, :, :, j] = src[:, j]
    return out.reshape(supers * gpt * c_out_g, kh, kw, gpt * c_in_g)[:c_out].contiguous()


# K of the zero-point padding dots: at least 32 (an int8 tl.dot's minimum on the GPU).
_MIN_TAPS = 32


def padded_taps(kh: int, kw: int) -> int:
    """KH·KW rounded up to a power of two of at least 32: the K of the zero-point padding dots."""
    return max(_MIN_TAPS, 1 << (kh * kw - 1).bit_length())


def zero_point_digits(codes: torch.Tensor) -> torch.Tensor:
    """The per-tap sums of a conv's weight codes (``wsum[tap, n]``, tap = kh·KW + kw, summed over
    the group's input channels) as int8 digits for the zero-point padding dots of ``conv2d.py``:
    [D, TAPS, C_out] with wsum = sum_d digits[d] · 128**d and TAPS = ``padded_taps`` (the extra
    taps are zero). Digits below the top one lie in [-64, 63]; the top one takes the rest, in
    [-128, 127]. ``codes``: int8 [C_out, C_in_g, KH, KW]."""
    c_out, _, kh, kw = codes.shape
    rest = codes.to(torch.int64).sum(1).reshape(c_out, kh * kw).t()  # [taps, C_out]
    digits = []
    while rest.numel() and rest.abs().max() > 127:
        low = (rest + 64) % 128 - 64
        digits.append(low)
        rest = (rest - low) // 128
    digits.append(rest)
    table = torch.zeros(len(digits), padded_taps(kh, kw), c_out, dtype=torch.int8, device=codes.device)
    for d, digit in enumerate(digits):
        table[d, :kh * kw] = digit.to(torch.int8)
    return table


def padding_taps(hw: tuple[int, int], out_hw: tuple[int, int], kernel_size: tuple[int, int],
                 stride: tuple[int, int], pads: tuple[int, int, int, int],
                 dilation: tuple[int, int], taps: int, zero_point: int,
                 device: torch.device) -> torch.Tensor:
    """int8 [OH·OW, taps]: ``zero_point`` where tap kh·KW + kw of output pixel (oh, ow) falls
    outside the H x W input (pads: top, bottom, left, right), else 0 (and 0 past KH·KW): the A
    operand of the zero-point padding dots, the same for every image."""
    (h, w), (oh, ow), (kh, kw) = hw, out_hw, kernel_size
    ih = torch.arange(oh)[:, None] * stride[0] - pads[0] + torch.arange(kh)[None, :] * dilation[0]
    iw = torch.arange(ow)[:, None] * stride[1] - pads[2] + torch.arange(kw)[None, :] * dilation[1]
    out_h, out_w = (ih < 0) | (ih >= h), (iw < 0) | (iw >= w)  # [OH, KH], [OW, KW]
    outside = out_h[:, None, :, None] | out_w[None, :, None, :]  # [OH, OW, KH, KW]
    table = torch.zeros(oh * ow, taps, dtype=torch.int8)
    table[:, :kh * kw] = outside.reshape(oh * ow, kh * kw).to(torch.int8) * zero_point
    return table.to(device)
