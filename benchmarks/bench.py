"""Side-by-side inference benchmark on one GPU, in one process: eager fp32, eager fp16
channels_last (cudnn.benchmark), torch.compile (default; "reduce-overhead" for batch <= 8) and
torch_gie fp32/fp16/int8 (int8 calibrated on other random images), on torchvision models at
several batch sizes. ``--variants ...,gie_dynamo`` adds torch_gie through
``torch.compile(backend="torch_gie")`` (``gie_dynamo_lean``: without Dynamo's guards on module
attributes); ``gie_int8_mixed --layer-precisions FILE`` int8 with the layers FILE pins to fp16.

Reports images/s, p50/p99 latency (CUDA events, warm-up, median of many runs), build time and
relative error against the fp32 eager output (tf32 off), writes JSON and a markdown table under
benchmarks/results/ and prints the table last. Example:

    python benchmarks/bench.py --models resnet50,googlenet --batches 1,128
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import sys
import time
import traceback

import torch
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch_gie  # noqa: E402
from torch_gie.testing import calibrate_batchnorm_, rel_err  # noqa: E402
from torch_gie.timing import time_calls  # noqa: E402

MODELS = ["resnet50", "googlenet", "inception_v3", "vgg16", "mobilenet_v2", "densenet121"]
VARIANTS = ["eager_fp32", "eager_fp16", "torch_compile", "gie_fp32", "gie_fp16", "gie_int8"]


def build_model(name: str) -> tuple[torch.nn.Module, int]:
    """torchvision's own random initialization (nothing is downloaded), with every BatchNorm's
    statistics calibrated on random images, as training would set them. With identity statistics
    Inception-v3's init (std 0.1) and MobileNet-v2's unnormalized residual stream overflow fp16
    (eager too, relative error 1.0), and GoogLeNet's activations vanish: its logits are the fc
    bias whatever the image, which made its error figures vacuous before 2026-12-04 (ResNet-50's
    and DenseNet-121's logits varied by only 1-2% between images)."""
    kwargs = {"init_weights": True} if name in ("googlenet", "inception_v3") else {}
    size = 299 if name == "inception_v3" else 224
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs).cuda().eval()
    calibrate_batchnorm_(model, torch.empty(8, 3, size, size, device="cuda"))
    return model, size


def make_variant(variant: str, model: torch.nn.Module, x: torch.Tensor, batch: int):
    """(callable taking no args, build seconds)."""
    t0 = time.perf_counter()
    if variant == "eager_fp32":
        fn = lambda: model(x)  # noqa: E731
    elif variant in ("gie_dynamo", "gie_dynamo_lean"):  # torch.compile(backend="torch_gie")
        from torch_gie.dynamo_backend import register
        register()  # a no-op where pip installed the entry point
        options = {"precision": "fp16", "tune": "refresh" if ARGS.retune else ARGS.tune}
        if variant == "gie_dynamo_lean":  # no guards on module attributes (the README says why)
            options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        compiled = torch.compile(model, backend="torch_gie", options=options)
        for _ in range(2):
            compiled(x)
        fn = lambda: compiled(x)  # noqa: E731
    elif variant in ("eager_fp16", "torch_compile"):
        half = model.half().to(memory_format=torch.channels_last)
        xh = x.half().to(memory_format=torch.channels_last)
        if variant == "torch_compile":
            mode = "reduce-overhead" if batch <= 8 else "default"
            compiled = torch.compile(half, mode=mode)
            for _ in range(3):
                compiled(xh)
            fn = lambda: compiled(xh)  # noqa: E731
        else:
            fn = lambda: half(xh)  # noqa: E731
    else:
        precision = variant.split("_")[1]
        # Tuning (fp16 and int8 only: it doubles the build, and fp32 is the accuracy baseline).
        tune = ("refresh" if ARGS.retune else ARGS.tune) if precision in ("fp16", "int8") else False
        kwargs = {}
        if precision == "int8":  # calibrated on other random images than the timed input
            g = torch.Generator("cuda").manual_seed(7)
            kwargs["calibration_data"] = [torch.randn((min(batch, 32),) + tuple(x.shape[1:]), device="cuda",
                                                      generator=g) for _ in range(4)]
        if variant == "gie_int8_mixed":
            kwargs["layer_precisions"] = layer_precisions(ARGS.layer_precisions)
        gie = torch_gie.compile(model, x, precision=precision, tune=tune, **kwargs)
        fn = lambda: gie(x)  # noqa: E731
        fn.gie = gie
    torch.cuda.synchronize()
    return fn, time.perf_counter() - t0


def layer_precisions(path: str | None) -> dict[str, str]:
    """``--layer-precisions``: a JSON {"layer": "fp16", ...}, or a benchmarks/accuracy.py result
    whose accuracy-budget row lists the layers its search kept in fp16."""
    if not path:
        raise SystemExit("variant gie_int8_mixed needs --layer-precisions FILE")
    with open(path) as f:
        data = json.load(f)
    if "rows" in data:
        found = [r["int8_search"]["fp16_layers"] for r in data["rows"] if r.get("int8_search")]
        if not found:
            raise SystemExit(f"{path}: no row with an accuracy-budget search (int8_search)")
        return {name: "fp16" for name in found[0]}
    return data


def bench_one(name: str, batch: int, variants: list[str]) -> list[dict]:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model, size = build_model(name)
    torch.manual_seed(1)
    x = torch.randn(batch, 3, size, size, device="cuda")
    with torch.no_grad():
        ref = model(x).float().clone()
    rows = []
    for variant in variants:
        torch.backends.cudnn.benchmark = variant != "eager_fp32"
        # Copies of one model (eager_fp16 converts its copy in place): BatchNorm calibration runs
        # once, so every variant computes the same function as the fp32 reference.
        fresh = copy.deepcopy(model) if variant != "eager_fp32" else model
        row = {"model": name, "batch": batch, "variant": variant}
        try:
            with torch.no_grad():
                fn, build_s = make_variant(variant, fresh, x, batch)
                out = fn()
                row["rel_err"] = rel_err(out.float(), ref)
                t = time_calls(fn, iters=ARGS.iters, warmup=10)
            row.update(t, build_s=round(build_s, 2), images_per_s=batch / t["p50_ms"] * 1e3)
            gie = getattr(fn, "gie", None)
            if gie is not None:
                r = gie.report()
                row.update(launches=r["launches"], layers_in=r["layers_in"], fallbacks=len(r["fallback_ops"]),
                           concat_copies=r["concat_copies"], concats_eliminated=r["concats_eliminated"],
                           arena_mib=round(r["arena_bytes"] / 2**20, 1))
                if ARGS.layers:
                    row["layer_ms"] = gie.profile()
        except Exception as exc:  # one failing variant must not sink the whole run
            row["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        print(json.dumps({k: v for k, v in row.items() if k != "layer_ms"}), flush=True)
        rows.append(row)
        del fresh
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    return rows


def markdown(rows: list[dict]) -> str:
    header = ["model", "batch", "variant", "images/s", "p50 ms", "p99 ms", "build s", "rel err", "launches",
              "speedup of gie_fp16"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | error: {r['error'][:80]} |||||||")
            continue
        gie = next((g for g in rows if g["model"] == r["model"] and g["batch"] == r["batch"]
                    and g["variant"] == "gie_fp16" and "p50_ms" in g), None)
        speed = f"{r['p50_ms'] / gie['p50_ms']:.2f}x" if gie and r["variant"] != "gie_fp16" else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['images_per_s']:,.0f} | "
                     f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['build_s']:.1f} | {r['rel_err']:.1e} | "
                     f"{r.get('launches', '')} | {speed} |")
    return "\n".join(lines)


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batches", default="1,8,128")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--tune", action="store_true", help="let torch_gie fp16 time configs of layers no cache knows")
    p.add_argument("--retune", action="store_true", help="torch_gie fp16 re-times every layer (tune='refresh')")
    p.add_argument("--layers", action="store_true", help="record torch_gie's per-layer times")
    p.add_argument("--layer-precisions", help="variant gie_int8_mixed: layers pinned to fp16 (JSON, or an "
                   "accuracy.py result with an accuracy-budget row)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ARGS = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.py needs a CUDA GPU")
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "torchvision": torchvision.__version__,
           "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds")}
    rows = []
    os.makedirs(ARGS.out, exist_ok=True)
    stem = os.path.join(ARGS.out, f"bench-{env['date'].replace(':', '')}")
    for name in ARGS.models.split(","):
        for batch in map(int, ARGS.batches.split(",")):
            rows += bench_one(name, batch, ARGS.variants.split(","))
            with open(stem + ".json", "w") as f:  # after every model, so a cut-short run keeps its rows
                json.dump({"env": env, "rows": rows}, f, indent=1)
    table = markdown(rows)
    with open(stem + ".md", "w") as f:
        f.write(f"{env}\n\n{table}\n")
    print(env)
    print(table)


ARGS: argparse.Namespace
if __name__ == "__main__":
    main()
