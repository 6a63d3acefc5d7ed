"""One compiled module shared by many threads: every call gets its own input's result (the
static buffers and the CUDA graph are serialized by the program's lock and stream)."""
from __future__ import annotations

import threading

import pytest
import torch
import torchvision

import torch_gie


def _hammer(module, inputs, expected, calls: int) -> list[float]:
    errors: list[float] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        for _ in range(calls):
            out = module(inputs[i])
            err = ((out - expected[i]).abs().max() / expected[i].abs().max()).item()
            with lock:
                errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _case(device: str, batch: int = 2, size: int = 32, threads: int = 8):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval().to(device)
    inputs = [torch.randn(batch, 3, size, size, device=device) for _ in range(threads)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    return model, inputs, expected


def test_threads_share_one_engine_cpu():
    model, inputs, expected = _case("cpu")
    engine = torch_gie.compile(model, inputs[0], precision="fp32", backend="reference")
    errors = _hammer(engine, inputs, expected, calls=5)
    assert len(errors) == 40 and max(errors) < 1e-4


@pytest.mark.gpu
def test_threads_share_one_engine_gpu():
    model, inputs, expected = _case("cuda", batch=8, size=64)
    engine = torch_gie.compile(model, inputs[0], precision="fp16")
    errors = _hammer(engine, inputs, expected, calls=50)
    assert len(errors) == 400 and max(errors) < 2e-2


@pytest.mark.gpu
def test_call_on_a_side_stream_is_ordered_after_the_callers_work():
    model, inputs, expected = _case("cuda", batch=8, size=64, threads=1)
    engine = torch_gie.compile(model, inputs[0], precision="fp16")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.empty_like(inputs[0])
        torch.cuda._sleep(10_000_000)  # a long kernel before the input is written
        x.copy_(inputs[0])
        out = engine(x)
        out = out.clone()  # on the caller's stream: must see the finished result
    side.synchronize()
    assert ((out.float() - expected[0]).abs().max() / expected[0].abs().max()).item() < 2e-2
