"""``runtime/program.py``: what ``profile()`` counts per step (bytes and FLOPs at least moved)."""
import torch
from torch import fx

from torch_gie.runtime.program import step_cost
from torch_gie.runtime.steps import KernelStep


def _relu_node() -> fx.Node:
    graph = fx.Graph()
    return graph.call_function(torch.relu, (graph.placeholder("x"),))


def test_step_cost_of_a_kernel_without_a_layer():
    """A fallback's kernel is a plain function with no ``layer`` (and no weights): its cost is
    its input and output once. (profile() once raised TypeError here, for any engine with a
    fallback.)"""
    x, out = torch.randn(2, 8), torch.empty(2, 8)
    step = KernelStep(_relu_node(), lambda ins, outs: outs[0].copy_(torch.relu(ins[0])), [0], [out], "fallback")
    assert step_cost(step, [x]) == (2 * 8 * 4 * 2, 0)


def test_step_cost_counts_a_layers_tensors_once():
    class Layer:
        def __init__(self):
            self.weight, self._private = torch.randn(8), torch.randn(100)

    def kernel(ins, outs):
        pass
    kernel.layer = Layer()
    x, out = torch.randn(2, 8), torch.empty(2, 8)
    step = KernelStep(_relu_node(), kernel, [0, 0], [out], "triton")  # the same input twice
    assert step_cost(step, [x]) == (2 * 8 * 4 * 2 + 8 * 4, 0)
