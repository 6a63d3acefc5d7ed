import torch
import torchvision
from helpers import check_pass, count, ops, randomize_
from torch import nn

from torch_gie.capture import capture
from torch_gie.graph import run_graph, spec
from torch_gie.passes import PassContext
from torch_gie.passes.fold_batchnorm import fold_batchnorm
from torch_gie.passes.fuse_conv_epilogue import fuse_conv_epilogue


class Residual(nn.Module):
    def __init__(self, act_before="relu", act_after="relu"):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.act1 = nn.ReLU6() if act_before == "relu6" else nn.ReLU()
        self.act2 = nn.Hardswish() if act_after == "hardswish" else nn.ReLU()

    def forward(self, x):
        return self.act2(self.act1(self.conv(x)) + x)


def test_conv_act_residual_act_becomes_one_node():
    gm, result = check_pass(fuse_conv_epilogue, Residual("relu6", "hardswish"), torch.randn(2, 4, 5, 6))
    convs = [n for n in gm.graph.nodes if n.target is ops.conv2d]
    assert len(convs) == 1 and count(gm, ops.add) == 0 and count(gm, ops.activation) == 0
    ep = spec(convs[0]).epilogue
    assert (ep.activation, ep.residual, ep.post_activation) == ("relu6", True, "hardswish")
    assert result.fusions[0]["kind"] == "vertical" and len(result.fusions[0]["nodes"]) == 4


def test_residual_defined_after_the_conv_is_handled():
    class Late(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 5, 1), nn.Conv2d(3, 5, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            z = torch.sigmoid(self.b(x))
            return torch.relu(y + z)

    gm, _ = check_pass(fuse_conv_epilogue, Late(), torch.randn(1, 3, 7, 7))
    assert count(gm, ops.add) == 0


def test_no_fusion_when_intermediate_has_two_users():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(y) + y

    gm, result = check_pass(fuse_conv_epilogue, Branch(), torch.randn(1, 3, 4, 4))
    assert result.counts.get("fused_ops", 0) == 0 and count(gm, ops.activation) == 1


def test_linear_takes_activation_and_residual():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return nn.functional.gelu(self.fc(x)) + x

    gm, _ = check_pass(fuse_conv_epilogue, Mlp(), torch.randn(3, 6))
    assert count(gm, ops.add) == 0
    ep = spec(next(n for n in gm.graph.nodes if n.target is ops.linear)).epilogue
    assert ep.activation == "gelu" and ep.residual


def test_resnet50_every_block_fused():
    model = randomize_(torchvision.models.resnet50()).eval()
    x = torch.randn(1, 3, 64, 64)
    gm = capture(model, (x,))
    fold_batchnorm(gm, PassContext())
    fuse_conv_epilogue(gm, PassContext())
    assert count(gm, ops.add) == 0 and count(gm, ops.activation) == 0 and count(gm, ops.affine) == 0
    assert sum(spec(n).epilogue.residual for n in gm.graph.nodes if n.target is ops.conv2d) == 16
    with torch.no_grad():
        ref = model(x)
    assert ((run_graph(gm, x) - ref).norm() / ref.norm()) < 1e-5
