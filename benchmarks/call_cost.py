"""Where a small-batch call's time goes: per torch_gie build, the call as a user times it
(``time_calls``), the CUDA graph's replay alone, the host time of one call and of loading its
input with the GPU idle, and the sum of the per-step kernel times (``profile()``).

A call is bound by the larger of its host time and its replay: at batch 1 the host can be the
bound (RESULTS 2026-12-04 20:30 UTC: an int8 GoogLeNet whose Triton quantize launch alone took
0.06-0.08 ms of host time against a 0.13-0.15 ms replay). ``--streams`` builds each precision
with the branch streams on and off. Needs a CUDA GPU; writes a JSON list of rows to ``--out``.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench  # noqa: E402  (build_model: torchvision models with calibrated BatchNorm)

import torch_gie  # noqa: E402
from torch_gie.timing import time_calls  # noqa: E402


def event_times(fn, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` back-to-back calls of ``fn``, event-timed."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def host_times(fn, iters: int) -> list[float]:
    """Host milliseconds of each of ``iters`` calls of ``fn``, each started on an idle GPU."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return times


def measure(name: str, model, x, precision: str, streams: bool, calibration, iters: int) -> dict:
    kw = {"calibration_data": calibration} if precision == "int8" else {}
    gie = torch_gie.compile(model, x, precision=precision, tune=True, streams=streams, **kw)
    program = gie._program
    program = getattr(program, "base", program)  # a batch_range engine's base program
    with torch.no_grad():
        call = time_calls(lambda: gie(x), iters=iters, warmup=50)
        for _ in range(20):
            program.graph.replay()
        replay = event_times(program.graph.replay, iters)
        chunks = [statistics.median(replay[i:i + iters // 10]) for i in range(0, iters, iters // 10)]
        host = host_times(lambda: gie(x), 300)
        load = host_times(lambda: program._load_inputs([x]), 300)
        kernels = sum(r["ms"] for r in gie.profile())
    return {"model": name, "batch": x.shape[0], "precision": precision, "streams": streams,
            "call_p50_ms": call["p50_ms"], "call_p99_ms": call["p99_ms"],
            "replay_p50_ms": statistics.median(replay), "replay_chunk_medians_ms": [round(c, 4) for c in chunks],
            "host_call_ms": statistics.median(host), "host_input_load_ms": statistics.median(load),
            "kernel_sum_ms": kernels, "launches": gie.report()["launches"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="googlenet,resnet50")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--precisions", default="fp16,int8")
    p.add_argument("--streams", action="store_true", help="also build each precision with one stream")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--out", default="call_cost.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/call_cost.py needs a CUDA GPU")
    rows = []
    for name in args.models.split(","):
        model, size = bench.build_model(name)
        torch.manual_seed(1)
        x = torch.randn(args.batch, 3, size, size, device="cuda")
        g = torch.Generator("cuda").manual_seed(7)  # calibration images other than the timed one
        calibration = [torch.randn(32, 3, size, size, device="cuda", generator=g) for _ in range(4)]
        for precision in args.precisions.split(","):
            for streams in (True, False) if args.streams else (True,):
                row = measure(name, model, x, precision, streams, calibration, args.iters)
                print(json.dumps(row), flush=True)
                rows.append(row)
                torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
