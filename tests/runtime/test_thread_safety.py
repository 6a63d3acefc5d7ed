"""One compiled module shared by many threads: every call gets its own input's result (the
static buffers and the CUDA graph are serialized by the program's lock and stream)."""
from __future__ import annotations

import threading
import time

import pytest
import torch
import torchvision

import torch_gie


def _hammer(module, inputs, expected, calls: int | None = None, seconds: float | None = None) -> list[float]:
    """Every thread calls ``module`` on its own input ``calls`` times, or until ``seconds`` have
    passed (at least once); the relative error of every output against its thread's expected one."""
    errors: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + (seconds or 0.0)

    def worker(i: int) -> None:
        done = 0
        while (done < calls) if calls is not None else (done == 0 or time.monotonic() < deadline):
            done += 1
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


def test_eight_threads_for_ten_seconds_cpu():
    """Issue 9's acceptance on CPU: 8 threads share one engine for 10 s; no deadlock, every
    output its own input's."""
    model, inputs, expected = _case("cpu", batch=1)
    engine = torch_gie.compile(model, inputs[0], precision="fp32", backend="reference")
    start = time.monotonic()
    errors = _hammer(engine, inputs, expected, seconds=10.0)
    assert time.monotonic() - start < 60, "the threads did not finish: a deadlock or a starved thread"
    assert len(errors) >= 8 and max(errors) < 1e-4


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
