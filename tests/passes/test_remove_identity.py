import torch
from helpers import check_pass, count, ops
from torch import nn

from torch_gie.passes.remove_identity import remove_identity


def test_dropout_and_identity_removed():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Identity(), nn.ReLU())

        def forward(self, x):
            return nn.functional.dropout(self.seq(x), 0.3, training=self.training)

    gm, result = check_pass(remove_identity, M(), torch.randn(3, 4))
    assert result.counts["removed"] == 3 and count(gm, ops.identity) == 0


def test_nothing_to_remove():
    gm, result = check_pass(remove_identity, nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(2, 4))
    assert result.counts.get("removed", 0) == 0
