"""The timing cache: the configs shipped for the H100 must keep matching the layer signatures the
compiler produces (a renamed kernel attribute would silently drop every tuned config)."""
import json

import pytest
import torch
import torchvision

from torch_gie.compiler import _lowering, _prepare
from torch_gie.runtime.program import build_program
from torch_gie.runtime.steps import KernelStep, ViewStep
from torch_gie.tune import SHIPPED_DB, signature

H100 = "NVIDIA H100 80GB HBM3|triton 3.6.0|"


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", ["resnet50", "googlenet"])
def test_shipped_cache_covers_benchmark_layers(name, batch, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # builds the Triton kernel objects on CPU; nothing runs
    kwargs = {"init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    x = torch.randn(batch, 3, 224, 224)
    _, _, device, gm, _, _, plan, _ = _prepare(model, x, "fp16", "triton", {})
    lowering, fallback, converters = _lowering("triton", plan, device, {})
    program = build_program(gm, plan, lowering, "triton", device, fallback, converters)
    for step in program.steps:  # views (the classifier's flatten) fill env when they run; no kernels do
        if isinstance(step, ViewStep):
            step(program.env)
    steps = [s for s in program.steps if isinstance(s, KernelStep) and s.op in ("conv2d", "linear")]
    with open(SHIPPED_DB) as f:
        cache = json.load(f)
    missing = [s.name for s in steps if H100 + signature(s, program.env) not in cache]
    assert {s.op for s in steps} == {"conv2d", "linear"} and not missing
    for s in steps:  # every shipped config still validates for its layer (else the tuner drops it)
        s.kernel.layer.config = cache[H100 + signature(s, program.env)]


H200 = "NVIDIA H200|triton 3.6.0|"


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", ["resnet50", "googlenet"])
def test_shipped_cache_covers_int8_benchmark_layers(name, batch, monkeypatch):
    """The same for the int8 builds, whose shipped entries are the H200's. On the CPU the real
    tensors an int8 layer reads or writes are fp32 where the GPU's are fp16; so compare with
    that one difference. (A layer flag stored as a plain attribute once changed every key.)"""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kwargs = {"init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    x = torch.randn(batch, 3, 224, 224)
    int8 = {"calibration_data": [x], "calibrator": "percentile", "calibration_cache": None,
            "layer_precisions": None}
    _, _, device, gm, _, _, plan, _ = _prepare(model, x, "int8", "triton", {}, int8=int8)
    lowering, fallback, converters = _lowering("triton", plan, device, {})
    program = build_program(gm, plan, lowering, "triton", device, fallback, converters)
    for step in program.steps:
        if isinstance(step, ViewStep):
            step(program.env)
    steps = [s for s in program.steps if isinstance(s, KernelStep) and s.op in ("conv2d", "linear")]
    with open(SHIPPED_DB) as f:
        cache = json.load(f)

    def key(step):
        return H200 + signature(step, program.env).replace("/float32'", "/float16'")
    missing = [s.name for s in steps if key(s) not in cache]
    assert steps and not missing
    for s in steps:
        s.kernel.layer.config = cache[key(s)]


def test_configs_to_run_are_what_tune_launches(monkeypatch, tmp_path):
    """What the parallel pre-compilation compiles per layer: the cached config, else the
    candidates tune() times (tune=True), else the layer's own (tune=False)."""
    from torch_gie.kernels.conv2d import Conv2d
    from torch_gie.tune import Tuner

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")

    class Node:
        name, target = "conv", type("op", (), {"__name__": "conv2d"})

    layer = Conv2d(torch.randn(64, 64, 3, 3), padding=1, input_hw=(56, 56), batch=8)
    step = KernelStep(Node(), type("K", (), {"layer": layer})(), [0], [torch.empty(8, 64, 56, 56)], "triton")
    env = [torch.empty(8, 64, 56, 56).contiguous(memory_format=torch.channels_last)]
    timing = Tuner(str(tmp_path / "t.json"), max_configs=3)
    assert timing.configs_to_run(step, env) == layer.configs[:3]
    assert Tuner(str(tmp_path / "t.json"), time_new=False).configs_to_run(step, env) == [layer.config]
    timing.cache[timing.prefix + signature(step, env)] = layer.configs[2]
    assert timing.configs_to_run(step, env) == [layer.configs[2]]
