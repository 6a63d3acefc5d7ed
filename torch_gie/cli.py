"""``torch-gie``: a trtexec-style command line.

Compiles a torchvision model (random weights unless you give a state dict), checks it against
eager PyTorch on random inputs, prints the fusion report, and on a GPU times it against eager
and torch.compile. With no arguments: ResNet-50, and on a GPU the quick benchmark.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

from . import compile as gie_compile
from .report import format_report
from .timing import time_calls

_TUNE = {"off": False, "new": True, "refresh": "refresh"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torch-gie", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", help="torchvision model name (default resnet50)")
    p.add_argument("--weights", help="a state_dict file (.pt) to load; default: random weights")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8 on GPU, 2 on CPU)")
    p.add_argument("--size", type=int, default=None, help="input height/width (default 224 GPU, 64 CPU)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default=None, help="default fp16 on GPU, fp32 on CPU")
    p.add_argument("--backend", choices=["auto", "triton", "reference"], default="auto")
    p.add_argument("--tune", choices=list(_TUNE), default="off",
                   help="off: cached kernel configs only; new: also time layers no cache knows; "
                        "refresh: time every layer (GPU)")
    p.add_argument("--layers", action="store_true", help="print each layer's GPU time (GPU)")
    p.add_argument("--iters", type=int, default=100, help="timed iterations on GPU")
    p.add_argument("--json", help="write the report (and timings) to this file")
    p.add_argument("--dot", help="write the optimized graph as Graphviz (.dot, and .svg if dot is installed)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _build_model(name: str, size: int, weights: str | None) -> torch.nn.Module:
    import torchvision
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = True
    try:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    except ValueError as exc:
        raise SystemExit(f"torch-gie: unknown model {name!r}: {exc}") from exc
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu"))
    return model.eval()


def _print_layers(compiled, cuda: bool) -> None:
    if not cuda or compiled.report()["backend"] != "triton":
        print("  per-layer times      : need a GPU and the triton backend")
        return
    rows = compiled.profile()
    total = sum(r["ms"] for r in rows)
    print(f"  per-layer GPU time (each step replayed alone in a CUDA graph; {total * 1e3:.1f} us in all):")
    for r in sorted(rows, key=lambda r: -r["ms"]):
        if r["launches"]:
            print(f"    {r['ms'] * 1e3:8.1f} us  {r['name']:<28} {r['kernel']}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch = args.batch or (8 if cuda else 2)
    size = args.size or (224 if cuda else 64)
    precision = args.precision or ("fp16" if cuda else "fp32")
    model = _build_model(args.model, size, args.weights).to(device)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device)

    t0 = time.perf_counter()
    compiled = gie_compile(model, x, precision=precision, backend=args.backend, tune=_TUNE[args.tune])
    build_s = time.perf_counter() - t0
    with torch.no_grad():
        ref = model.float()(x)
    out = compiled(x)
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    report = dict(compiled.report(), build_seconds=round(build_s, 2), max_rel_error=err)
    print(format_report(report))
    print(f"  build time            : {build_s:.1f} s")
    print(f"  rel. error vs eager   : {err:.2e}")
    if cuda:
        gie_ms = time_calls(lambda: compiled(x), iters=args.iters)["p50_ms"]
        half = model.half().to(memory_format=torch.channels_last)
        xh = x.half().to(memory_format=torch.channels_last)
        with torch.no_grad():
            eager_ms = time_calls(lambda: half(xh), iters=args.iters)["p50_ms"]
        report.update(gie_ms=gie_ms, eager_fp16_ms=eager_ms)
        print(f"  latency (median)      : torch_gie {gie_ms:.3f} ms, eager fp16 channels_last {eager_ms:.3f} ms "
              f"({batch / gie_ms * 1e3:,.0f} vs {batch / eager_ms * 1e3:,.0f} images/s)")
        print("  full side-by-side benchmark (torch.compile too): python benchmarks/bench.py")
    if args.layers:
        _print_layers(compiled, cuda)
    if args.dot:
        from .compiler import explain
        print("  graph written to", explain(model.float(), x, precision=precision, dot=args.dot)["dot"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    tol = 1e-4 if precision == "fp32" and args.backend == "reference" else 1e-2
    if not err < tol:
        print(f"torch-gie: FAILED: relative error {err:.2e} exceeds {tol:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
