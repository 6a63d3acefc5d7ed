"""x * gate(x) written by hand becomes the fused activation it computes."""
import pytest
import torch
from helpers import check_pass, count, ops
from torch import nn
from torch.nn import functional as F

from torch_gie.graph import spec
from torch_gie.passes.fuse_activation_patterns import fuse_activation_patterns


class HandWritten(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how, self.conv = how, nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "silu":
            return y * torch.sigmoid(y)
        if self.how == "silu_swapped":
            return torch.sigmoid(y) * y
        if self.how == "hardswish":
            return y * F.hardsigmoid(y)
        return y * torch.tanh(F.softplus(y))


@pytest.mark.parametrize("how,name", [("silu", "silu"), ("silu_swapped", "silu"), ("hardswish", "hardswish"),
                                      ("mish", "mish")])
def test_hand_written_activation_becomes_one_op(how, name):
    gm, result = check_pass(fuse_activation_patterns, HandWritten(how), torch.randn(2, 3, 7, 5))
    acts = [n for n in gm.graph.nodes if n.target is ops.activation]
    assert count(gm, ops.mul) == 0 and len(acts) == 1 and spec(acts[0]).act == name
    assert result.counts["fused"] == 1


def test_gate_of_another_tensor_is_left_alone():
    class Gated(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x + 1)  # the gate reads x + 1, not x

    gm, result = check_pass(fuse_activation_patterns, Gated(), torch.randn(2, 3, 4, 4))
    assert count(gm, ops.mul) == 1 and not result.counts


def test_gate_with_another_consumer_is_left_alone():
    class Shared(nn.Module):
        def forward(self, x):
            g = torch.sigmoid(x)
            return x * g + g

    gm, _ = check_pass(fuse_activation_patterns, Shared(), torch.randn(2, 3, 4, 4))
    assert count(gm, ops.mul) == 1
