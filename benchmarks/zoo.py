"""Model-zoo benchmark: every torchvision classification model through torch_gie, as a new user
would try it. Per model: compiles or not (with the error), fallbacks by op, relative error against
eager fp32 (TF32 off) in fp32 and fp16, and optionally latency beside eager fp16 channels_last and
torch.compile in its "default" and "reduce-overhead" modes.

Models are torchvision's random initialization (nothing is downloaded; parameters initialized to
all zeros, such as transformer heads, are redrawn so outputs are not trivially zero) with BatchNorm
statistics calibrated on random images (``testing.calibrate_batchnorm_``), so activations neither vanish nor
overflow fp16. fp16 passes when its error is at most max(1e-2, 2x eager fp16's own error); fp32
when it is at most 1e-3.

The correctness phase runs in ``--jobs`` processes (Triton compiles are CPU-bound); the timing
phase runs alone, in this process. Examples:

    python benchmarks/zoo.py --jobs 8                                   # all models, check only
    python benchmarks/zoo.py --models efficientnet_b0,resnet50 --speed --batches 1,32 --tune
"""
from __future__ import annotations

import argparse
import collections
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings

import torch
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch_gie  # noqa: E402
from torch_gie.testing import calibrate_batchnorm_, redraw_zero_parameters_, rel_err  # noqa: E402
from torch_gie.timing import time_calls  # noqa: E402

HUGE = ("vit_h_14", "regnet_y_128gf")
SPEED_MODELS = ("efficientnet_b0", "mobilenet_v3_large", "regnet_y_400mf", "resnext50_32x4d",
                "shufflenet_v2_x1_0", "mnasnet1_0", "convnext_tiny", "wide_resnet50_2")
FP32_TOL, FP16_TOL = 1e-3, 1e-2


def all_models(skip_huge: bool) -> list[str]:
    names = torchvision.models.list_models(module=torchvision.models)
    return [n for n in names if not (skip_huge and n in HUGE)]


def input_size(name: str) -> int:
    return 299 if name.startswith("inception") else 224


def build(name: str, device: str) -> torch.nn.Module:
    kwargs = {"init_weights": True} if name in ("googlenet", "inception_v3") else {}
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs).to(device).eval()
    redraw_zero_parameters_(model)  # zero-initialized heads (ViT, Swin) would make every output 0
    size = input_size(name)
    return calibrate_batchnorm_(model, torch.empty(8, 3, size, size, device=device))


def _error(out, ref) -> float:
    try:
        return rel_err(out.float() if isinstance(out, torch.Tensor) else out, ref)
    except AssertionError:  # NaN/inf
        return float("inf")


@torch.no_grad()
def check_model(name: str, device: str, precisions: list[str], batch: int) -> dict:
    """Compile in each precision and compare with eager fp32; the row for the table."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    row: dict = {"model": name}
    t0 = time.perf_counter()
    model = build(name, device)
    size = input_size(name)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch, 3, size, size, device=device, generator=g)
    ref = model(x).float()
    if "fp16" in precisions:
        half = _copy(model).half().to(memory_format=torch.channels_last)
        row["eager_fp16_err"] = _error(half(x.half().to(memory_format=torch.channels_last)), ref)
        del half
    for precision in precisions:
        key = precision
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                start = time.perf_counter()
                compiled = torch_gie.compile(model, x, precision=precision)
                row[f"{key}_build_s"] = round(time.perf_counter() - start, 1)
            out = compiled(x)
            row[f"{key}_err"] = _error(out, ref)
            report = compiled.report()
            row["fallbacks"] = dict(collections.Counter(f["op"] for f in report["fallback_ops"]))
            row["fallback_reasons"] = sorted({f"{f['op']}: {f['reason']}" for f in report["fallback_ops"]})
            row["launches"] = report["launches"]
            row["reference_layers"] = sum(layer.get("backend") == "reference" for layer in report["layers"])
            del compiled
        except Exception as exc:  # one failing model must not sink the run
            row[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:500]
            traceback.print_exc()
        gc.collect()
        torch.cuda.empty_cache() if device == "cuda" else None
    row["ok"] = _passes(row, precisions)
    row["check_s"] = round(time.perf_counter() - t0, 1)
    return row


def _copy(model):
    import copy
    return copy.deepcopy(model)


def _passes(row: dict, precisions: list[str]) -> bool:
    ok = True
    if "fp32" in precisions:
        ok &= row.get("fp32_err", float("inf")) <= FP32_TOL
    if "fp16" in precisions:
        ok &= row.get("fp16_err", float("inf")) <= max(FP16_TOL, 2 * row.get("eager_fp16_err", 0.0))
    return bool(ok)


SPEED_VARIANTS = ("eager_fp16", "compile_default", "compile_reduce_overhead", "gie_fp16")


@torch.no_grad()
def time_model(name: str, batch: int, tune, iters: int, variants=SPEED_VARIANTS, warm_only=False) -> list[dict]:
    """p50 latency of eager fp16 channels_last, torch.compile (both modes) and torch_gie fp16.
    ``warm_only``: build every variant (filling Triton's and Inductor's on-disk caches, and with
    ``tune`` timing kernel configs) but time nothing: the parallel warm-up of ``--warm-jobs``."""
    model = build(name, "cuda")
    size = input_size(name)
    x = torch.randn(batch, 3, size, size, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    rows = []
    for variant in variants:
        row = {"model": name, "batch": batch, "variant": variant}
        try:
            m = _copy(model)
            t0 = time.perf_counter()
            if variant == "gie_fp16":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    gie = torch_gie.compile(m, x, precision="fp16", tune=tune)
                fn = lambda: gie(x)  # noqa: E731
            else:
                half = m.half().to(memory_format=torch.channels_last)
                xh = x.half().to(memory_format=torch.channels_last)
                if variant == "eager_fp16":
                    fn = lambda: half(xh)  # noqa: E731
                else:
                    mode = "default" if variant == "compile_default" else "reduce-overhead"
                    compiled = torch.compile(half, mode=mode)
                    for _ in range(3):
                        compiled(xh)
                    fn = lambda: compiled(xh)  # noqa: E731
            fn()
            torch.cuda.synchronize()
            row["build_s"] = round(time.perf_counter() - t0, 1)
            if not warm_only:
                row.update(time_calls(fn, iters=iters, warmup=10))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            traceback.print_exc()
        print(json.dumps(row), flush=True)
        rows.append(row)
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    return rows


def check_table(rows: list[dict]) -> str:
    head = ["model", "fp32 err", "fp16 err", "eager fp16 err", "pass", "fallbacks", "launches", "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: r["model"]):
        fb = ", ".join(f"{k} x{v}" for k, v in r.get("fallbacks", {}).items()) or "0"
        err = (r.get("fp32_error") or r.get("fp16_error") or "")[:80].replace("|", "/")
        lines.append(f"| {r['model']} | {_fmt(r.get('fp32_err'))} | {_fmt(r.get('fp16_err'))} | "
                     f"{_fmt(r.get('eager_fp16_err'))} | {'yes' if r.get('ok') else 'NO'} | {fb} | "
                     f"{r.get('launches', '')} | {err} |")
    return "\n".join(lines)


def speed_table(rows: list[dict]) -> str:
    head = ["model", "batch", "eager fp16 ms", "compile default ms", "compile r-o ms", "torch_gie ms",
            "vs best compile"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(r["model"], r["batch"]) for r in rows})
    for model, batch in keys:
        ms = {r["variant"]: r.get("p50_ms") for r in rows if (r["model"], r["batch"]) == (model, batch)}
        best = min((v for k, v in ms.items() if k.startswith("compile") and v), default=None)
        gie = ms.get("gie_fp16")
        ratio = f"{best / gie:.2f}x" if best and gie else ""
        lines.append(f"| {model} | {batch} | " + " | ".join(_fmt(ms.get(v), ".3f") for v in
                     ("eager_fp16", "compile_default", "compile_reduce_overhead", "gie_fp16")) + f" | {ratio} |")
    return "\n".join(lines)


def _fmt(v, spec=".1e") -> str:
    return "" if v is None else format(v, spec)


def _run_shards(args, models: list[str], stem: str) -> list[dict]:
    """The check phase over ``args.jobs`` subprocesses, each taking every jobs-th model."""
    procs = []
    for k in range(args.jobs):
        part = models[k::args.jobs]
        if not part:
            continue
        cmd = [sys.executable, __file__, "--models", ",".join(part), "--precisions", args.precisions,
               "--check-batch", str(args.check_batch), "--jobs", "1", "--rows-out", f"{stem}.part{k}.jsonl"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL if args.quiet else None))
    for p in procs:
        p.wait()
    rows = []
    for k in range(args.jobs):
        path = f"{stem}.part{k}.jsonl"
        if os.path.exists(path):
            with open(path) as f:
                rows += [json.loads(line) for line in f if line.strip()]
            os.remove(path)
    return rows


def _warm(args) -> None:
    """Build every (model, batch) of the timing phase in ``args.warm_jobs`` processes at once."""
    items = [f"{m}:{b}" for m in args.speed_models.split(",") for b in args.batches.split(",")]
    procs = []
    for k in range(args.warm_jobs):
        part = items[k::args.warm_jobs]
        if part:
            env = {**os.environ, "TORCH_GIE_CACHE": f"/tmp/torch_gie_warm_{k}.json"}
            cmd = [sys.executable, __file__, "--warm-only", "--speed-models", ",".join(part), "--tune", args.tune]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL if args.quiet else None))
    for p in procs:
        p.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="all", help="comma-separated names, or 'all'")
    p.add_argument("--include-huge", action="store_true", help=f"also run {', '.join(HUGE)}")
    p.add_argument("--precisions", default="fp32,fp16")
    p.add_argument("--check-batch", type=int, default=2)
    p.add_argument("--no-check", action="store_true", help="skip the correctness phase")
    p.add_argument("--speed", action="store_true", help="also time the speed models")
    p.add_argument("--speed-models", default=",".join(SPEED_MODELS))
    p.add_argument("--batches", default="1,32")
    p.add_argument("--tune", default="false", choices=("false", "true", "refresh"))
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--jobs", type=int, default=1, help="processes for the correctness phase")
    p.add_argument("--warm-jobs", type=int, default=0,
                   help="before timing, build (and with --tune, tune) every speed variant in this many processes "
                        "so the serial timing phase finds compiled kernels in the on-disk caches; their config "
                        "timings (skewed by sharing the GPU) go to throwaway caches, so use --tune refresh then")
    p.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--rows-out", help=argparse.SUPPRESS)  # a shard's output (JSON lines)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = all_models(not args.include_huge) if args.models == "all" else args.models.split(",")
    precisions = args.precisions.split(",")

    tune = {"false": False, "true": True, "refresh": "refresh"}[args.tune]
    if args.warm_only:  # a warm-up shard
        for item in args.speed_models.split(","):
            name, batch = item.split(":")
            time_model(name, int(batch), tune, 0, warm_only=True)
        return
    if args.rows_out:  # a shard: check its models, one JSON line each
        for name in models:
            row = check_model(name, device, precisions, args.check_batch)
            with open(args.rows_out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name}: {'ok' if row['ok'] else 'FAIL'} {json.dumps(row)}", flush=True)
        return

    env = {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "triton": __import__("triton").__version__, "torchvision": torchvision.__version__,
           "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join(sys.argv)}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"zoo-{env['date'].replace(':', '')}")
    result = {"env": env, "check": [], "speed": []}

    def save():
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1)

    if not args.no_check:
        result["check"] = _run_shards(args, models, stem)
        save()
    if args.speed and args.warm_jobs:
        _warm(args)
    if args.speed:
        for name in args.speed_models.split(","):
            for batch in map(int, args.batches.split(",")):
                result["speed"] += time_model(name, batch, tune, args.iters)
                save()
    text = f"{env}\n\n"
    if result["check"]:
        ok = sum(r.get("ok", False) for r in result["check"])
        text += f"{ok} of {len(result['check'])} models pass\n\n{check_table(result['check'])}\n\n"
    if result["speed"]:
        text += speed_table(result["speed"]) + "\n"
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
