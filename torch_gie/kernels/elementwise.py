"""Per-channel elementwise ops the graph could not fuse into a conv or GEMM epilogue.

``ChannelAffine``: ``out = act(x * scale[c] + shift[c])`` (an eval-mode BatchNorm left unfolded, a
layer scale); ``Add``: ``out = act(a + b)`` (a residual join); ``Mul``: ``out = act(a * b)``;
``ChannelScale``: ``out = x * gate[n, c]`` (the squeeze-and-excitation multiply when no conv can
absorb it); ``Activation``: ``out = act(x)``. Add and Mul broadcast their operands (zero strides),
so a per-channel constant or an (N, C, 1, 1) gate needs no copy.

int8 (``quantize.arith``): ``Quantize`` (real -> codes) and ``Dequantize`` (codes -> real) mark
the boundaries between int8 and fp16 parts of a graph; Add and Mul take ``quant=LayerQuant``
(operands' and output's QParams). Codes are dequantized on load and requantized on store.

All are one kernel over strided views of rank 2 (N, C), 3 (N, L, D): tokens, channel = last dim,
as ``ops.channel_dim`` says) or 4 (N, C, H, W), seen as (N, C, H, W) with the channel the tiled,
usually contiguous, dim. Tiles are (pixels x channels), computing in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch_gie.activations import ActLike, act_constexprs, as_act
from torch_gie.kernels.epilogue import activate_channels
from torch_gie.kernels.quant import dequantize, requantize
from torch_gie.quantize.arith import LayerQuant, QParams

_DTYPES = (torch.float16, torch.float32)
_NO_B, _ADD_B, _MUL_B = 0, 1, 2  # what the kernel does with its second operand


def _tile(channels: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): all channels of a pixel up to 128 (one contiguous run per row even for
    C = 96), 4096 elements per tile: enough bytes in flight per program for a memory-bound op."""
    block_c = min(128, triton.next_power_of_2(channels))
    return 4096 // block_c, block_c


@triton.jit
def _channel_pointwise_kernel(
    # pointers (b, scale, shift, slope are unused unless their flag says otherwise)
    a_ptr, b_ptr, scale_ptr, shift_ptr, slope_ptr, out_ptr,
    # sizes; P = N * H * W pixels
    P, C, H, W,
    # strides of the (N, C, H, W) views; broadcast operands have zero strides
    san, sac, sah, saw,
    sbn, sbc, sbh, sbw,
    son, soc, soh, sow,
    # int8: the scales of a and b codes, 1 / scale of out codes (quant.arith)
    a_scale, b_scale, out_inv_scale,
    # meta-parameters: y = act(a * scale[c] + shift[c] (AFFINE) +/* b (B_OP))
    AFFINE: tl.constexpr, B_OP: tl.constexpr,
    ACT: tl.constexpr, ACT_ALPHA: tl.constexpr, ACT_BETA: tl.constexpr,
    # int8: which of a, b, out hold codes, and their zero points
    A_QUANT: tl.constexpr, A_ZP: tl.constexpr, B_QUANT: tl.constexpr, B_ZP: tl.constexpr,
    OUT_QUANT: tl.constexpr, OUT_ZP: tl.constexpr,
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
    if A_QUANT:
        y = dequantize(a, a_scale, A_ZP)
    else:
        y = a.to(tl.float32)
    if AFFINE:
        scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
        shift = tl.load(shift_ptr + c, mask=c_ok, other=0.0)
        y = y * scale[None, :] + shift[None, :]
    if B_OP != 0:
        b = tl.load(b_ptr + (n * sbn + h * sbh + w * sbw)[:, None] + c[None, :] * sbc, mask=mask)
        if B_QUANT:
            b = dequantize(b, b_scale, B_ZP)
        else:
            b = b.to(tl.float32)
        if B_OP == 1:
            y += b
        else:
            y *= b
    # Masked columns read channel 0's slope: activate_channels needs in-range channels.
    y = activate_channels(y, tl.where(c_ok, c, 0), slope_ptr, ACT, ACT_ALPHA, ACT_BETA)
    out_ptrs = out_ptr + (n * son + h * soh + w * sow)[:, None] + c[None, :] * soc
    if OUT_QUANT:
        tl.store(out_ptrs, requantize(y, out_inv_scale, OUT_ZP), mask=mask)
    else:
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _as_nchw(t: torch.Tensor) -> torch.Tensor:
    """The kernel's (N, C, H, W) view: (N, C) -> (N, C, 1, 1); tokens (N, L, D) -> (N, D, L, 1)."""
    if t.dim() == 2:
        return t[:, :, None, None]
    if t.dim() == 3:
        return t.permute(0, 2, 1)[..., None]
    return t


def channels_of(t: torch.Tensor) -> int:
    """The channel count of a rank-2/3/4 tensor: dim 1, or the last dim of (N, L, D) tokens."""
    return t.shape[-1] if t.dim() == 3 else t.shape[1]


def _check(name: str, t: torch.Tensor, shape: torch.Size, dtypes: tuple[torch.dtype, ...],
           device: torch.device) -> None:
    if t.dim() not in (2, 3, 4):
        raise ValueError(f"{name} must be 2D (N, C), 3D (N, L, D) or 4D (N, C, H, W), "
                         f"got shape {tuple(t.shape)}")
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {dtypes}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def _slope(act: ActLike, act_slope: torch.Tensor | None, channels: int | None) -> torch.Tensor | None:
    """PReLU's slope as a contiguous fp32 [C] tensor (checked against ``channels`` when known);
    None for every other activation."""
    act = as_act(act)
    if act is None or act.name != "prelu":
        return None
    if act_slope is None or act_slope.dim() != 1:
        raise ValueError(f"prelu needs act_slope, a 1D per-channel tensor, got "
                         f"{None if act_slope is None else tuple(act_slope.shape)}")
    if channels is not None and act_slope.shape[0] != channels:
        raise ValueError(f"act_slope must have {channels} entries (one per channel), "
                         f"got {act_slope.shape[0]}")
    return act_slope.detach().to(torch.float32).contiguous()


def _check_slope_channels(slope: torch.Tensor | None, out: torch.Tensor) -> None:
    if slope is None:
        return
    if slope.shape[0] != channels_of(out):
        raise ValueError(f"prelu's act_slope has {slope.shape[0]} entries but the tensor has "
                         f"{channels_of(out)} channels (shape {tuple(out.shape)})")
    if slope.device != out.device:
        raise ValueError(f"act_slope is on {slope.device}, the tensor on {out.device}")


def quant_args(a: QParams | None = None, b: QParams | None = None,
               out: QParams | None = None) -> dict:
    """The kernel's int8 arguments: the QParams of a, b and out where they hold codes."""
    return dict(a_scale=1.0 if a is None else a.scale, b_scale=1.0 if b is None else b.scale,
                out_inv_scale=1.0 if out is None else out.inv_scale,
                A_QUANT=a is not None, A_ZP=0 if a is None else a.zero_point,
                B_QUANT=b is not None, B_ZP=0 if b is None else b.zero_point,
                OUT_QUANT=out is not None, OUT_ZP=0 if out is None else out.zero_point)


_NO_QUANT = quant_args()


def _launch(a: torch.Tensor, b: torch.Tensor | None, b_op: int, out: torch.Tensor, act,
            slope: torch.Tensor | None = None, scale: torch.Tensor | None = None,
            shift: torch.Tensor | None = None, quant: dict = _NO_QUANT) -> None:
    """One kernel over out's elements; a and b are already expanded to out's shape; ``quant``
    the int8 arguments (``quant_args``)."""
    a4, o4 = _as_nchw(a), _as_nchw(out)
    b4 = a4 if b is None else _as_nchw(b)
    n, c, h, w = o4.shape
    p = n * h * w
    if p == 0 or c == 0:
        return
    block_p, block_c = _tile(c)
    grid = (triton.cdiv(p, block_p), triton.cdiv(c, block_c))
    _channel_pointwise_kernel[grid](
        a4, b4, a4 if scale is None else scale, a4 if shift is None else shift,
        a4 if slope is None else slope, o4,
        p, c, h, w, *a4.stride(), *b4.stride(), *o4.stride(), **quant,
        AFFINE=scale is not None, B_OP=b_op, **act_constexprs(act),
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4,
    )


class ChannelAffine:
    """``out = act(x * scale[c] + shift[c])`` bound at build time; scale, shift (and a prelu slope)
    kept in fp32. x and out: same shape, the layer's dtype, rank 2/3/4 (channel as ``channels_of``)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, activation: ActLike = None,
                 dtype: torch.dtype = torch.float16, act_slope: torch.Tensor | None = None) -> None:
        if scale.dim() != 1 or scale.shape != shift.shape:
            raise ValueError(f"scale and shift must be 1D of one length (C,), got shapes "
                             f"{tuple(scale.shape)} and {tuple(shift.shape)}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
        self.scale = scale.detach().to(torch.float32).contiguous()
        self.shift = shift.detach().to(device=scale.device, dtype=torch.float32).contiguous()
        self.activation = as_act(activation)
        self.act_slope = _slope(activation, act_slope, scale.shape[0])
        if self.act_slope is not None:
            self.act_slope = self.act_slope.to(scale.device)
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        _check("x", x, x.shape, (self.dtype,), self.scale.device)
        _check("out", out, x.shape, (self.dtype,), x.device)
        if channels_of(x) != self.scale.shape[0]:
            raise ValueError(f"x must have {self.scale.shape[0]} channels (dim 1; the last dim of "
                             f"3D tokens), got shape {tuple(x.shape)}")
        _launch(x, None, _NO_B, out, self.activation, self.act_slope, self.scale, self.shift)


class _Binary:
    """``out = act(a op b)``; a and b broadcast (PyTorch rules) to out's shape. Each operand has
    out's dtype or is fp32 (a constant kept exact); the arithmetic is fp32.

    int8: ``dtype=torch.int8, quant=LayerQuant(...)``: a holds codes of ``quant.input``; b codes
    of ``quant.residual``, or real fp16/fp32 values when that is None; out codes of
    ``quant.output``, or real values in ``quant.out_dtype`` when that is None."""

    _OP = _NO_B

    def __init__(self, activation: ActLike = None, act_slope: torch.Tensor | None = None, *,
                 dtype: torch.dtype | None = None, quant: LayerQuant | None = None) -> None:
        if (dtype == torch.int8) != (quant is not None):
            raise ValueError(f"an int8 {type(self).__name__} needs quant=LayerQuant(...) and only an "
                             f"int8 one takes it, got dtype {dtype} and quant {quant}")
        if quant is not None and quant.output is None and quant.out_dtype not in _DTYPES:
            raise ValueError(f"quant.out_dtype must be one of {_DTYPES}, got {quant.out_dtype}")
        self.activation = as_act(activation)
        self.act_slope = _slope(activation, act_slope, None)
        self.quant = quant
        self._quant_args = _NO_QUANT if quant is None else quant_args(
            quant.input, quant.residual, quant.output)

    def __call__(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
        shape = broadcast_shape(a, b)
        q = self.quant
        if q is None:
            out_dtypes = _DTYPES
            a_dtypes = b_dtypes = (out.dtype, torch.float32)
        else:
            out_dtypes, a_dtypes = (q.store_dtype,), (torch.int8,)
            b_dtypes = (torch.int8,) if q.residual is not None else _DTYPES
        _check("out", out, shape, out_dtypes, a.device)
        _check("a", a.expand(shape), shape, a_dtypes, out.device)
        _check("b", b.expand(shape), shape, b_dtypes, out.device)
        _check_slope_channels(self.act_slope, out)
        _launch(a.expand(shape), b.expand(shape), self._OP, out, self.activation, self.act_slope,
                quant=self._quant_args)


class Add(_Binary):
    """``out = act(a + b)`` for strided, possibly broadcast views, e.g. a residual join (int8:
    two tensors of codes with their own QParams, requantized to the output's or stored real)."""

    _OP = _ADD_B


class Mul(_Binary):
    """``out = act(a * b)`` for strided, possibly broadcast views, e.g. a gate (N, C, 1, 1)."""

    _OP = _MUL_B


class ChannelScale:
    """``out[n, c, ...] = x[n, c, ...] * gate[n, c]``: the squeeze-and-excitation multiply. x and
    out share shape and dtype (rank 2/3/4, channel as ``channels_of``); gate is (N, C) or
    (N, C, 1, 1) in x's dtype or fp32, any strides."""

    def __call__(self, x: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> None:
        _check("x", x, x.shape, _DTYPES, x.device)
        _check("out", out, x.shape, (x.dtype,), x.device)
        n, c = x.shape[0], channels_of(x)
        if gate.shape not in ((n, c), (n, c, 1, 1)):
            raise ValueError(f"gate must be (N, C) = {(n, c)} or (N, C, 1, 1), "
                             f"got {tuple(gate.shape)}")
        if gate.dtype not in (x.dtype, torch.float32) or gate.device != x.device:
            raise ValueError(f"gate must be {x.dtype} or torch.float32 on {x.device}, "
                             f"got {gate.dtype} on {gate.device}")
        g = gate.reshape(n, c) if gate.dim() == 4 else gate  # a view: (N, C, 1, 1) has no copy
        if x.dim() == 3:
            g = g[:, None, :]
        elif x.dim() == 4:
            g = g[:, :, None, None]
        _launch(x, g.expand(x.shape), _MUL_B, out, None)


class Activation:
    """``out = act(x)`` for an activation no producer could absorb (prelu: ``act_slope`` [C])."""

    def __init__(self, activation: ActLike, act_slope: torch.Tensor | None = None) -> None:
        self.activation = as_act(activation)
        self.act_slope = _slope(activation, act_slope, None)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        _check("x", x, x.shape, _DTYPES, x.device)
        _check("out", out, x.shape, (x.dtype,), x.device)
        _check_slope_channels(self.act_slope, out)
        _launch(x, None, _NO_B, out, self.activation, self.act_slope)


class Quantize:
    """Real fp16/fp32 values -> int8 codes of ``qparams`` (``quant.arith.quantize``), the entry
    into an int8 part of a graph. x and out: the same shape (rank 2/3/4, any strides, e.g. a
    channel slice of a wider NHWC buffer); the layout is kept."""

    def __init__(self, qparams: QParams) -> None:
        self.qparams = qparams
        self._quant_args = quant_args(out=qparams)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        _check("x", x, x.shape, _DTYPES, x.device)
        _check("out", out, x.shape, (torch.int8,), x.device)
        _launch(x, None, _NO_B, out, None, quant=self._quant_args)


class Dequantize:
    """int8 codes of ``qparams`` -> real values in out's dtype (``out_dtype``: fp16 or fp32), the
    exit from an int8 part of a graph; strided views as ``Quantize``."""

    def __init__(self, qparams: QParams, out_dtype: torch.dtype = torch.float16) -> None:
        if out_dtype not in _DTYPES:
            raise ValueError(f"out_dtype must be one of {_DTYPES}, got {out_dtype}")
        self.qparams = qparams
        self.out_dtype = out_dtype
        self._quant_args = quant_args(a=qparams)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        _check("x", x, x.shape, (torch.int8,), x.device)
        _check("out", out, x.shape, (self.out_dtype,), x.device)
        _launch(x, None, _NO_B, out, None, quant=self._quant_args)


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                   out: torch.Tensor | None = None, activation: ActLike = None,
                   act_slope: torch.Tensor | None = None) -> torch.Tensor:
    """``act(x * scale[c] + shift[c])`` into ``out`` (allocated like x when not given)."""
    if out is None:
        out = torch.empty_like(x)
    ChannelAffine(scale, shift, activation, x.dtype, act_slope)(x, out)
    return out


def broadcast_shape(a: torch.Tensor, b: torch.Tensor) -> torch.Size:
    """The shape a and b broadcast to (PyTorch rules); ValueError when they do not."""
    try:
        return torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} do not broadcast") from None


def _binary(layer: _Binary, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        out = torch.empty(broadcast_shape(a, b), dtype=a.dtype, device=a.device)
    layer(a, b, out)
    return out


def add(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None,
        activation: ActLike = None, act_slope: torch.Tensor | None = None) -> torch.Tensor:
    """``act(a + b)`` into ``out`` (allocated, contiguous, when not given)."""
    return _binary(Add(activation, act_slope), a, b, out)


def mul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None,
        activation: ActLike = None, act_slope: torch.Tensor | None = None) -> torch.Tensor:
    """``act(a * b)`` into ``out`` (allocated, contiguous, when not given)."""
    return _binary(Mul(activation, act_slope), a, b, out)
