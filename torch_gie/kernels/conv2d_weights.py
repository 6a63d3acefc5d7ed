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
