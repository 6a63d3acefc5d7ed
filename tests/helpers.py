"""Test utilities: models with non-trivial BatchNorm statistics, relative error, graph helpers."""
import torch
from torch import nn

from torch_gie import ops
from torch_gie.capture import capture
from torch_gie.graph import is_canonical, run_graph
from torch_gie.passes import PassContext


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer random statistics and affine parameters, and re-draw zero-initialized
    weights, so folding and fusion are tested on non-trivial values (not on identities or zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.75)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            for p in m.parameters(recurse=False):
                if p.dim() > 0 and p.abs().max() == 0:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref||, over all tensors of a (possibly nested) output."""
    if isinstance(ref, (tuple, list)):
        assert isinstance(out, (tuple, list)) and len(out) == len(ref)
        return max(rel_err(o, r) for o, r in zip(out, ref))
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output has NaN/inf"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


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


__all__ = ["randomize_", "rel_err", "count", "captured", "check_pass", "ops"]
