"""Dynamo's own host cost per call, apart from any backend: ``torch.compile`` with a backend that
returns a precomputed output, so the time per call is Dynamo's frame evaluation, guards and
argument passing alone. Shows what ``torch.compile(model, backend="torch_gie")`` pays on top of
``torch_gie.compile`` at small batches, and what each of Dynamo's switches saves:

    python benchmarks/dynamo_overhead.py --model googlenet --calls 2000

Rows: default guards; module guards skipped (``guard_filter_fn=
torch.compiler.skip_guard_on_all_nn_modules_unsafe``, README's recipe); the
``skip_guard_eval_unsafe`` stance; no inlining of built-in modules plus the filter; and the
returned function called directly. CPU tensors: nothing here waits on a GPU.
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision


def per_call_us(fn, x: torch.Tensor, calls: int) -> float:
    for _ in range(50):
        fn(x)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="googlenet")
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()
    kwargs = {"init_weights": True, "aux_logits": False} if args.model == "googlenet" else {}
    model = torchvision.models.get_model(args.model, weights=None, **kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    out = torch.randn(1, 1000)

    def cached(gm, example_inputs):
        return lambda *a: (out,)

    skip_modules = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    rows = []
    with torch.no_grad():
        torch._dynamo.reset()
        rows.append(("default guards", per_call_us(torch.compile(model, backend=cached), x, args.calls)))
        torch._dynamo.reset()
        c = torch.compile(model, backend=cached, options=skip_modules)
        rows.append(("module guards skipped", per_call_us(c, x, args.calls)))
        torch._dynamo.reset()
        c = torch.compile(model, backend=cached)
        c(x)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            rows.append(("skip_guard_eval_unsafe stance", per_call_us(c, x, args.calls)))
        torch._dynamo.reset()
        inline = torch._dynamo.config.inline_inbuilt_nn_modules
        torch._dynamo.config.inline_inbuilt_nn_modules = False  # set for the calls too, not just the trace
        try:
            c = torch.compile(model, backend=cached, options=skip_modules)
            rows.append(("no module inlining, module guards skipped", per_call_us(c, x, args.calls)))
        finally:
            torch._dynamo.config.inline_inbuilt_nn_modules = inline
        rows.append(("the returned function alone", per_call_us(lambda t: cached(None, None)(t), x, args.calls)))
    print(f"{args.model}: Dynamo's host cost per call, torch {torch.__version__}")
    print("| variant | us per call |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
