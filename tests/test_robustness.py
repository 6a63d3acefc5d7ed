"""What a deployed engine meets: malformed inputs at call time (a clear error or a correct
result, never a silent wrong one), a model changed after compile (the engine keeps its own
copy), and many forwards, builds and save/load cycles (no memory growth)."""
import gc
import os
import tracemalloc

import pytest
import torch
import torchvision

import torch_gie


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    return model, x, torch_gie.compile(model, x, precision="fp32", backend="reference")


def _close(a, b):
    return ((a - b).norm() / b.norm()).item() < 1e-5


@pytest.mark.parametrize("bad, match", [
    (lambda x: x[0], "expected shape"),                       # wrong rank
    (lambda x: x[:1], "batch size is fixed"),                 # wrong batch
    (lambda x: x.double(), "expected dtype"),                 # wrong dtype
    (lambda x: x.to(torch.int64), "expected dtype"),
    (lambda x: (x, x), "expected 1 input"),                   # wrong count
    (lambda x: x.numpy(), "expected a tensor"),
])
def test_malformed_inputs_raise_clear_errors(engine, bad, match):
    _, x, compiled = engine
    arg = bad(x)
    with pytest.raises(ValueError, match=match):
        compiled(*arg) if isinstance(arg, tuple) else compiled(arg)


def test_layouts_and_views_give_correct_results(engine):
    model, x, compiled = engine
    with torch.no_grad():
        ref = model(x)
    assert _close(compiled(x.contiguous(memory_format=torch.channels_last)), ref)
    wide = torch.randn(2, 3, 32, 64)
    wide[..., ::2] = x
    assert _close(compiled(wide[..., ::2]), ref)  # a non-contiguous view


def test_nan_and_inf_propagate_instead_of_vanishing(engine):
    _, x, compiled = engine
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    bad[1, 0, 0, 0] = float("inf")
    out = compiled(bad)
    assert not torch.isfinite(out[0]).all() and not torch.isfinite(out[1]).all()


def test_the_engine_keeps_its_own_copy_of_the_weights():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    compiled = torch_gie.compile(model, x, precision="fp32", backend="reference")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)  # the user changes the model after compiling
    assert _close(compiled(x), ref)  # documented: rebuild to pick up new weights


def test_many_forwards_and_builds_do_not_grow_host_memory(engine):
    _, x, compiled = engine
    for _ in range(20):
        compiled(x)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(200):
        compiled(x)
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    small = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    for _ in range(3):
        torch_gie.compile(small, x, precision="fp32", backend="reference")
    gc.collect()
    mid = tracemalloc.get_traced_memory()[0]
    for _ in range(10):
        torch_gie.compile(small, x, precision="fp32", backend="reference")
    gc.collect()
    grown_builds = tracemalloc.get_traced_memory()[0] - mid
    tracemalloc.stop()
    assert grown < 256 * 1024, f"200 forwards grew traced host memory by {grown} bytes"
    assert grown_builds < 2 * 1024 * 1024, f"10 builds grew traced host memory by {grown_builds} bytes"


@pytest.mark.gpu
def test_many_forwards_do_not_grow_gpu_memory():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval().cuda()
    x = torch.randn(8, 3, 64, 64, device="cuda")
    compiled = torch_gie.compile(model, x, precision="fp16")
    for _ in range(100):
        compiled(x)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(10_000):
        compiled(x)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 1 << 20


def _small_model() -> torch.nn.Module:
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux) for the resident set size")
def test_ten_thousand_forwards_and_a_hundred_build_save_load_cycles_keep_memory_flat(tmp_path):
    """Issue 9's robustness figures on CPU: 10,000 forwards of one engine, then 100 cycles of
    build, save, load, call and free: neither Python's traced allocations nor the process's
    resident memory grows beyond noise once the first cycles have warmed the caches up."""
    model, x = _small_model(), torch.randn(2, 3, 16, 16)
    path = tmp_path / "engine.gie"

    def cycle() -> torch.Tensor:
        engine = torch_gie.compile(model, x, precision="fp32", backend="reference")
        torch_gie.save(engine, path)
        loaded = torch_gie.load(path)
        out = loaded(x)
        del engine, loaded
        return out

    ref = cycle()
    engine = torch_gie.compile(model, x, precision="fp32", backend="reference")
    for _ in range(100):
        engine(x)
    gc.collect()
    tracemalloc.start()
    traced0, rss0 = tracemalloc.get_traced_memory()[0], _rss_bytes()
    for _ in range(10_000):
        out = engine(x)
    gc.collect()
    traced1, rss1 = tracemalloc.get_traced_memory()[0], _rss_bytes()
    assert _close(out, ref)
    for _ in range(10):  # warm-up cycles: caches of torch, fx and the allocator fill here
        cycle()
    gc.collect()
    traced2, rss2 = tracemalloc.get_traced_memory()[0], _rss_bytes()
    for _ in range(100):
        assert _close(cycle(), ref)
    gc.collect()
    traced3, rss3 = tracemalloc.get_traced_memory()[0], _rss_bytes()
    tracemalloc.stop()
    assert traced1 - traced0 < 256 * 1024, f"10,000 forwards grew traced memory by {traced1 - traced0} bytes"
    assert rss1 - rss0 < 16 * 2**20, f"10,000 forwards grew the resident set by {rss1 - rss0} bytes"
    assert traced3 - traced2 < 2 * 2**20, f"100 cycles grew traced memory by {traced3 - traced2} bytes"
    assert rss3 - rss2 < 32 * 2**20, f"100 cycles grew the resident set by {rss3 - rss2} bytes"


@pytest.mark.gpu
def test_a_hundred_build_save_load_cycles_leave_no_gpu_memory(tmp_path):
    """The GPU half: after 100 cycles of build, save, load, call and free, the caching
    allocator holds no more than before them (CUDA graphs and arenas are all released)."""
    model, x = _small_model().cuda(), torch.randn(8, 3, 32, 32, device="cuda")
    path = tmp_path / "engine.gie"

    def cycle() -> None:
        engine = torch_gie.compile(model, x, precision="fp16")
        torch_gie.save(engine, path)
        loaded = torch_gie.load(path)
        loaded(x)
        del engine, loaded

    for _ in range(3):
        cycle()
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(100):
        cycle()
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 1 << 20
