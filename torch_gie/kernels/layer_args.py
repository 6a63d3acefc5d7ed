"""Build-time argument checks shared by the bound conv and Linear layers: int pairs, conv
padding (symmetric or TensorFlow-style asymmetric), and the fused activations with PReLU's
per-channel slope, so every kernel family accepts the same forms and fails the same way.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from torch_gie.activations import CHANNEL_PARAM_ACTIVATIONS, Act, ActLike, act_constexprs, as_act

IntPair = int | Sequence[int]
# int, (h, w) symmetric, or (top, bottom, left, right): TensorFlow "SAME" / a folded ZeroPad2d.
Padding = int | Sequence[int]


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
