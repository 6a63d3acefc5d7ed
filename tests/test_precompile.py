"""Parallel compilation ahead of a build's launches: which configs each layer compiles, that the
jobs run on worker threads with their config in effect, and that a failing job stays quiet and
changes nothing. The speed-up itself needs a GPU (Triton's interpreter compiles nothing)."""
import threading

import pytest
import torch

from torch_gie import precompile as pc
from torch_gie.kernels.launch import compile_only, compiling_only, config_override
from torch_gie.runtime.steps import KernelStep


class _Layer:
    supports_compile_only = True

    def __init__(self, configs, fail=False):
        self.configs, self.config, self.fail, self.seen = configs, configs[0], fail, []

    def __call__(self, inputs, outs):
        if self.fail:
            raise RuntimeError("does not compile")
        self.seen.append((compiling_only(), config_override(), threading.current_thread().name))


class _Bound:
    def __init__(self, layer):
        self.layer = layer

    def __call__(self, inputs, outs):
        self.layer(inputs, outs)


class _Node:
    def __init__(self, name):
        self.name, self.target = name, type("op", (), {"__name__": "conv2d"})


def _step(name, layer):
    return KernelStep(_Node(name), _Bound(layer), [], [], "triton")


def test_every_config_compiles_on_a_worker_thread(monkeypatch):
    monkeypatch.setenv(pc.ENV_THREADS, "3")
    a, b = _Layer([{"BLOCK_M": 16}, {"BLOCK_M": 32}]), _Layer([{"BLOCK_M": 64}])
    steps = [_step("a", a), _step("b", b)]
    done = pc.precompile(steps, [], lambda s: list(s.kernel.layer.configs), torch.device("cpu"))
    assert done == 3
    assert sorted(c["BLOCK_M"] for _, c, _ in a.seen + b.seen) == [16, 32, 64]
    assert all(only for only, _, _ in a.seen + b.seen)
    assert any(name.startswith("torch_gie_compile") for _, _, name in a.seen + b.seen)
    assert a.config == {"BLOCK_M": 16} and not compiling_only()  # the layer and this thread untouched


def test_failures_are_skipped_and_unsupported_layers_left_alone(monkeypatch):
    monkeypatch.setenv(pc.ENV_THREADS, "2")
    bad, plain = _Layer([{"BLOCK_M": 16}], fail=True), _Layer([{"BLOCK_M": 16}])
    plain.supports_compile_only = False
    ok = _Layer([{"BLOCK_M": 32}])
    steps = [_step("bad", bad), _step("plain", plain), _step("ok", ok)]
    assert pc.precompile(steps, [], lambda s: [s.kernel.layer.config], torch.device("cpu")) == 1
    assert plain.seen == [] and len(ok.seen) == 1


def test_only_on_a_gpu_and_thread_count_from_the_environment(monkeypatch):
    monkeypatch.setenv(pc.ENV_THREADS, "4")
    assert pc.compile_threads() == 4 and not pc.enabled(torch.device("cpu"))
    monkeypatch.setenv(pc.ENV_THREADS, "auto")
    assert pc.compile_threads() >= 1
    monkeypatch.setenv(pc.ENV_THREADS, "x")
    assert pc.compile_threads() == pc.DEFAULT_THREADS
    monkeypatch.setenv(pc.ENV_THREADS, "0")
    assert not pc.enabled(torch.device("cuda"))
    monkeypatch.delenv(pc.ENV_THREADS)
    assert pc.compile_threads() == pc.DEFAULT_THREADS >= 1  # on by default where there are cores


def test_compile_only_launches_compile_with_the_override_and_touch_nothing(monkeypatch):
    """A conv launch under compile_only (split-K config, so the reduction too) calls warmup with
    the overriding config; no output is written and the layer keeps its config and workspace."""
    from torch_gie.kernels import conv2d, conv_epilogue
    from torch_gie.kernels.conv2d import Conv2d
    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def warmup(self, *args, grid, **kwargs):
            calls.append((self.name, kwargs.get("BLOCK_M"), kwargs.get("SPLIT_K")))

        def __getitem__(self, grid):
            raise AssertionError("a real launch under compile_only")

    monkeypatch.setattr(conv2d, "_conv2d_kernel", Recorder("conv"))
    monkeypatch.setattr(conv_epilogue, "_split_k_reduce_kernel", Recorder("reduce"))
    layer = Conv2d(torch.randn(16, 8, 3, 3), torch.randn(16), padding=1, dtype=torch.float32)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    out = torch.full((2, 16, 6, 6), float("nan")).contiguous(memory_format=torch.channels_last)
    before = dict(layer.config)
    override = {**before, "BLOCK_M": 32, "SPLIT_K": 2}
    with compile_only(override):
        layer(x, [out])
    assert calls == [("conv", 32, 2), ("reduce", 16, 2)]
    assert out.isnan().all() and layer.config == before and layer._workspace is None
    with pytest.raises(AssertionError, match="real launch"):
        layer(x, [out])  # outside compile_only the launch is real again


def test_a_build_hands_every_kernel_layer_its_configs(monkeypatch):
    """The warm-up asks the tuner (or the layer) for each layer's configs; a call that raised
    was skipped silently (the first GPU run compiled nothing in parallel), so here it must not."""
    import torch_gie
    from torch_gie.runtime import program as program_module
    from torch_gie.tune import Tuner
    asked: list[tuple[str, list]] = []

    def record(steps, env, configs_for, device):
        for step in steps:
            if getattr(getattr(getattr(step, "kernel", None), "layer", None), "supports_compile_only", False):
                asked.append((step.name, configs_for(step)))  # raises here if the call is wrong
        return 0

    class CachedTuner(Tuner):  # the real configs_to_run; the timing cache stood in for
        def __init__(self):
            self.max_configs, self.time_new = 8, True

        def _known(self, step, env):
            return None, None

        def tune(self, step, env):
            pass

    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 1),
                          nn.ReLU(), nn.Conv2d(32, 16, 3, stride=2)).eval()
    engine = torch_gie.compile(model, torch.randn(1, 3, 12, 12), precision="fp16", backend="triton")
    monkeypatch.setattr(program_module.precompile, "enabled", lambda device: True)
    monkeypatch.setattr(program_module.precompile, "precompile", record)
    engine._program.warm_up(None, None)  # the layers' own configs
    assert len(asked) == 4 and all(len(configs) == 1 for _, configs in asked)
    asked.clear()
    engine._program.warm_up(None, CachedTuner())  # the tuner's: the candidates it would time
    assert len(asked) == 4 and all(configs and all("BLOCK_M" in c for c in configs) for _, configs in asked)
    assert max(len(configs) for _, configs in asked) > 1
