import torch
from helpers import check_pass, count, ops, randomize_
from torch import nn

from torch_gie.passes.fold_batchnorm import fold_batchnorm


def test_folds_conv_bn_with_and_without_bias():
    for bias in (True, False):
        model = randomize_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU()))
        gm, result = check_pass(fold_batchnorm, model, torch.randn(2, 3, 9, 7))
        assert result.counts["folded"] == 1
        assert count(gm, ops.affine) == 0 and count(gm, ops.conv2d) == 1


def test_folds_linear_bn1d():
    model = randomize_(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)))
    gm, result = check_pass(fold_batchnorm, model, torch.randn(4, 5))
    assert result.counts["folded"] == 1 and count(gm, ops.affine) == 0


def test_does_not_fold_when_conv_has_another_user():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    gm, result = check_pass(fold_batchnorm, randomize_(TwoUsers()), torch.randn(1, 3, 5, 5))
    assert result.counts.get("folded", 0) == 0 and count(gm, ops.affine) == 1


def test_does_not_fold_bn_after_activation_or_input():
    model = randomize_(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)))
    gm, result = check_pass(fold_batchnorm, model, torch.randn(2, 3, 4, 4))
    assert result.counts.get("folded", 0) == 0 and count(gm, ops.affine) == 2


def test_user_weights_are_not_modified():
    model = randomize_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    before = model[0].weight.clone()
    check_pass(fold_batchnorm, model, torch.randn(1, 3, 6, 6))
    assert torch.equal(model[0].weight, before)
