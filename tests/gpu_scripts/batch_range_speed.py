"""GPU check of dynamic batch (issue 9's acceptance): a ``batch_range=(1, 32, 128)`` ResNet-50 fp16
engine against a fixed-shape engine at batch 32 (throughput at opt must be within 5%), and its
outputs at batch 1, 7, 32 and 128 against fp32 eager. Not a pytest file: run it on a GPU machine,

    python tests/gpu_scripts/batch_range_speed.py [--json out.json]

Correct means: within max(2e-2, 1.5x the fixed engine's own error at opt) of fp32 eager (TF32
off), and the second call at that batch replays the same CUDA graph bit for bit.
It prints one JSON object: per engine the p50 ms (CUDA events, median of 50 calls after a
warm-up, the two engines timed in alternating rounds) and images/s at 32, the ratio, each batch
size's relative error and first-call time (its program built and captured on first use), and the
arenas' sizes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torchvision

import torch_gie
from torch_gie.testing import calibrate_batchnorm_, rel_err
from torch_gie.timing import time_calls

OPT, RANGE, CHECKED = 32, (1, 32, 128), (1, 7, 32, 128)
ROUNDS, ITERS = 5, 50


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--size", type=int, default=224, help="image size")
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = False  # the fp32 reference stays fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().cuda()
    x = torch.randn(OPT, 3, args.size, args.size, device="cuda")
    calibrate_batchnorm_(model, x)

    start = time.perf_counter()
    fixed = torch_gie.compile(model, x, precision="fp16")
    fixed_s = time.perf_counter() - start
    start = time.perf_counter()
    ranged = torch_gie.compile(model, x, precision="fp16", batch_range=RANGE)
    ranged_s = time.perf_counter() - start

    checks = {}
    for batch in CHECKED:
        xb = torch.randn(batch, 3, args.size, args.size, device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = ranged(xb)
        torch.cuda.synchronize()
        first_ms = 1e3 * (time.perf_counter() - start)
        with torch.no_grad():
            ref = model(xb)
        reused = ranged._program.program(batch).graph is not None and rel_err(ranged(xb), out) == 0
        checks[batch] = {"rel_err": rel_err(out, ref), "first_call_ms": round(first_ms, 1),
                         "graph_reused": reused}
    with torch.no_grad():
        fixed_err = rel_err(fixed(x), model(x))  # the yardstick: a fixed-shape fp16 engine's own error
    bound = max(2e-2, 1.5 * fixed_err)

    rounds = {"fixed": [], "batch_range": []}
    for _ in range(ROUNDS):  # alternate, so clock and thermal drift hit both alike
        rounds["fixed"].append(time_calls(lambda: fixed(x), iters=ITERS, warmup=10)["p50_ms"])
        rounds["batch_range"].append(time_calls(lambda: ranged(x), iters=ITERS, warmup=10)["p50_ms"])
    p50 = {k: statistics.median(v) for k, v in rounds.items()}
    result = {
        "gpu": torch.cuda.get_device_name(), "model": "resnet50", "precision": "fp16", "image": args.size,
        "batch_range": RANGE, "opt": OPT,
        "p50_ms": p50, "rounds_p50_ms": rounds,
        "images_per_s": {k: OPT / v * 1e3 for k, v in p50.items()},
        "throughput_ratio": p50["fixed"] / p50["batch_range"],  # >= 0.95 passes the acceptance
        "within_5_percent": p50["fixed"] / p50["batch_range"] >= 0.95,
        "correctness": checks, "fixed_engine_rel_err": fixed_err, "bound": bound,
        "all_correct": all(c["rel_err"] < bound and c["graph_reused"] for c in checks.values()),
        "build_s": {"fixed": round(fixed_s, 1), "batch_range": round(ranged_s, 1)},
        "arena_bytes": {"fixed": fixed.report()["arena_bytes"], "batch_range": ranged.report()["arena_bytes"]},
        "launches": {"fixed": fixed.report()["launches"], "batch_range": ranged.report()["launches"]},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return result


if __name__ == "__main__":
    main()
