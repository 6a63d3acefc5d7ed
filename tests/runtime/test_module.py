"""GIEModule on CPU: what it refuses, and that its launch count is the sum of its steps'."""
import pytest
import torch
from torch import nn

import torch_gie


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def test_profile_needs_cuda_and_says_so():
    compiled = torch_gie.compile(_net(), torch.randn(1, 3, 8, 8), precision="fp32", backend="reference")
    with pytest.raises(RuntimeError, match="CUDA"):
        compiled.profile()


def test_report_launches_are_the_steps_kernels():
    compiled = torch_gie.compile(_net(), torch.randn(1, 3, 8, 8), precision="fp32", backend="reference")
    steps = compiled._program.steps
    assert compiled.report()["launches"] == sum(s.launches for s in steps) == 3  # conv+BN+ReLU, pool, fc
