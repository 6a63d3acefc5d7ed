"""Sink channels-last permutes through the ops that act on the last dim, until they meet their
inverse and both vanish (ConvNeXt's blocks, LayerNorm2d):

``permute(x, 0,2,3,1) -> layer_norm(last) -> linear -> gelu -> linear -> permute(0,3,1,2)``
``  =>  layer_norm(dim 1) -> conv1x1 -> gelu -> conv1x1``  on x itself.

In torch_gie's NHWC buffers both forms read the same memory; the rewrite lets the usual
rewrites apply (a per-channel scale after the block folds into the conv, the residual add
fuses into its epilogue) and runs the Linear layers as 1x1 convs.
Rules, with P = (0, 2, 3, 1): ``f(permute(x, P)) => permute(f'(x), P)`` for
layer_norm(last) -> layer_norm(dim 1), linear -> 1x1 conv, an elementwise activation, a
multiply or add by a last-dim constant (a layer scale) -> per-channel affine, and
``permute(permute(x, P), P^-1) => x``.
"""
import operator

import torch
from torch import fx

from .. import ops
from ..graph import is_canonical, spec
from .base import PassContext, PassResult

TO_CHANNELS_LAST = (0, 2, 3, 1)


def is_channels_last_permute(node: fx.Node) -> bool:
    return is_canonical(node, ops.permute) and tuple(spec(node).dims) == TO_CHANNELS_LAST \
        and len(node.args[0].meta.get("shape", ())) == 4


def _composes_to_identity(first: tuple[int, ...], second: tuple[int, ...]) -> bool:
    return all(first[second[i]] == i for i in range(len(first)))


def _channel_op(user: fx.Node):
    """(op, spec) computing ``user`` on the un-permuted tensor, or None when it does not commute."""
    if not is_canonical(user):
        return None
    s = spec(user)
    if is_canonical(user, ops.layer_norm) and s.dim == -1:
        return ops.layer_norm, ops.replace(s, dim=1)
    if is_canonical(user, ops.linear) and not s.epilogue.residual and len(user.args) == 1:
        weight = s.weight[:, :, None, None]
        return ops.conv2d, ops.ConvSpec(weight, s.bias, (1, 1), (0, 0), (1, 1), 1, s.epilogue,
                                        act_slope=s.act_slope)
    if is_canonical(user, ops.activation) and s.slope is None:  # a PReLU's slopes run along H here
        return ops.activation, s
    if (is_canonical(user, ops.mul) or is_canonical(user, ops.add)) and s.activation is None:
        vec = _last_dim_constant(user)
        if vec is not None:  # a layer scale or bias on the last dim: a per-channel affine after sinking
            ones, zeros = torch.ones_like(vec), torch.zeros_like(vec)
            scale, shift = (vec, zeros) if is_canonical(user, ops.mul) else (ones, vec)
            return ops.affine, ops.AffineSpec(scale, shift)
    return None


def _last_dim_constant(user: fx.Node) -> torch.Tensor | None:
    """The [C] vector of ``permuted op constant`` when the constant varies only along the last dim."""
    const = user.args[1]
    if not (isinstance(const, fx.Node) and const.op == "get_attr"):
        return None
    t = operator.attrgetter(const.target)(const.graph.owning_module)
    c = user.meta["shape"][-1]
    if not isinstance(t, torch.Tensor) or t.dim() > 4 or t.numel() not in (1, c) or \
            (t.numel() == c and t.shape[-1] != c):
        return None
    return t.detach().float().reshape(-1).expand(c).clone()


def sink_channel_permutes(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult()
    graph = gm.graph
    changed = True
    while changed:
        changed = False
        for perm in list(graph.nodes):
            if perm._erased or not is_channels_last_permute(perm):
                continue
            x = perm.args[0]
            for user in list(perm.users):
                if is_canonical(user, ops.permute) and _composes_to_identity(spec(perm).dims, spec(user).dims):
                    user.replace_all_uses_with(x)
                    graph.erase_node(user)
                    result.count("cancelled")
                    changed = True
                    continue
                op = _channel_op(user) if user.args[0] is perm else None
                if op is None:
                    continue
                fn, new_spec = op
                with graph.inserting_before(user):
                    moved = graph.create_node("call_function", fn, (x,), {}, name=f"{user.name}_nchw")
                    n, h, w, c = user.meta["shape"]
                    moved.meta.update(spec=new_spec, shape=(n, c, h, w), dtype=user.meta["dtype"],
                                      source=user.meta.get("source", user.name))
                    new_perm = graph.create_node("call_function", ops.permute, (moved,), {}, name=f"{user.name}_nhwc")
                    new_perm.meta.update(spec=ops.PermuteSpec(TO_CHANNELS_LAST), shape=user.meta["shape"],
                                         dtype=user.meta["dtype"], source=perm.meta.get("source", perm.name))
                user.replace_all_uses_with(new_perm)
                graph.erase_node(user)
                result.count("sunk")
                changed = True
            if not perm.users:
                graph.erase_node(perm)
    return result
