"""Argument checks shared by the bound conv and Linear layers: at build time int pairs, conv
padding (symmetric or TensorFlow-style asymmetric), output sizes, and the fused activations with
PReLU's per-channel slope; at call time the conv's input, outputs, residual and gate. Every
kernel family accepts the same forms and fails the same way (ValueError: expected vs got).
Also the vector alignment of channel-contiguous operands (``vector_width``, ``aligned_base``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from torch_gie.activations import CHANNEL_PARAM_ACTIVATIONS, Act, ActLike, act_constexprs, as_act

IntPair = int | Sequence[int]
# int, (h, w) symmetric, or (top, bottom, left, right): TensorFlow "SAME" / a folded ZeroPad2d.
Padding = int | Sequence[int]
# The widest global load/store one thread issues (128 bits). Triton knows an int argument's
# alignment only when it is a multiple of 16 (or 1), so a pixel stride of 72 channels hides that
# every channel row starts 16-byte aligned and loads fall back to 2 bytes at a time; kernels
# therefore take such ints in units of a constexpr VEC (``vector_width``) and multiply back.
VECTOR_BYTES = 16
_INT32_MAX = 2**31 - 1


def as_pair(v: IntPair, name: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(isinstance(i, int) for i in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return pair


def as_padding(padding: Padding) -> tuple[int, ...]:
    """(ph, pw) when symmetric, else (top, bottom, left, right). Symmetric padding keeps its pair
    form so the layer attributes (and so the tuner's cache keys) of existing layers do not change."""
    pads = (padding,) * 2 if isinstance(padding, int) else tuple(padding)
    if len(pads) not in (2, 4) or not all(isinstance(p, int) for p in pads):
        raise ValueError(f"padding must be an int, a pair (h, w) or (top, bottom, left, right) of "
                         f"ints, got {padding!r}")
    if min(pads) < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    if len(pads) == 4 and pads[0] == pads[1] and pads[2] == pads[3]:
        pads = (pads[0], pads[2])
    return pads


def four_sided(padding: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a padding normalized by ``as_padding``."""
    return (padding[0], padding[0], padding[1], padding[1]) if len(padding) == 2 else padding


def bind_activations(activation: ActLike, post_activation: ActLike, act_slope: torch.Tensor | None,
                     channels: int, device: torch.device
                     ) -> tuple[Act | None, Act | None, torch.Tensor | None, dict]:
    """(activation, post_activation, slope, kernel constexprs) for a layer of ``channels`` output
    channels. PReLU's slope (``act_slope``, [channels]) serves whichever of the two is prelu; it
    becomes fp32 on ``device``. The constexprs are ACT, ACT_ALPHA, ACT_BETA, POST_ACT, ..."""
    act, post = as_act(activation), as_act(post_activation)
    param = [a for a in (act, post) if a is not None and a.name in CHANNEL_PARAM_ACTIVATIONS]
    if len(param) == 2:
        raise ValueError("activation and post_activation are both prelu; a layer holds one slope "
                         "vector (act_slope), so at most one of them can be prelu")
    if param and act_slope is None:
        raise ValueError(f"{param[0].name} needs act_slope, a tensor of shape ({channels},)")
    if not param and act_slope is not None:
        raise ValueError(f"act_slope given, but neither activation ({act}, {post}) is prelu")
    slope = None
    if act_slope is not None:
        if tuple(act_slope.shape) != (channels,):
            raise ValueError(f"act_slope must have shape ({channels},) (one slope per output "
                             f"channel), got {tuple(act_slope.shape)}")
        slope = act_slope.detach().to(device, torch.float32).contiguous()
    return act, post, slope, {**act_constexprs(act, "ACT"), **act_constexprs(post, "POST_ACT")}


def conv_output_size(size: int, k: int, stride: int, pad_before: int, dil: int,
                     pad_after: int | None = None) -> int:
    """Output length along one axis; padding is symmetric unless ``pad_after`` is given."""
    pad_after = pad_before if pad_after is None else pad_after
    return (size + pad_before + pad_after - dil * (k - 1) - 1) // stride + 1


def problem_pixels(output_hw: Callable[[int, int], tuple[int, int]], input_hw: IntPair | None,
                   batch: int | None) -> int | None:
    """N·OH·OW for the input size given at build time, or None when it is not given."""
    if input_hw is None and batch is None:
        return None
    if input_hw is None or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"input_hw and batch >= 1 go together, got input_hw={input_hw!r}, "
                         f"batch={batch!r}")
    oh, ow = output_hw(*as_pair(input_hw, "input_hw"))
    if min(oh, ow) < 1:
        raise ValueError(f"input_hw={input_hw!r} is too small for this convolution")
    return batch * oh * ow


def check_conv_input(x: torch.Tensor, channels: int, dtype: torch.dtype,
                     device: torch.device) -> tuple[int, int, int, int]:
    """x's shape (N, C, H, W) after checking it is the layer's input."""
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"x must be 4D (N, {channels}, H, W), got shape {tuple(x.shape)}")
    if x.dtype != dtype:
        raise ValueError(f"x dtype: expected {dtype}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"x is on {x.device}, weights on {device}")
    return tuple(x.shape)


def check_conv_outputs(outs: Sequence[torch.Tensor], residual: torch.Tensor | None, num_seg: int,
                       shape: tuple[int, int, int, int], x: torch.Tensor,
                       out_dtype: torch.dtype | None = None,
                       res_dtypes: tuple[torch.dtype, ...] | None = None) -> list[int]:
    """Check the output views (already split by ``segment_args``) and the residual against the
    full output ``shape`` (N, C_out, OH, OW) of input x; returns the residual's strides. Outputs
    and residual are in x's dtype unless ``out_dtype`` / ``res_dtypes`` say otherwise (an int8
    layer: codes or real values)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    res_dtypes = (x.dtype,) if res_dtypes is None else res_dtypes
    n, c_out, oh, ow = shape
    if outs[0].dtype != out_dtype or outs[0].device != x.device:
        raise ValueError(f"outs: expected {out_dtype} on {x.device}, "
                         f"got {outs[0].dtype} on {outs[0].device}")
    for i, t in enumerate(outs):
        if (t.shape[0], t.shape[2], t.shape[3]) != (n, oh, ow):
            raise ValueError(f"outs[{i}] has shape {tuple(t.shape)}, expected "
                             f"(N, C, OH, OW) = ({n}, C, {oh}, {ow}) for x {tuple(x.shape)}")
    if residual is None:
        return [0, 0, 0, 0]
    if num_seg != 1:
        raise ValueError(f"a residual needs a single output view, got {num_seg}")
    if tuple(residual.shape) != shape:
        raise ValueError(f"residual shape: expected {shape}, got {tuple(residual.shape)}")
    if residual.dtype not in res_dtypes or residual.device != x.device:
        expected = res_dtypes[0] if len(res_dtypes) == 1 else f"one of {res_dtypes}"
        raise ValueError(f"residual: expected {expected} on {x.device}, "
                         f"got {residual.dtype} on {residual.device}")
    return list(residual.stride())


def check_gate(gate: torch.Tensor, x: torch.Tensor, channels: int, dtype: torch.dtype) -> None:
    """A conv's input gate: one factor per (image, input channel) as (N, C) or (N, C, 1, 1), in
    the layer's dtype or fp32, on x's device."""
    n = x.shape[0]
    if tuple(gate.shape) not in ((n, channels), (n, channels, 1, 1)):
        raise ValueError(f"gate: expected shape ({n}, {channels}) or ({n}, {channels}, 1, 1) (one "
                         f"factor per image and input channel), got {tuple(gate.shape)}")
    if gate.dtype not in (dtype, torch.float32) or gate.device != x.device:
        raise ValueError(f"gate: expected {dtype} or torch.float32 on {x.device}, "
                         f"got {gate.dtype} on {gate.device}")


def vector_width(element_size: int, values: Sequence[int]) -> int:
    """The widest power of two VEC <= VECTOR_BYTES / element_size dividing every value: the
    elements per vector access when strides, offsets and channel counts are passed as value //
    VEC. 1 when a value needs 64 bits (value // VEC * VEC must not overflow int32 in the kernel)."""
    if any(abs(v) > _INT32_MAX for v in values):
        return 1
    vec = max(1, VECTOR_BYTES // element_size)
    while vec > 1 and any(v % vec for v in values):
        vec //= 2
    return vec


def aligned_base(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(base, lead): a view of t's storage starting ``lead`` elements before t at a
    VECTOR_BYTES-aligned address, so a kernel reading ``base + lead + ...`` gets a pointer Triton
    knows is aligned (it only checks the argument's address) and an offset whose alignment it
    can be told. A channel slice at channel 4 of an fp16 buffer has lead 4. (t, 0) when t is
    aligned already or its storage starts too late to step back."""
    lead, rem = divmod(t.data_ptr() % VECTOR_BYTES, t.element_size())
    if lead == 0 or rem or lead > t.storage_offset():
        return t, 0
    return t.as_strided((1,), (1,), t.storage_offset() - lead), lead
