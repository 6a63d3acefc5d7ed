import pytest
import torch
import torch.nn.functional as F
from helpers import captured, check_pass, count, ops, randomize_, rel_err
from torch import nn

import torch_gie
from torch_gie.graph import run_graph, spec
from torch_gie.passes import run_passes
from torch_gie.passes.fold_gate_into_conv import fold_gate_into_conv

C = 8


class Gated(nn.Module):
    """``consumers(x * sigmoid(fc(mean(x))))``: a per-(image, channel) gate as an SE makes it."""

    def __init__(self, *consumers: nn.Module):
        super().__init__()
        self.fc = nn.Conv2d(C, C, 1)
        self.consumers = nn.ModuleList(consumers)

    def forward(self, x):
        y = x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))
        outs = tuple(m(y) for m in self.consumers)
        return outs if len(outs) > 1 else outs[0]


def _gated_convs(gm):
    return [n for n in gm.graph.nodes if n.target is ops.conv2d and spec(n).input_gate]


@pytest.mark.parametrize("conv", [
    nn.Conv2d(C, 4, 1),
    nn.Conv2d(C, 4, 3, stride=2, padding=1),
    nn.Conv2d(C, 4, 3, padding=1, groups=2),  # grouped but not depthwise: takes the gate
], ids=["1x1", "3x3-stride2", "grouped"])
def test_gate_multiply_folds_into_the_conv(conv):
    gm, result = check_pass(fold_gate_into_conv, randomize_(Gated(conv)).eval(), torch.randn(2, C, 6, 6))
    assert result.counts == {"folded": 1} and count(gm, ops.mul) == 0
    (gated,) = _gated_convs(gm)
    x, gate = gated.args
    assert x.op == "placeholder" and gate.meta["shape"] == (2, C, 1, 1)
    assert result.fusions[0]["kind"] == "prologue"


def test_gate_read_by_two_convs_folds_into_both():
    model = randomize_(Gated(nn.Conv2d(C, 4, 1), nn.Conv2d(C, 4, 3, padding=1))).eval()
    gm, result = check_pass(fold_gate_into_conv, model, torch.randn(2, C, 5, 5))
    assert result.counts == {"folded": 1} and count(gm, ops.mul) == 0
    assert len(_gated_convs(gm)) == 2 and len(result.fusions) == 2


@pytest.mark.parametrize("consumers", [
    (nn.Conv2d(C, C, 3, padding=1, groups=C),),  # depthwise: no input prologue
    (nn.MaxPool2d(2),),  # not a conv
    (nn.Conv2d(C, 4, 1), nn.ReLU()),  # one consumer that is not a conv keeps the multiply
    (nn.Conv2d(C, 4, 1), nn.Conv2d(C, C, 3, padding=1, groups=C)),
], ids=["depthwise", "pool", "conv-and-relu", "conv-and-depthwise"])
def test_gate_multiply_stays_for_other_consumers(consumers):
    gm, result = check_pass(fold_gate_into_conv, randomize_(Gated(*consumers)).eval(), torch.randn(2, C, 4, 4))
    assert result.counts == {} and count(gm, ops.mul) == 1 and not _gated_convs(gm)


@pytest.mark.parametrize("gate", ["same-shape", "batch-broadcast", "constant"])
def test_multiplies_that_are_not_channel_gates_stay(gate):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(C, 4, 1)
            self.scale = nn.Parameter(torch.rand(1, C, 1, 1))

        def forward(self, x):
            if gate == "same-shape":
                g = torch.sigmoid(x)
            elif gate == "batch-broadcast":  # (1, C, 1, 1) computed from the first image only
                g = torch.sigmoid(x[:1].mean((2, 3), keepdim=True))
            else:
                g = self.scale  # a constant: an affine, not a mul
            return self.conv(x * g)

    gm, result = check_pass(fold_gate_into_conv, M().eval(), torch.randn(2, C, 4, 4))
    assert result.counts == {} and not _gated_convs(gm)


def test_gate_multiply_with_an_activation_stays():
    class Act(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(C, 4, 1)

        def forward(self, x):
            return self.conv(F.relu(x * torch.sigmoid(x.mean((2, 3), keepdim=True))))

    model, x = Act().eval(), torch.randn(2, C, 4, 4)
    gm = captured(model, x)
    run_passes(gm)  # fuse_elementwise_activation gives the mul its ReLU first
    with torch.no_grad():
        assert rel_err(run_graph(gm, x), model(x)) < 1e-5
    assert count(gm, ops.mul) == 1 and not _gated_convs(gm)


def test_gated_conv_with_a_residual_keeps_both_inputs():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(C, 2, 1), nn.Conv2d(2, C, 1)
            self.project = nn.Conv2d(C, C, 1)

        def forward(self, x):
            g = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
            return self.project(x * g) + x

    model, x = randomize_(Block()).eval(), torch.randn(2, C, 5, 5)
    gm = captured(model, x)
    run_passes(gm)
    with torch.no_grad():
        assert rel_err(run_graph(gm, x), model(x)) < 1e-5
    (conv,) = _gated_convs(gm)
    assert spec(conv).epilogue.residual
    x_in, gate, residual = conv.args
    assert x_in.op == residual.op == "placeholder" and gate.target is ops.squeeze_excitation


def test_n_by_c_operand_broadcast_over_space_is_not_a_channel_gate():
    class Spatial(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.conv = nn.Linear(3, C), nn.Conv2d(C, C, 1)

        def forward(self, x, z):
            return self.conv(x * self.fc(z))  # fc(z) is (2, 8): it scales x[:, :, h, w] by fc(z)[h, w]

    check_pass(fold_gate_into_conv, randomize_(Spatial()).eval(), torch.randn(2, C, 2, C), torch.randn(2, 3))


def test_gated_convs_on_triton():
    model = randomize_(Gated(nn.Conv2d(C, 4, 3, stride=2, padding=1), nn.Conv2d(C, 4, 1))).eval()
    x = torch.randn(1, C, 6, 6)
    compiled = torch_gie.compile(model, x, precision="fp32", backend="triton")
    assert not any(layer["op"] == "mul" for layer in compiled.report()["layers"])
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-4
