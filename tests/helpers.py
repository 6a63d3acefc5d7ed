"""Test utilities: models with non-trivial BatchNorm statistics, relative error, graph helpers."""
import torch
from torch import nn

from torch_gie import ops
from torch_gie.capture import capture
from torch_gie.graph import is_canonical, run_graph
from torch_gie.passes import PassContext
from torch_gie.testing import calibrate_batchnorm_, randomize_, rel_err


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


__all__ = ["randomize_", "calibrate_batchnorm_", "rel_err", "count", "captured", "check_pass", "ops"]
