"""Global pooling (mean or max over H*W of an (N, C, H, W) view: classifier heads,
squeeze-and-excitation), a reduction that is latency-bound on the small maps of late layers.

Program (image n, split s, channel block) reduces pixels [s*chunk, (s+1)*chunk) of its channels
in tiles of up to ``TILE`` elements, each tile one load with all its bytes in flight. Maps of at
most 256 pixels take one tile per (image, channel block): one launch, one memory round trip per
program. Larger maps are split so that the grid fills the GPU; then fp32 partials ``[N, S, C]``
go to a workspace the layer keeps and a tiny kernel reduces them (no atomics: results are
reproducible). ``spatial_split`` picks the tiling; ``reduce_pixels`` is the tile loop that the
squeeze-and-excitation kernel shares.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

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
def _spatial_reduce_kernel(
    # pointers: x (N, C, H, W); dest (N, S, C): the partials, or the output when S == 1
    x_ptr, dest_ptr,
    # sizes; CHUNK pixels per split, a multiple of BLOCK_HW
    C, H, W, S, CHUNK, scale,
    # strides
    sxn, sxc, sxh, sxw,
    sdn, sds, sdc,
    # meta-parameters
    IS_MAX: tl.constexpr, DENSE_HW: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0) // S
    s = tl.program_id(0) % S
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    x_img = x_ptr + n.to(tl.int64) * sxn + c[None, :] * sxc
    red = reduce_pixels(x_img, c_ok, s * CHUNK, tl.minimum(s * CHUNK + CHUNK, H * W), W, sxh, sxw,
                        IS_MAX, DENSE_HW, BLOCK_HW, BLOCK_C)
    if not IS_MAX:
        red = red * scale
    dest = dest_ptr + n.to(tl.int64) * sdn + s * sds + c * sdc
    tl.store(dest, red.to(dest_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _partials_reduce_kernel(
    part_ptr, out_ptr,  # partials [N, S, C] fp32 contiguous; out (N, C) view
    S, C, scale,  # sizes; scale multiplies a sum (1 / (H*W) for a mean)
    son, soc,  # out strides
    IS_MAX: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    mask = (s < S)[:, None] & (c < C)[None, :]
    ptrs = part_ptr + n.to(tl.int64) * S * C + s[:, None] * C + c[None, :]
    if IS_MAX:
        red = tl.max(tl.load(ptrs, mask=mask, other=float("-inf")), axis=0)
    else:
        red = tl.sum(tl.load(ptrs, mask=mask, other=0.0), axis=0) * scale
    tl.store(out_ptr + n.to(tl.int64) * son + c * soc, red.to(out_ptr.dtype.element_ty), mask=c < C)


@cache
def _sm_count(device: torch.device) -> int:
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
        want = triton.cdiv(SpatialSplit.PROGRAMS_PER_SM * _sm_count(device), max(programs, 1))
        split = max(1, min(want, tiles, SpatialSplit.MAX_SPLIT))
    chunk = triton.cdiv(tiles, split) * block_hw
    num_warps = max(1, min(8, block_hw * block_c // 1024))
    return SpatialSplit(triton.cdiv(hw, chunk), chunk, block_hw, block_c, num_warps)


def dense_pixels(x: torch.Tensor) -> bool:
    """Whether pixel hw of x lives at hw * stride(3) (rows back to back, or a single row)."""
    return x.shape[2] == 1 or x.stride(2) == x.shape[3] * x.stride(3)


def spatial_reduce(x: torch.Tensor, dest: torch.Tensor, sp: SpatialSplit, kind: str,
                   scale: float = 1.0) -> None:
    """Stage 1 of a global pool: ``dest[n, s, c]`` = sum (times ``scale``) or max of x[n, c] over
    pixels [s*chunk, (s+1)*chunk). ``dest`` is an (N, sp.split, C) view (the fp32 partials, or the
    output itself when split is 1)."""
    n, c, h, w = x.shape
    if n * c == 0:
        return
    grid = (n * sp.split, triton.cdiv(c, sp.block_c))
    _spatial_reduce_kernel[grid](
        x, dest, c, h, w, sp.split, sp.chunk, scale, *x.stride(), *dest.stride(),
        IS_MAX=kind == "max", DENSE_HW=dense_pixels(x), BLOCK_HW=sp.block_hw,
        BLOCK_C=sp.block_c, num_warps=sp.num_warps,
    )


def check_pool_io(x: torch.Tensor, out: torch.Tensor, out_ranks: tuple[int, ...] = (4,)) -> None:
    """ValueError unless x is a 4D view and out one of ``out_ranks`` with x's (N, C), dtype and
    device (every pooling layer's call check)."""
    if x.dim() != 4 or out.dim() not in out_ranks:
        want = " or ".join(f"{r}D" for r in out_ranks)
        raise ValueError(f"x must be 4D (N, C, H, W) and out {want}, got shapes {tuple(x.shape)} "
                         f"and {tuple(out.shape)}")
    if out.shape[:2] != x.shape[:2]:
        raise ValueError(f"out must keep x's (N, C) = {tuple(x.shape[:2])}, "
                         f"got {tuple(out.shape[:2])}")
    if x.dtype not in _DTYPES or out.dtype != x.dtype:
        raise ValueError(f"x and out must share a dtype in {_DTYPES}, "
                         f"got {x.dtype} and {out.dtype}")
    if x.device != out.device:
        raise ValueError(f"x and out must be on one device, got {x.device} and {out.device}")


class GlobalPool2d:
    """Mean or max over H*W of an (N, C, H, W) view into an (N, C) or (N, C, 1, 1) view.

    The fp32 partials of a split reduction live in a workspace allocated on the first call that
    needs one and kept (calls are captured in CUDA graphs after a warm-up call)."""

    def __init__(self, kind: str) -> None:
        if kind not in ("max", "avg"):
            raise ValueError(f"kind must be 'max' or 'avg', got {kind!r}")
        self.kind = kind
        self._partials: torch.Tensor | None = None
        self._launches = 1

    @property
    def launches(self) -> int:
        """Kernels the last call launched: 2 when H*W was split over programs."""
        return self._launches

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        check_pool_io(x, out, (2, 4))
        if out.dim() == 4 and out.shape[2:] != (1, 1):
            raise ValueError(f"a global pool's out is (N, C) or (N, C, 1, 1), got {tuple(out.shape)}")
        n, c, h, w = x.shape
        if h * w == 0:
            raise ValueError(f"global pooling needs a nonempty input, got {(h, w)}")
        out2 = out[:, :, 0, 0] if out.dim() == 4 else out
        scale = 1.0 / (h * w)
        sp = spatial_split(n, c, h * w, x.device)
        self._launches = 1 if sp.split == 1 else 2
        if sp.split == 1:
            spatial_reduce(x, out2[:, None, :], sp, self.kind, scale)
            return
        partials = self.workspace(n * sp.split * c, x.device).view(n, sp.split, c)
        spatial_reduce(x, partials, sp, self.kind)
        block_c = min(64, triton.next_power_of_2(c))
        _partials_reduce_kernel[(n, triton.cdiv(c, block_c))](
            partials, out2, sp.split, c, scale, *out2.stride(), IS_MAX=self.kind == "max",
            BLOCK_S=triton.next_power_of_2(sp.split), BLOCK_C=block_c, num_warps=4)

    def workspace(self, numel: int, device: torch.device) -> torch.Tensor:
        """``numel`` fp32 elements of the layer's kept workspace (grown only on a larger shape)."""
        ws = self._partials
        if ws is None or ws.numel() < numel or ws.device != device:
            ws = self._partials = torch.empty(numel, dtype=torch.float32, device=device)
        return ws[:numel]
