import torch
from helpers import check_pass, count, ops, randomize_
from torch import nn

from torch_gie.passes.fuse_elementwise_activation import fuse_elementwise_activation


def test_bn_relu_after_input_becomes_one_affine():
    model = randomize_(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()))
    gm, result = check_pass(fuse_elementwise_activation, model, torch.randn(2, 3, 5, 5))
    assert count(gm, ops.activation) == 0 and result.counts["fused_ops"] == 1


def test_add_relu_fuses_but_not_when_sum_is_reused():
    class AddRelu(nn.Module):
        def forward(self, a, b):
            s = a + b
            return torch.relu(s), torch.relu(a + s)

    gm, result = check_pass(fuse_elementwise_activation, AddRelu(), torch.randn(2, 3), torch.randn(2, 3))
    assert result.counts["fused_ops"] == 1 and count(gm, ops.activation) == 1
