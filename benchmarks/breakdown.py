"""Where the time goes, layer by layer: torch_gie next to torch.compile on one model and batch.

Both run as they do in bench.py (torch_gie fp16 from its timing cache; torch.compile of the fp16
channels_last model, "reduce-overhead" for batch <= 8, else default). Three views:

1. torch_gie per step: each step replayed alone in its own CUDA graph (``GIEModule.profile``).
2. A kernel trace of whole forwards (torch.profiler/CUPTI, which records the kernels inside CUDA
   graph replays) for both: kernels per forward, the sum of kernel time, the span from the first
   kernel's start to the last one's end and the idle time between kernels. The median forward
   by span is reported.
3. Per convolution side by side: the torch_gie conv step against torch.compile's conv kernel(s)
   plus the Triton kernels that follow it up to the next conv (its BatchNorm/activation/add),
   paired in order when both have the same number of convs.

    python benchmarks/breakdown.py --model resnet50 --batch 1
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
from torch.autograd import DeviceType

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench import build_model  # noqa: E402

import torch_gie  # noqa: E402


def kernel_forwards(fn, iters: int) -> list[list[tuple[str, float, float]]]:
    """(name, start us, end us) of every GPU kernel of ``iters`` forwards, one list per forward."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
            torch.cuda.synchronize()
            time.sleep(0.002)  # an idle gap on the GPU timeline separates the forwards
    kernels = sorted(((e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                      if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start),
                     key=lambda k: k[1])
    forwards, current = [], []
    for k in kernels:
        if current and k[1] - current[-1][2] > 1000:
            forwards.append(current)
            current = []
        current.append(k)
    if current:
        forwards.append(current)
    return forwards


def summarize(forwards) -> dict:
    spans = [f[-1][2] - f[0][1] for f in forwards]
    median = forwards[spans.index(sorted(spans)[len(spans) // 2])]
    busy = sum(e - s for _, s, e in median)
    span = median[-1][2] - median[0][1]
    return {"kernels": len(median), "kernel_us": round(busy, 1), "span_us": round(span, 1),
            "idle_us": round(span - busy, 1), "forwards": len(forwards),
            "trace": [(n, round(e - s, 2)) for n, s, e in median]}


def is_conv_kernel(name: str) -> bool:
    """cuDNN/CUTLASS conv kernels in a torch.compile trace (its Triton kernels are 'triton_*')."""
    low = name.lower()
    return not low.startswith("triton") and "memcpy" not in low and "elementwise" not in low \
        and "reduce_kernel" not in low and "copy" not in low


def inductor_conv_groups(trace) -> list[tuple[str, float]]:
    """Each conv kernel with the kernels after it, up to the next conv: (first name, us)."""
    groups = []
    for name, us in trace:
        if is_conv_kernel(name) and (not groups or not is_conv_kernel(groups[-1][2])):
            groups.append([name, 0.0, name])
        if groups:
            groups[-1][1] += us
            groups[-1][2] = name
    return [(g[0], g[1]) for g in groups]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("breakdown.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    model, size = build_model(args.model)
    torch.manual_seed(1)
    x = torch.randn(args.batch, 3, size, size, device="cuda")
    with torch.no_grad():
        gie = torch_gie.compile(model, x, precision="fp16")
        steps = gie.profile()
        gie_trace = summarize(kernel_forwards(lambda: gie(x), args.iters))
        half = build_model(args.model)[0].half().to(memory_format=torch.channels_last)
        xh = x.half().to(memory_format=torch.channels_last)
        compiled = torch.compile(half, mode="reduce-overhead" if args.batch <= 8 else "default")
        for _ in range(3):
            compiled(xh)
        tc_trace = summarize(kernel_forwards(lambda: compiled(xh), args.iters))

    conv_steps = [s for s in steps if s["op"] == "conv2d"]
    groups = inductor_conv_groups(tc_trace["trace"])
    pairs = len(conv_steps) == len(groups)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    result = {"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": __import__("triton").__version__, "date": date},
              "model": args.model, "batch": args.batch, "gie_steps": steps, "gie_trace": gie_trace,
              "torch_compile_trace": tc_trace, "torch_compile_conv_groups": groups}
    lines = [f"# {args.model} batch {args.batch}: torch_gie fp16 vs torch.compile ({result['env']})", "",
             "| | kernels/forward | kernel time us | span us | idle between kernels us |", "|---|---|---|---|---|"]
    for label, t in (("torch_gie", gie_trace), ("torch.compile", tc_trace)):
        lines.append(f"| {label} | {t['kernels']} | {t['kernel_us']} | {t['span_us']} | {t['idle_us']} |")
    step_sum = sum(s["ms"] for s in steps) * 1e3
    lines += ["", f"torch_gie steps replayed one by one: {step_sum:.1f} us in all.", ""]
    if pairs:
        lines += ["| # | torch_gie layer | kernel | gie us | torch.compile us | torch.compile kernel |",
                  "|---|---|---|---|---|---|"]
        for i, (s, (name, us)) in enumerate(zip(conv_steps, groups)):
            lines.append(f"| {i} | {s['name']} | {s['kernel']} | {s['ms'] * 1e3:.1f} | {us:.1f} | {name[:60]} |")
        other = [s for s in steps if s["op"] != "conv2d" and s["launches"]]
        lines.append(f"| | other steps ({len(other)}) | | {sum(s['ms'] for s in other) * 1e3:.1f} | | |")
    else:
        lines += [f"(conv counts differ: {len(conv_steps)} torch_gie conv steps, {len(groups)} "
                  "torch.compile conv groups; listed separately)", "", "| torch_gie step | kernel | us |",
                  "|---|---|---|"]
        lines += [f"| {s['name']} | {s['kernel']} | {s['ms'] * 1e3:.1f} |" for s in steps if s["launches"]]
        lines += ["", "| torch.compile kernel | us |", "|---|---|"]
        lines += [f"| {n[:80]} | {us} |" for n, us in tc_trace["trace"]]
    text = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"breakdown-{args.model}-b{args.batch}-{date.replace(':', '')}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    print(text)
    print("median step us:", statistics.median(s["ms"] * 1e3 for s in steps if s["launches"]))


if __name__ == "__main__":
    main()
