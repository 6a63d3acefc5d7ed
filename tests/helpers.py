"""Test utilities: models with non-trivial BatchNorm statistics, relative error, graph helpers."""
import torch
from torch import nn
from torch.nn import functional as F

from torch_gie import ops
from torch_gie.activations import apply_activation
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


CONV_TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def poisoned(shape, dtype, device, channels_last=True) -> torch.Tensor:
    """A NaN-filled output, so any element a kernel fails to write fails the check."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.full(shape, float("nan"), dtype=dtype, device=device).contiguous(memory_format=fmt)


def conv_reference(x, w, b, stride, padding, dilation, groups, act=None, res=None, post=None):
    """fp32 eager ``post(act(conv(x) + b) + res)`` on the same (already rounded) inputs."""
    y = F.conv2d(x.float(), w.float(), None if b is None else b.float(), stride, padding, dilation, groups)
    y = apply_activation(y, act)
    if res is not None:
        y = y + res.float()
    return apply_activation(y, post)


def check_written(out, ref, dtype):
    """Every element written (no poison left) and within the dtype's tolerance."""
    assert torch.isfinite(out).all(), "unwritten (poisoned) output elements"
    assert rel_err(out, ref) < CONV_TOL[dtype]


def check_layer_fp16(x, ref, layer):
    """Run a bound conv layer into a poisoned fp16 output and check it (GPU real-shape tests)."""
    out = poisoned(tuple(ref.shape), torch.float16, x.device)
    layer(x, [out])
    if out.is_cuda:
        torch.cuda.synchronize()
    assert torch.isfinite(out).all(), layer.config
    assert rel_err(out, ref) < 1e-2, layer.config


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


__all__ = ["check_layer_fp16", "poisoned", "conv_reference", "check_written", "CONV_TOL", "channel_slice",
           "assert_rest_poisoned", "randomize_", "calibrate_batchnorm_", "rel_err", "count", "captured",
           "check_pass", "ops"]
