"""Global pooling (mean or max over H*W of an (N, C, H, W) view: classifier heads,
squeeze-and-excitation), a reduction that is latency-bound on the small maps of late layers.

Program (image n, split s, channel block) reduces pixels [s*chunk, (s+1)*chunk) of its channels
in tiles of up to ``TILE`` elements, each tile one load with all its bytes in flight. Maps of at
most 256 pixels take one tile per (image, channel block): one launch, one memory round trip per
program. Larger maps are split so that the grid fills the GPU; then fp32 partials ``[N, S, C]``
go to a workspace the layer keeps and a tiny kernel reduces them (no atomics: results are
reproducible). ``spatial_split`` picks the tiling; ``reduce_pixels`` is the tile loop that the
squeeze-and-excitation kernel shares.

int8 (``quant=LayerQuant``): a mean sums codes minus the zero point (exact integers in fp32 up to
2**24 / 128 pixels), scales by s_x / (H*W) and requantizes or stores fp16/fp32 (e.g. for an fp16
classifier); a max of codes is exact, stored as codes or dequantized.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

from torch_gie.kernels.quant import load_codes, requantize
from torch_gie.quantize.arith import LayerQuant

_DTYPES = (torch.float16, torch.float32)


@triton.jit
def reduce_pixels(x_img, c_ok, start, end, W, sxh, sxw, IS_MAX: tl.constexpr,
                  DENSE_HW: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum or max (fp32, [BLOCK_C]) over pixels [start, end) of one image's channel block.
    ``x_img`` [1, BLOCK_C]: pointers to pixel 0 of the channels; DENSE_HW: pixel hw lives at
    hw * sxw (no row/column split needed)."""
    if IS_MAX:
        acc = tl.full([BLOCK_HW, BLOCK_C], float("-inf"), tl.float32)
    else:
        acc = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
    for hw0 in range(start, end, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        if DENSE_HW:
            offs = hw * sxw
        else:
            offs = (hw // W) * sxh + (hw % W) * sxw
        mask = (hw < end)[:, None] & c_ok[None, :]
        if IS_MAX:
            if x_img.dtype.element_ty == tl.int8:  # codes: -128 never wins (-inf has no int8)
                v = load_codes(x_img + offs[:, None], mask, -128)
            else:
                v = tl.load(x_img + offs[:, None], mask=mask, other=float("-inf"))
            acc = tl.maximum(acc, v.to(tl.float32))
        else:
            acc += tl.load(x_img + offs[:, None], mask=mask, other=0.0).to(tl.float32)
    if IS_MAX:
        red = tl.max(acc, axis=0)
    else:
        red = tl.sum(acc, axis=0)
    return red


@triton.jit
def _store_pooled(ptrs, red, mask, out_inv_scale, CODES: tl.constexpr, OUT_QUANT: tl.constexpr,
                  OUT_ZP: tl.constexpr):
    """Store pooled values: CODES, already codes (an int8 max); OUT_QUANT, real values
    requantized; else real values cast to the destination's dtype."""
    if CODES:
        tl.store(ptrs, red.to(tl.int8), mask=mask)
    elif OUT_QUANT:
        tl.store(ptrs, requantize(red, out_inv_scale, OUT_ZP), mask=mask)
    else:
        tl.store(ptrs, red.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _spatial_reduce_kernel(
    # pointers: x (N, C, H, W); dest (N, S, C): the partials, or the output when S == 1
    x_ptr, dest_ptr,
    # sizes; CHUNK pixels per split, a multiple of BLOCK_HW
    C, H, W, S, CHUNK, scale,
    # strides
    sxn, sxc, sxh, sxw,
    sdn, sds, sdc,
    out_inv_scale,  # int8 output: 1 / its scale
    # meta-parameters
    IS_MAX: tl.constexpr, DENSE_HW: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
    # int8 (see GlobalPool2d._quant_meta): ZP, x's zero point, taken off each summed code;
    # MAX_DEQUANT: a max of codes becomes (max - ZP) * scale
    ZP: tl.constexpr, MAX_DEQUANT: tl.constexpr, CODES: tl.constexpr, OUT_QUANT: tl.constexpr,
    OUT_ZP: tl.constexpr,
):
    n = tl.program_id(0) // S
    s = tl.program_id(0) % S
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    x_img = x_ptr + n.to(tl.int64) * sxn + c[None, :] * sxc
    end = tl.minimum(s * CHUNK + CHUNK, H * W)
    red = reduce_pixels(x_img, c_ok, s * CHUNK, end, W, sxh, sxw,
                        IS_MAX, DENSE_HW, BLOCK_HW, BLOCK_C)
    if IS_MAX:
        if MAX_DEQUANT:
            red = (red - ZP) * scale
    else:
        if ZP != 0:
            red = red - ZP * (end - s * CHUNK).to(tl.float32)
        red = red * scale
    dest = dest_ptr + n.to(tl.int64) * sdn + s * sds + c * sdc
    _store_pooled(dest, red, c_ok, out_inv_scale, CODES, OUT_QUANT, OUT_ZP)


@triton.jit
def _partials_reduce_kernel(
    part_ptr, out_ptr,  # partials [N, S, C] fp32 contiguous; out (N, C) view
    S, C, scale,  # sizes; scale multiplies a sum (1 / (H*W) for a mean)
    son, soc,  # out strides
    out_inv_scale,  # int8 output: 1 / its scale
    IS_MAX: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    # int8, as _spatial_reduce_kernel's (the partials' sums already lack the zero point)
    ZP: tl.constexpr, MAX_DEQUANT: tl.constexpr, CODES: tl.constexpr, OUT_QUANT: tl.constexpr,
    OUT_ZP: tl.constexpr,
):
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    mask = (s < S)[:, None] & (c < C)[None, :]
    ptrs = part_ptr + n.to(tl.int64) * S * C + s[:, None] * C + c[None, :]
    if IS_MAX:
        red = tl.max(tl.load(ptrs, mask=mask, other=float("-inf")), axis=0)
        if MAX_DEQUANT:
            red = (red - ZP) * scale
    else:
        red = tl.sum(tl.load(ptrs, mask=mask, other=0.0), axis=0) * scale
    _store_pooled(out_ptr + n.to(tl.int64) * son + c * soc, red, c < C, out_inv_scale, CODES,
                  OUT_QUANT, OUT_ZP)


@cache
def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100's count: CPU (interpreter) runs then split as the GPU would


@dataclass(frozen=True)
class SpatialSplit:
    """How a global reduction over H*W is spread: ``split`` programs per (image, channel block),
    each reducing ``chunk`` consecutive pixels in ``block_hw x block_c`` tiles with
    ``num_warps`` warps."""

    split: int
    chunk: int
    block_hw: int
    block_c: int
    num_warps: int

    # One tile: 32 elements per thread at 8 warps, loaded at once.
    TILE = 8192
    # Rows of at least this many channels (64 bytes in fp16: whole sectors) ...
    MIN_BLOCK_C = 32
    # ... and at most 64 of them when C > 128 (C <= 128: a pixel's channels in one block).
    WIDE_BLOCK_C = 64
    # A split aims at this many programs per SM (latency-bound: many tiles in flight) ...
    PROGRAMS_PER_SM = 8
    # ... and is not worth a second launch for this many tiles or fewer per program, nor made
    # into more than MAX_SPLIT parts (the partials' reduce kernel reads them in one tile).
    MAX_UNSPLIT_TILES = 2
    MAX_SPLIT = 64


def spatial_split(n: int, c: int, hw: int, device: torch.device) -> SpatialSplit:
    """The tiling of a global pool of ``n`` images of ``c`` channels and ``hw`` pixels.

    A map of up to TILE / MIN_BLOCK_C = 256 pixels is one tile per (image, channel block): the
    channel block shrinks to fit it (7x7 and 14x14 maps: one load per program, no second
    launch). A larger map gets channel blocks of a whole pixel (C <= 128) or WIDE_BLOCK_C and is
    split into as many parts as give PROGRAMS_PER_SM programs per SM (at least one tile each),
    unless each program then reads MAX_UNSPLIT_TILES tiles or fewer anyway."""
    hw2 = triton.next_power_of_2(hw)
    block_c = triton.next_power_of_2(c) if c <= 128 else SpatialSplit.WIDE_BLOCK_C
    if hw2 * SpatialSplit.MIN_BLOCK_C <= SpatialSplit.TILE:
        block_c = min(block_c, SpatialSplit.TILE // hw2)
    block_hw = min(SpatialSplit.TILE // block_c, hw2)
    tiles = triton.cdiv(hw, block_hw)  # per (image, channel block)
    programs = n * triton.cdiv(c, block_c)
    split = 1
    if tiles > SpatialSplit.MAX_UNSPLIT_TILES:
        want = triton.cdiv(SpatialSplit.PROGRAMS_PER_SM * sm_count(device), max(programs, 1))
        split = max(1, min(want, tiles, SpatialSplit.MAX_SPLIT))
    chunk = triton.cdiv(tiles, split) * block_hw
    num_warps = max(1, min(8, block_hw * block_c // 1024))
    return SpatialSplit(triton.cdiv(hw, chunk), chunk, block_hw, block_c, num_warps)


def dense_pixels(x: torch.Tensor) -> bool:
    """Whether pixel hw of x lives at hw * stride(3) (rows back to back, or a single row)."""
    return x.shape[2] == 1 or x.stride(2) == x.shape[3] * x.stride(3)


_NO_QUANT = dict(out_inv_scale=1.0, ZP=0, MAX_DEQUANT=False, CODES=False, OUT_QUANT=False, OUT_ZP=0)


def spatial_reduce(x: torch.Tensor, dest: torch.Tensor, sp: SpatialSplit, kind: str,
                   scale: float = 1.0, quant: dict = _NO_QUANT) -> None:
    """Stage 1 of a global pool: ``dest[n, s, c]`` = sum (times ``scale``) or max of x[n, c] over
    pixels [s*chunk, (s+1)*chunk). ``dest`` is an (N, sp.split, C) view (the fp32 partials, or the
    output itself when split is 1); ``quant``: the int8 meta-parameters (``_quant_meta``)."""
    n, c, h, w = x.shape
    if n * c == 0:
        return
    grid = (n * sp.split, triton.cdiv(c, sp.block_c))
    _spatial_reduce_kernel[grid](
        x, dest, c, h, w, sp.split, sp.chunk, scale, *x.stride(), *dest.stride(),
        IS_MAX=kind == "max", DENSE_HW=dense_pixels(x), BLOCK_HW=sp.block_hw,
        BLOCK_C=sp.block_c, num_warps=sp.num_warps, **quant,
    )


def check_quant(kind: str, dtype: torch.dtype | None, quant: LayerQuant | None) -> None:
    """ValueError unless dtype and quant agree (int8 exactly when quant is given) and a max keeps
    its input's QParams (a max of codes is exact only then) or stores real values."""
    if (dtype == torch.int8) != (quant is not None):
        raise ValueError(f"an int8 pool needs quant=LayerQuant(...) and only an int8 one takes it, "
                         f"got dtype {dtype} and quant {quant}")
    if quant is None:
        return
    if kind == "max" and quant.output not in (None, quant.input):
        raise ValueError(f"an int8 max pool's output QParams must equal its input's "
                         f"({quant.input}), got {quant.output}")
    if quant.output is None and quant.out_dtype not in _DTYPES:
        raise ValueError(f"quant.out_dtype must be one of {_DTYPES}, got {quant.out_dtype}")


def check_pool_io(x: torch.Tensor, out: torch.Tensor, out_ranks: tuple[int, ...] = (4,),
                  quant: LayerQuant | None = None) -> None:
    """ValueError unless x is a 4D view and out one of ``out_ranks`` with x's (N, C), dtype and
    device (int8: x int8, out ``quant.store_dtype``) (every pooling layer's call check)."""
    if x.dim() != 4 or out.dim() not in out_ranks:
        want = " or ".join(f"{r}D" for r in out_ranks)
        raise ValueError(f"x must be 4D (N, C, H, W) and out {want}, got shapes {tuple(x.shape)} "
                         f"and {tuple(out.shape)}")
    if out.shape[:2] != x.shape[:2]:
        raise ValueError(f"out must keep x's (N, C) = {tuple(x.shape[:2])}, "
                         f"got {tuple(out.shape[:2])}")
    if quant is None and (x.dtype not in _DTYPES or out.dtype != x.dtype):
        raise ValueError(f"x and out must share a dtype in {_DTYPES}, "
                         f"got {x.dtype} and {out.dtype}")
    if quant is not None and (x.dtype != torch.int8 or out.dtype != quant.store_dtype):
        raise ValueError(f"an int8 pool takes int8 x and {quant.store_dtype} out, "
                         f"got {x.dtype} and {out.dtype}")
    if x.device != out.device:
        raise ValueError(f"x and out must be on one device, got {x.device} and {out.device}")


def quant_meta(kind: str, quant: LayerQuant | None) -> dict:
    """The int8 meta-parameters of the kernels that write a pooled output (see
    ``_spatial_reduce_kernel``)."""
    if quant is None:
        return _NO_QUANT
    out = quant.output
    is_max = kind == "max"
    return dict(out_inv_scale=1.0 if out is None else out.inv_scale, ZP=quant.input.zero_point,
                MAX_DEQUANT=is_max and out is None, CODES=is_max and out is not None,
                OUT_QUANT=not is_max and out is not None, OUT_ZP=0 if out is None else out.zero_point)


class GlobalPool2d:
    """Mean or max over H*W of an (N, C, H, W) view into an (N, C) or (N, C, 1, 1) view.

    The fp32 partials of a split reduction live in a workspace allocated on the first call that
    needs one and kept (calls are captured in CUDA graphs after a warm-up call).

    int8: ``dtype=torch.int8, quant=LayerQuant(...)``: x holds codes of ``quant.input``; out
    codes of ``quant.output`` (a max: equal to the input's), or real values in
    ``quant.out_dtype`` when that is None (e.g. the pooled features of an fp16 classifier)."""

    def __init__(self, kind: str, *, dtype: torch.dtype | None = None,
                 quant: LayerQuant | None = None) -> None:
        if kind not in ("max", "avg"):
            raise ValueError(f"kind must be 'max' or 'avg', got {kind!r}")
        check_quant(kind, dtype, quant)
        self.kind = kind
        self.quant = quant
        self._partials: torch.Tensor | None = None
        self._launches = 1

    @property
    def launches(self) -> int:
        """Kernels the last call launched: 2 when H*W was split over programs."""
        return self._launches

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        check_pool_io(x, out, (2, 4), self.quant)
        if out.dim() == 4 and out.shape[2:] != (1, 1):
            raise ValueError(f"a global pool's out is (N, C) or (N, C, 1, 1), got {tuple(out.shape)}")
        n, c, h, w = x.shape
        if h * w == 0:
            raise ValueError(f"global pooling needs a nonempty input, got {(h, w)}")
        out2 = out[:, :, 0, 0] if out.dim() == 4 else out
        x_scale = 1.0 if self.quant is None else self.quant.input.scale
        # A mean's sum is scaled by s_x / (H*W); an int8 max stored as real values by s_x.
        scale = x_scale if self.kind == "max" else x_scale / (h * w)
        meta = quant_meta(self.kind, self.quant)
        sp = spatial_split(n, c, h * w, x.device)
        self._launches = 1 if sp.split == 1 else 2
        if sp.split == 1:
            spatial_reduce(x, out2[:, None, :], sp, self.kind, scale, meta)
            return
        partials = self.workspace(n * sp.split * c, x.device).view(n, sp.split, c)
        # Partials: raw sums (int8: less the zero point) or maxima, finished by the second kernel.
        spatial_reduce(x, partials, sp, self.kind, 1.0, {**_NO_QUANT, "ZP": meta["ZP"]})
        block_c = min(64, triton.next_power_of_2(c))
        _partials_reduce_kernel[(n, triton.cdiv(c, block_c))](
            partials, out2, sp.split, c, scale, *out2.stride(), IS_MAX=self.kind == "max",
            BLOCK_S=triton.next_power_of_2(sp.split), BLOCK_C=block_c, num_warps=4, **meta)

    def workspace(self, numel: int, device: torch.device) -> torch.Tensor:
        """``numel`` fp32 elements of the layer's kept workspace (grown only on a larger shape)."""
        ws = self._partials
        if ws is None or ws.numel() < numel or ws.device != device:
            ws = self._partials = torch.empty(numel, dtype=torch.float32, device=device)
        return ws[:numel]
