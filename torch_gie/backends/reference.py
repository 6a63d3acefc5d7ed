"""The reference backend: every canonical op runs its PyTorch reference implementation
(``torch_gie.ops``) and copies the result into its planned view(s). Slow but obviously right:
it checks the plan (placements, concat slices, lifetimes) independently of the kernels."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx

from .. import ops
from ..graph import spec
from ..runtime.steps import Kernel


def cast_spec(node: fx.Node, dtype: torch.dtype):
    """The node's spec with its constant tensors converted once to ``dtype``."""
    s = spec(node)
    fields = {k: v.to(dtype) for k, v in vars(s).items() if isinstance(v, torch.Tensor)}
    return ops.replace(s, **fields) if fields else s


def lower(node: fx.Node, dtype: torch.dtype, device: torch.device) -> Kernel:
    s = cast_spec(node, dtype)
    s = ops.replace(s, **{k: v.to(device) for k, v in vars(s).items() if isinstance(v, torch.Tensor)})
    fn = node.target

    def run(inputs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]) -> None:
        result = fn(s, *inputs)
        for out, value in zip(outs, result if isinstance(result, tuple) else (result,)):
            out.copy_(value)

    return run
