"""Test utilities: models with non-trivial BatchNorm statistics, relative error, graph helpers."""
import torch
from torch import nn

from torch_gie import ops
from torch_gie.capture import capture
from torch_gie.graph import is_canonical, run_graph
from torch_gie.passes import PassContext
from torch_gie.testing import calibrate_batchnorm_, randomize_, rel_err


def channel_slice(shape, dtype, device, fill=None, extra=5):
    """Channels [2, 2 + C) of a wider buffer (channels_last when 4D), as a removed concat leaves
    them: returns (buffer, view). ``fill=float("nan")`` poisons it."""
    n, c, *hw = shape
    full = (n, c + extra, *hw)
    if fill is None:
        buf = torch.randn(full, device=device).to(dtype)
    else:
        buf = torch.full(full, fill, dtype=dtype, device=device)
    if buf.dim() == 4:
        buf = buf.contiguous(memory_format=torch.channels_last)
    return buf, buf[:, 2:2 + c]


def assert_rest_poisoned(buf, c):
    """Everything outside channels [2, 2 + c) of ``buf`` still holds the poison, the slice none."""
    rest = torch.cat([buf[:, :2], buf[:, 2 + c:]], dim=1)
    assert torch.isnan(rest).all()
    assert not torch.isnan(buf[:, 2:2 + c]).any()


def count(gm, op) -> int:
    return sum(1 for n in gm.graph.nodes if is_canonical(n, op))


def captured(model: nn.Module, *inputs):
    model.eval()
    return capture(model, inputs)


def check_pass(rewrite, model: nn.Module, *inputs, tol: float = 1e-5):
    """Capture ``model``, run ``rewrite``, check the graph still computes the model; returns
    (graph, result)."""
    model.eval()
    gm = capture(model, inputs)
    result = rewrite(gm, PassContext())
    gm.graph.lint()
    with torch.no_grad():
        ref = model(*inputs)
    out = run_graph(gm, *inputs)
    assert rel_err(out, ref) < tol
    return gm, result


__all__ = ["channel_slice", "assert_rest_poisoned", "randomize_", "calibrate_batchnorm_", "rel_err", "count",
           "captured", "check_pass", "ops"]
