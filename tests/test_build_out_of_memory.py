"""A build that runs out of memory raises ``torch_gie.OutOfMemoryError`` naming the build step and
the bytes asked for, and frees everything it had allocated, even while the caller still holds
the error. On CPU the allocation seam (``runtime.program.allocate``) or a kernel raises
``torch.OutOfMemoryError`` as CUDA's allocator would; the GPU test runs out for real."""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torchvision
from helpers import randomize_
from torch import nn

import torch_gie
from torch_gie.backends import reference
from torch_gie.runtime import program as program_module


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _case():
    torch.manual_seed(0)
    return randomize_(Net()).eval(), torch.randn(2, 3, 16, 16)


def _oom(size: str = "3.00 MiB") -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {size}. GPU 0 has a total capacity "
                                  "of 79.19 GiB of which 1.00 MiB is free.")


def _track_model_copy(monkeypatch) -> list:
    """Weak references to the deep copies compile makes of the model."""
    copies, deepcopy = [], copy.deepcopy

    def spy(obj, *args):
        result = deepcopy(obj, *args)
        if isinstance(obj, Net):
            copies.append(weakref.ref(result))
        return result
    monkeypatch.setattr(copy, "deepcopy", spy)
    return copies


def _all_dead(refs: list) -> bool:
    gc.collect()
    return bool(refs) and all(r() is None for r in refs)


def test_the_arena_names_its_step_and_exact_bytes(monkeypatch):
    model, x = _case()
    arena = torch_gie.explain(model, x, precision="fp32", backend="reference")["arena_bytes"]

    def refuse(nbytes, device):
        raise _oom()
    monkeypatch.setattr(program_module, "allocate", refuse)
    with pytest.raises(torch_gie.OutOfMemoryError) as info:
        torch_gie.compile(model, x, precision="fp32", backend="reference")
    err = info.value
    assert err.step == "allocating the activation arena" and err.nbytes == arena
    assert f"while allocating the activation arena: asked for {arena} bytes" in str(err)
    assert "Tried to allocate 3.00 MiB" in str(err)  # the allocator's own words
    assert isinstance(err, torch.OutOfMemoryError) and isinstance(err, torch_gie.CompileError)


def test_a_failed_build_frees_what_it_allocated_while_the_error_is_held(monkeypatch):
    model, x = _case()
    copies = _track_model_copy(monkeypatch)
    buffers, allocate = [], program_module.allocate

    def arena_then_refuse(nbytes, device):
        if buffers:  # the arena came first; the static input buffer does not fit
            raise _oom("64.00 KiB")
        buffers.append(allocate(nbytes, device))
        return buffers[-1]
    monkeypatch.setattr(program_module, "allocate", arena_then_refuse)
    with pytest.raises(torch_gie.OutOfMemoryError) as info:
        torch_gie.compile(model, x, precision="fp32", backend="reference")
    assert info.value.step == "allocating the static input buffers"
    assert info.value.nbytes == 2 * 4 * 16 * 16 * 4  # the input stored as 4 channels, fp32
    arena = weakref.ref(buffers.pop())
    assert _all_dead([arena] + copies)  # info still holds the error and its traceback
    assert all(p.requires_grad for p in model.parameters())  # the user's model is untouched


def test_running_a_layer_names_the_layer(monkeypatch):
    model, x = _case()
    copies = _track_model_copy(monkeypatch)
    lower, arenas = reference.lower, []

    def lower_fc_out_of_memory(node, dtype, device):
        kernel = lower(node, dtype, device)
        if node.name != "fc":
            return kernel

        def run(inputs, outs):
            raise _oom("1.50 GiB")
        return run
    monkeypatch.setattr(reference, "lower", lower_fc_out_of_memory)
    spy_storage = program_module.allocate_storage

    def storage(plan, device):
        s = spy_storage(plan, device)
        arenas.append(weakref.ref(s.arena))
        return s
    monkeypatch.setattr(program_module, "allocate_storage", storage)
    monkeypatch.setattr(torch_gie.compiler, "allocate_storage", storage)
    with pytest.raises(torch_gie.OutOfMemoryError) as info:
        torch_gie.compile(model, x, precision="fp32", backend="reference")
    assert info.value.step == "running layer fc" and info.value.nbytes == 3 * 2**29
    assert "while running layer fc: asked for 1610612736 bytes (1536.0 MiB)" in str(info.value)
    assert _all_dead(arenas + copies)


def test_packing_weights_fails_instead_of_falling_back(monkeypatch):
    """A Triton layer whose packing runs out of memory is not retried with PyTorch (no fallback
    runs in less memory): the build stops, naming the layer."""
    from torch_gie.backends import triton as triton_backend
    lower = triton_backend.lower

    def lower_conv_out_of_memory(node, *args):
        if node.name == "conv":
            raise _oom("20.00 MiB")
        return lower(node, *args)
    monkeypatch.setattr(triton_backend, "lower", lower_conv_out_of_memory)
    model, x = _case()
    with pytest.raises(torch_gie.OutOfMemoryError, match="while packing weights of layer conv: asked for 20971520"):
        torch_gie.compile(model, x, precision="fp32", backend="triton")


def test_a_batch_size_built_on_first_use_names_its_batch_and_leaves_the_engine_working(monkeypatch):
    lower = reference.lower

    def fc_out_of_memory_at_batch_3(node, dtype, device):
        kernel = lower(node, dtype, device)
        if node.name != "fc":
            return kernel

        def run(inputs, outs):
            if inputs[0].shape[0] == 3:
                raise _oom("3.00 MiB")
            kernel(inputs, outs)
        return run
    monkeypatch.setattr(reference, "lower", fc_out_of_memory_at_batch_3)
    model, x = _case()
    compiled = torch_gie.compile(model, x, precision="fp32", backend="reference", batch_range=(1, 2, 4))
    with pytest.raises(torch_gie.OutOfMemoryError,
                       match="while running layer fc, for batch size 3: asked for 3145728 bytes"):
        compiled(torch.randn(3, 3, 16, 16))
    assert 3 not in compiled._program.batch_sizes  # the half-built program is gone
    for batch in (1, 2, 4):
        xb = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            assert torch.allclose(compiled(xb), model(xb), atol=1e-5)


def test_loading_an_engine_that_does_not_fit_frees_what_it_allocated(monkeypatch, tmp_path):
    model, x = _case()
    path = tmp_path / "net.gie"
    torch_gie.save(torch_gie.compile(model, x, precision="fp32", backend="reference", batch_range=(1, 2, 4)), path)
    buffers, allocate = [], program_module.allocate

    def arena_then_refuse(nbytes, device):
        if buffers:
            raise _oom("64.00 KiB")
        buffers.append(allocate(nbytes, device))
        return buffers[-1]
    monkeypatch.setattr(program_module, "allocate", arena_then_refuse)
    with pytest.raises(torch_gie.OutOfMemoryError, match="while allocating the static input buffers") as info:
        torch_gie.load(path)
    assert info.value.nbytes == 4 * 4 * 16 * 16 * 4  # planned for the range's max, 4 images
    assert _all_dead([weakref.ref(buffers.pop())])


def test_other_errors_pass_through_unchanged(monkeypatch):
    def broken(nbytes, device):
        raise RuntimeError("not a memory problem")
    monkeypatch.setattr(program_module, "allocate", broken)
    model, x = _case()
    with pytest.raises(RuntimeError, match="not a memory problem") as info:
        torch_gie.compile(model, x, precision="fp32", backend="reference")
    assert not isinstance(info.value, torch_gie.OutOfMemoryError)


@pytest.mark.gpu
def test_gpu_resnet50_batch_512_out_of_memory_frees_everything():
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().cuda()
    x = torch.randn(512, 3, 224, 224, device="cuda")
    torch.cuda.synchronize()
    gc.collect()
    baseline = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    # 2 GiB on top of the model and input: the model copy fits, a batch-512 build does not.
    torch.cuda.set_per_process_memory_fraction((baseline + 2 * 2**30) / total)
    try:
        with pytest.raises(torch_gie.OutOfMemoryError) as info:
            torch_gie.compile(model, x, precision="fp16")
        err = info.value
        assert err.step and err.nbytes and err.nbytes > 0 and err.step in str(err)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == baseline  # while the error is still held
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    y = torch_gie.compile(model, x[:8], precision="fp16")(x[:8])  # the process builds fine afterwards
    assert torch.isfinite(y).all()


def test_running_out_while_tracing_names_the_step(monkeypatch):
    """The fp32 run that records shapes (ShapeProp, which wraps failures in a RuntimeError) runs
    out of memory at a big batch: an OutOfMemoryError naming the tracing step and the bytes, not
    a CompileError about the model (found on the H200: the batch-512 GPU test below)."""
    model, x = _case()

    def batch_norm_out_of_memory(self, inp):
        raise _oom("1.53 GiB")
    monkeypatch.setattr(nn.BatchNorm2d, "forward", batch_norm_out_of_memory)
    with pytest.raises(torch_gie.OutOfMemoryError) as info:
        torch_gie.compile(model, x, precision="fp32", backend="reference")
    assert info.value.step == "tracing the model on the example inputs"
    assert info.value.nbytes == round(1.53 * 2**30)
