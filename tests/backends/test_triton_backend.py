"""The whole Triton lowering end to end: on CPU the kernels run in the Triton interpreter, on a
GPU for real. Small inputs keep the interpreter fast."""
import pytest
import torch
import torchvision
from helpers import randomize_, rel_err
from torch import nn

import torch_gie

TOL = {"fp32": 1e-4, "fp16": 1e-2}


class EveryOp(nn.Module):
    """One of each lowering: stem gather conv, merged 1x1 siblings into a cat, depthwise,
    grouped conv, residual, unfoldable BN + act, pools, an add, linear with GELU."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 5, 2, 2), nn.BatchNorm2d(16), nn.ReLU())
        self.a, self.b = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1)
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.BatchNorm2d(16), nn.Hardswish())
        self.grouped = nn.Conv2d(48, 32, 3, 1, 1, groups=4)
        self.bn = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.avg = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.fc = nn.Linear(32, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x)), self.dw(x) + x], 1)
        y = torch.relu(self.bn(self.grouped(y)))
        y = self.avg(self.pool(y)) + self.pool(y)
        y = torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1)
        return self.head(nn.functional.gelu(self.fc(y)))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_lowering_matches_eager(precision, device):
    model = randomize_(EveryOp()).eval().to(device)
    x = torch.randn(2, 3, 19, 17, device=device)
    compiled = torch_gie.compile(model, x, precision=precision, backend="triton")
    report = compiled.report()
    assert report["fallback_ops"] == [] and report["concats_eliminated"] == 1
    assert {layer["backend"] for layer in report["layers"]} == {"triton"}
    x2 = torch.randn_like(x)
    with torch.no_grad():
        assert rel_err(compiled(x2), model(x2)) < TOL[precision]


@pytest.mark.parametrize("name", ["googlenet", "resnet18"])
def test_torchvision_model_through_triton(name, device):
    kwargs = {"init_weights": True} if name == "googlenet" else {}
    model = randomize_(torchvision.models.get_model(name, weights=None, **kwargs)).eval().to(device)
    x = torch.randn(1, 3, 32, 32, device=device)
    compiled = torch_gie.compile(model, x, precision="fp32", backend="triton")
    assert compiled.report()["fallback_ops"] == []
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-4


def test_layer_without_kernel_falls_back_with_warning(device, monkeypatch):
    from torch_gie.backends import triton as triton_backend

    def broken(*args, **kwargs):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setitem(triton_backend._LOWERINGS, torch_gie.ops.pool2d, broken)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2)).eval().to(device)
    x = torch.randn(1, 3, 8, 8, device=device)
    with pytest.warns(UserWarning, match="no kernel for layer"):
        compiled = torch_gie.compile(model, x, precision="fp32", backend="triton")
    backends = {layer["op"]: layer["backend"] for layer in compiled.report()["layers"]}
    assert backends == {"conv2d": "triton", "pool2d": "reference"}
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5
