"""The compile report: what was captured, what the passes fused, what each launch does, how
much memory the plan takes; as a dict (``GIEModule.report()``) and as readable text."""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from .graph import is_compute, is_fallback_compute, target_name
from .passes import PassResult
from .plan import Plan
from .runtime.steps import KernelStep, Step

_PRECISION_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.int8: "int8"}


def count_compute_ops(gm: fx.GraphModule) -> int:
    """Ops an eager run executes (what ``layers_in`` reports): canonical and fallback compute."""
    return sum(1 for n in gm.graph.nodes if is_compute(n))


def _shapes(nodes) -> list[list[int]]:
    return [list(n.meta["shape"]) for n in nodes if "shape" in n.meta]


def _layer(step: Step, plan: Plan) -> dict[str, Any]:
    node = step.node
    entry = {"name": step.name, "op": step.op, "input_shapes": _shapes(node.all_input_nodes),
             "output_shapes": _shapes([node]), "launches": step.launches}
    if isinstance(step, KernelStep):
        entry["precision"] = _PRECISION_NAMES.get(plan.dtype, str(plan.dtype))
        entry["backend"] = step.backend
        ep = getattr(node.meta.get("spec"), "epilogue", None)
        if ep is not None and not ep.is_empty:
            entry["epilogue"] = ep.describe()
        kernel = getattr(step.kernel, "describe", None)
        if kernel is not None:
            entry["kernel"] = kernel()
    else:
        entry["precision"] = _PRECISION_NAMES.get(node.meta.get("dtype"), str(node.meta.get("dtype")))
        entry["backend"] = "pytorch"
    return entry


def fallback_ops(gm: fx.GraphModule) -> list[dict[str, str]]:
    """Each node PyTorch runs for us: its name, op and why no rewrite covered it."""
    return [{"name": n.name, "op": target_name(n, gm),
             "reason": n.meta.get("fallback_reason", "no torch_gie lowering")}
            for n in gm.graph.nodes if is_fallback_compute(n)]


def fallback_warning(gm: fx.GraphModule) -> str | None:
    """One line per fallback op kind (count and reason), or None when everything is lowered."""
    by_op: dict[str, list[dict]] = {}
    for f in fallback_ops(gm):
        by_op.setdefault(f["op"], []).append(f)
    if not by_op:
        return None
    lines = [f"  {op} x{len(fs)}: {fs[0]['reason']}" for op, fs in sorted(by_op.items())]
    return (f"torch_gie: {sum(map(len, by_op.values()))} op(s) run as PyTorch fallbacks (between kernels, "
            "inside the CUDA graph):\n" + "\n".join(lines))


def build_report(*, model: str, layers_in: int, results: list[PassResult], gm: fx.GraphModule,
                 plan: Plan, steps: list[Step], precision: str, backend: str, device: str) -> dict[str, Any]:
    by_name = {r.name: r for r in results}
    concat = by_name.get("eliminate_concat", PassResult())
    return {
        "model": model,
        "precision": precision,
        "backend": backend,
        "device": device,
        "layers_in": layers_in,
        "launches": sum(s.launches for s in steps),
        "concats_eliminated": concat.counts.get("eliminated", 0),
        "concat_copies": concat.counts.get("copies", 0),
        "fusions": [f for r in results for f in r.fusions],
        "fallback_ops": fallback_ops(gm),
        "layers": [_layer(s, plan) for s in steps if s.launches > 0],
        "arena_bytes": plan.arena_bytes,
        "naive_activation_bytes": plan.naive_bytes,
        "buffers": len(plan.buffers),
        "passes": [{"name": r.name, "ms": round(1e3 * r.seconds, 2), **r.counts} for r in results],
    }


def format_report(report: dict[str, Any]) -> str:
    """A few readable lines: the headline numbers, then what fused and what fell back."""
    kinds: dict[str, int] = {}
    for f in report["fusions"]:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    lines = [
        f"torch_gie report: {report['model']} ({report['precision']}, {report['backend']} backend, "
        f"{report['device']})",
        f"  ops in captured graph : {report['layers_in']}",
        f"  launches per forward  : {report['launches']}",
        "  fusions               : " + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())),
        f"  concats eliminated    : {report['concats_eliminated']} (copies left: {report['concat_copies']})",
        f"  activation arena      : {report['arena_bytes'] / 2**20:.2f} MiB "
        f"(vs {report['naive_activation_bytes'] / 2**20:.2f} MiB without reuse, {report['buffers']} buffers)",
        f"  fallback ops          : {len(report['fallback_ops'])}"
        + (" (" + ", ".join(sorted({f['op'] for f in report['fallback_ops']})) + ")"
           if report["fallback_ops"] else ""),
    ]
    by_op: dict[str, list[dict]] = {}
    for f in report["fallback_ops"]:
        by_op.setdefault(f["op"], []).append(f)
    for op, fs in sorted(by_op.items()):
        lines.append(f"    fallback {op} x{len(fs)}: {fs[0].get('reason', '')}")
    library = [layer for layer in report["layers"] if "library call" in layer.get("kernel", "")]
    if library:
        lines.append(f"  library calls         : {len(library)} ({library[0]['kernel']})")
    for p in report["passes"]:
        counts = ", ".join(f"{k}={v}" for k, v in p.items() if k not in ("name", "ms"))
        lines.append(f"    pass {p['name']:<28} {p['ms']:7.1f} ms  {counts}")
    return "\n".join(lines)
