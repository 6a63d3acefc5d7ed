"""Per-channel elementwise ops the graph could not fuse into a conv or GEMM epilogue.

``channel_affine``: ``out = act(x * scale[c] + shift[c])`` (an eval-mode BatchNorm left unfolded);
``add``: ``out = act(a + b)`` (a residual join); ``Activation``: ``out = act(x)`` (one left
alone). All are one kernel over (N, C, H, W) or (N, C) strided views, tiled (pixels x channels)
with channels contiguous, computing in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch_gie.activations import activation_code
from torch_gie.kernels.epilogue import activate

_DTYPES = (torch.float16, torch.float32)


def _tile(channels: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): up to 64 contiguous channels, 4096 elements per tile."""
    block_c = min(64, triton.next_power_of_2(channels))
    return 4096 // block_c, block_c


@triton.jit
def _channel_pointwise_kernel(
    # pointers (b_ptr / scale_ptr / shift_ptr are unused unless their flag is set)
    a_ptr, b_ptr, scale_ptr, shift_ptr, out_ptr,
    # sizes; P = N * H * W pixels
    P, C, H, W,
    # strides of the logical NCHW views
    san, sac, sah, saw,
    sbn, sbc, sbh, sbw,
    son, soc, soh, sow,
    # meta-parameters: y = act(a * scale[c] + shift[c] (HAS_AFFINE) + b (HAS_B))
    HAS_AFFINE: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < P
    c_ok = c < C
    mask = p_ok[:, None] & c_ok[None, :]
    w = p % W
    h = (p // W) % H
    n = (p // (W * H)).to(tl.int64)  # int64: large batches of activations pass 2**31 elements

    a = tl.load(a_ptr + (n * san + h * sah + w * saw)[:, None] + c[None, :] * sac, mask=mask)
    y = a.to(tl.float32)
    if HAS_AFFINE:
        scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
        shift = tl.load(shift_ptr + c, mask=c_ok, other=0.0)
        y = y * scale[None, :] + shift[None, :]
    if HAS_B:
        b = tl.load(b_ptr + (n * sbn + h * sbh + w * sbw)[:, None] + c[None, :] * sbc, mask=mask)
        y += b.to(tl.float32)
    y = activate(y, ACT)
    out_ptrs = out_ptr + (n * son + h * soh + w * sow)[:, None] + c[None, :] * soc
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _as_nchw(t: torch.Tensor) -> torch.Tensor:
    # (N, C) becomes (N, C, 1, 1): a view, so one kernel serves both ranks.
    return t[:, :, None, None] if t.dim() == 2 else t


def _check_same(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.dim() not in (2, 4):
        raise ValueError(f"{name} must be 4D (N, C, H, W) or 2D (N, C), got shape {tuple(t.shape)}")
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have shape {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype not in _DTYPES or t.dtype != ref.dtype:
        raise ValueError(f"{name} must be {ref.dtype} (one of {_DTYPES}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device}, got {t.device}")


def _launch(a: torch.Tensor, b: torch.Tensor | None, scale: torch.Tensor | None,
            shift: torch.Tensor | None, out: torch.Tensor, act: int) -> None:
    a4, o4 = _as_nchw(a), _as_nchw(out)
    b4 = a4 if b is None else _as_nchw(b)
    n, c, h, w = a4.shape
    p = n * h * w
    if p == 0 or c == 0:
        return
    block_p, block_c = _tile(c)
    grid = (triton.cdiv(p, block_p), triton.cdiv(c, block_c))
    _channel_pointwise_kernel[grid](
        a4, b4, a4 if scale is None else scale, a4 if shift is None else shift, o4,
        p, c, h, w, *a4.stride(), *b4.stride(), *o4.stride(),
        HAS_AFFINE=scale is not None, HAS_B=b is not None, ACT=act,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4,
    )


class ChannelAffine:
    """``out = act(x * scale[c] + shift[c])`` bound at build time; scale, shift kept in fp32."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, activation: str | None = None,
                 dtype: torch.dtype = torch.float16) -> None:
        if scale.dim() != 1 or scale.shape != shift.shape:
            raise ValueError(f"scale and shift must be 1D of one length (C,), got shapes "
                             f"{tuple(scale.shape)} and {tuple(shift.shape)}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
        self.scale = scale.detach().to(torch.float32).contiguous()
        self.shift = shift.detach().to(device=scale.device, dtype=torch.float32).contiguous()
        self.activation = activation
        self._act = activation_code(activation)
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        _check_same("x", x, x)
        _check_same("out", out, x)
        if x.dtype != self.dtype:
            raise ValueError(f"x must be {self.dtype} (the layer's dtype), got {x.dtype}")
        if x.shape[1] != self.scale.shape[0]:
            raise ValueError(f"x must have {self.scale.shape[0]} channels (dim 1), "
                             f"got shape {tuple(x.shape)}")
        if x.device != self.scale.device:
            raise ValueError(f"x is on {x.device} but scale/shift are on {self.scale.device}")
        _launch(x, None, self.scale, self.shift, out, self._act)


class Add:
    """``out = act(a + b)`` for same-shape strided views, e.g. a residual join."""

    def __init__(self, activation: str | None = None) -> None:
        self.activation = activation
        self._act = activation_code(activation)

    def __call__(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
        _check_same("a", a, a)
        _check_same("b", b, a)
        _check_same("out", out, a)
        _launch(a, b, None, None, out, self._act)


class Activation:
    """``out = act(x)`` for an activation no producer could absorb."""

    def __init__(self, activation: str) -> None:
        self.activation = activation
        self._act = activation_code(activation)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        _check_same("x", x, x)
        _check_same("out", out, x)
        _launch(x, None, None, None, out, self._act)


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                   out: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    """``act(x * scale[c] + shift[c])`` into ``out`` (allocated like x when not given)."""
    if out is None:
        out = torch.empty_like(x)
    ChannelAffine(scale, shift, activation, x.dtype)(x, out)
    return out


def add(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None,
        activation: str | None = None) -> torch.Tensor:
    """``act(a + b)`` into ``out`` (allocated like a when not given)."""
    if out is None:
        out = torch.empty_like(a)
    Add(activation)(a, b, out)
    return out
