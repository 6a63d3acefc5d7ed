"""LayerNorm over one dim of a strided view: ``out = (x - mean) / sqrt(var + eps) * w + b``, with
mean and (biased) variance over C in fp32.

Two layouts reach one kernel: the last dim of a (..., C) view (ViT/Swin tokens: rows with a row
stride) and dim 1 of a 4D (N, C, H, W) channels_last view (ConvNeXt: a pixel's channels are
contiguous, so rows are pixels). Either way the kernel sees rows indexed by up to three dims with
their own strides, and channels with a channel stride. Rows whose C fits one tile are normalized
from registers (one read, one write); longer rows take three passes over C (mean, centered
variance, normalize), exact at any length.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.float32)
# Rows up to this many channels (rounded up to a power of two) are normalized in one tile.
_MAX_SINGLE_PASS_C = 8192
# Longer rows are read in chunks of this many channels.
_CHUNK_C = 2048
# Elements per program: many short rows per program, one long row.
_TILE = 4096


@triton.jit
def _layer_norm_kernel(
    # pointers (w_ptr / b_ptr are unused without HAS_W / HAS_B)
    x_ptr, w_ptr, b_ptr, out_ptr,
    # sizes: R rows = R0 * R1 * R2, C channels
    R, C, R1, R2, eps,
    # strides: three row dims, then the channel dim
    sx0, sx1, sx2, sxc,
    so0, so1, so2, soc,
    # meta-parameters
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SINGLE_PASS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < R
    # Row indices split in int32 (64-bit division is slow and costs registers); offsets in int64:
    # rows * row stride passes 2**31 for large batches.
    i2 = (rows % R2).to(tl.int64)
    i1 = ((rows // R2) % R1).to(tl.int64)
    i0 = (rows // (R2 * R1)).to(tl.int64)
    x_row = x_ptr + (i0 * sx0 + i1 * sx1 + i2 * sx2)[:, None]
    o_row = out_ptr + (i0 * so0 + i1 * so1 + i2 * so2)[:, None]
    if SINGLE_PASS:
        c = tl.arange(0, BLOCK_C)
        c_ok = c < C
        mask = r_ok[:, None] & c_ok[None, :]
        x = tl.load(x_row + c[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / C
        d = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
        _store_normalized(d, rstd, c, c_ok, mask, o_row, w_ptr, b_ptr, soc, HAS_W, HAS_B)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            mask = r_ok[:, None] & (c < C)[None, :]
            acc += tl.load(x_row + c[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=1) / C
        acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        for c0 in range(0, C, BLOCK_C):  # centered: no cancellation for rows far from zero
            c = c0 + tl.arange(0, BLOCK_C)
            mask = r_ok[:, None] & (c < C)[None, :]
            x = tl.load(x_row + c[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x - mean[:, None], 0.0)
            acc += d * d
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / C + eps)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            mask = r_ok[:, None] & c_ok[None, :]
            x = tl.load(x_row + c[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
            _store_normalized(x - mean[:, None], rstd, c, c_ok, mask, o_row, w_ptr, b_ptr, soc,
                              HAS_W, HAS_B)


@triton.jit
def _store_normalized(d, rstd, c, c_ok, mask, o_row, w_ptr, b_ptr, soc, HAS_W: tl.constexpr,
                      HAS_B: tl.constexpr):
    """out[row, c] = d * rstd[row] * w[c] + b[c] for centered values d."""
    y = d * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + c, mask=c_ok, other=0.0)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + c, mask=c_ok, other=0.0)[None, :]
    tl.store(o_row + c[None, :] * soc, y.to(o_row.dtype.element_ty), mask=mask)


def layer_norm_tiles(c: int) -> tuple[bool, int, int, int]:
    """(single_pass, BLOCK_R, BLOCK_C, num_warps) for rows of ``c`` channels: a whole row per tile
    up to _MAX_SINGLE_PASS_C channels, with as many rows as fill _TILE elements (32 rows of
    ConvNeXt's C = 96, 4 of ViT's 768); 8 warps once a tile holds more than _TILE elements
    (registers). Longer rows: one row per program, _CHUNK_C channels at a time."""
    block_c = triton.next_power_of_2(c)
    if block_c > _MAX_SINGLE_PASS_C:
        return False, 1, _CHUNK_C, 4
    block_r = max(1, _TILE // block_c)
    return True, block_r, block_c, 4 if block_r * block_c <= _TILE else 8


def _row_view(t: torch.Tensor, dim: int) -> tuple[tuple[int, int, int], tuple[int, int, int, int]]:
    """((R0, R1, R2) row sizes, (s0, s1, s2, s_channel) strides) of t normalized over ``dim``:
    the rows are t's other dims, in order (size-1 dims in front when there are fewer than 3)."""
    dim %= t.dim()
    lead = [t.shape[i] for i in range(t.dim()) if i != dim]
    lead_strides = [t.stride(i) for i in range(t.dim()) if i != dim]
    while len(lead) < 3:
        lead.insert(0, 1)
        lead_strides.insert(0, 0)
    return tuple(lead), (*lead_strides, t.stride(dim))


class LayerNorm:
    """LayerNorm over ``dim`` (-1: the last dim of a rank 2-4 view, e.g. tokens; 1: the channels
    of (N, C, H, W); any other dim of a rank 2-4 view works the same) with optional
    ``weight``/``bias`` [C] (kept fp32), ``eps``. ``layer(x, out)``: x and out of one shape in the
    layer's ``dtype``, any strides."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5,
                 dim: int = -1, dtype: torch.dtype = torch.float16, channels: int | None = None) -> None:
        if not isinstance(dim, int):
            raise ValueError(f"dim must be an int (-1: last, 1: channels), got {dim!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        known = [t.shape[0] for t in (weight, bias) if t is not None and t.dim() == 1]
        lengths = {channels, *known} - {None}
        if any(t is not None and t.dim() != 1 for t in (weight, bias)) or len(lengths) > 1:
            raise ValueError(f"weight and bias must be 1D of one length C (channels={channels}), got "
                             f"{[None if t is None else tuple(t.shape) for t in (weight, bias)]}")
        self.channels = lengths.pop() if lengths else None  # None: any C (no affine)
        self.weight = None if weight is None else weight.detach().to(torch.float32).contiguous()
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self.eps, self.dim, self.dtype = float(eps), dim, dtype

    def _check(self, x: torch.Tensor, out: torch.Tensor) -> int:
        if x.dim() not in (2, 3, 4) or not -x.dim() <= self.dim < x.dim():
            raise ValueError(f"x must be 2D to 4D with a dim {self.dim} to normalize, "
                             f"got {tuple(x.shape)}")
        if out.shape != x.shape:
            raise ValueError(f"out must have x's shape {tuple(x.shape)}, got {tuple(out.shape)}")
        for name, t in (("x", x), ("out", out)):
            if t.dtype != self.dtype:
                raise ValueError(f"{name} must be {self.dtype} (the layer's dtype), got {t.dtype}")
        c = x.shape[self.dim]
        if self.channels is not None and c != self.channels:
            raise ValueError(f"x must have {self.channels} channels in dim {self.dim}, got "
                             f"{tuple(x.shape)}")
        params = [t for t in (self.weight, self.bias) if t is not None]
        if x.device != out.device or any(t.device != x.device for t in params):
            raise ValueError(f"x, out, weight and bias must be on one device, got x on {x.device}, "
                             f"out on {out.device}")
        return c

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        c = self._check(x, out)
        (r0, r1, r2), x_strides = _row_view(x, self.dim)
        _, out_strides = _row_view(out, self.dim)
        rows = r0 * r1 * r2
        if rows == 0 or c == 0:
            return
        single, block_r, block_c, warps = layer_norm_tiles(c)
        dummy = x
        _layer_norm_kernel[(triton.cdiv(rows, block_r),)](
            x, dummy if self.weight is None else self.weight, dummy if self.bias is None else self.bias,
            out, rows, c, r1, r2, self.eps, *x_strides, *out_strides,
            HAS_W=self.weight is not None, HAS_B=self.bias is not None, SINGLE_PASS=single,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
        )
