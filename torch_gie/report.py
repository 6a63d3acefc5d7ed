"""The compile report: what was captured, what the passes fused, what each launch does, how
much memory the plan takes; as a dict (``GIEModule.report()``) and as readable text."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx

from . import ops
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
        quant = node.meta.get("quant")
        if quant is not None:
            entry["precision"] = "int8"
            entry["quant"] = {"input": _qp(quant.input), "output": _qp(quant.output) if quant.output
                              else f"real ({_PRECISION_NAMES.get(quant.out_dtype)})"}
            if quant.residual is not None:
                entry["quant"]["residual"] = _qp(quant.residual)
        entry["macs"] = _macs(node)
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


def _qp(qp) -> str:
    """A QParams for people: its scale, and the real range its codes cover."""
    lo, hi = qp.real_range
    return f"scale {qp.scale:.4g}, {'unsigned' if qp.unsigned else 'signed'} [{lo:.4g}, {hi:.4g}]"


def _macs(node: fx.Node) -> int:
    """Multiply-accumulates of a conv or Linear (0 for other ops)."""
    s = node.meta.get("spec")
    shape = node.meta.get("shape")
    if node.target is ops.conv2d and shape is not None:
        return math.prod(shape) * s.weight[0].numel()
    if node.target is ops.conv2d:  # merged convs: one shape per segment
        segments = [u for u in node.users if u.meta.get("segment_of") is node]
        return sum(math.prod(u.meta["shape"]) for u in segments) * s.weight[0].numel()
    if node.target is ops.linear and shape is not None:
        return math.prod(shape) * s.weight.shape[1]
    return 0


def int8_summary(layers: list[dict]) -> dict[str, Any] | None:
    """How many layers and what share of the MACs run int8 (None in float builds)."""
    int8 = [entry for entry in layers if entry.get("precision") == "int8"]
    if not int8:
        return None
    macs = sum(entry.get("macs", 0) for entry in layers)
    int8_macs = sum(entry.get("macs", 0) for entry in int8)
    return {"int8_layers": len(int8), "kernel_layers": sum("macs" in entry for entry in layers),
            "int8_mac_share": int8_macs / macs if macs else 0.0}


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
                 plan: Plan, steps: list[Step], precision: str, backend: str, device: str,
                 batch_range=None) -> dict[str, Any]:
    """The report dict. With a ``batch_range`` (a ``BatchRange``) the layers' shapes and launches
    are those at ``opt``, and the arena is the one planned for ``max``."""
    by_name = {r.name: r for r in results}
    concat = by_name.get("eliminate_concat", PassResult())
    return {
        "model": model,
        "precision": precision,
        "backend": backend,
        "device": device,
        "batch_range": batch_range.as_tuple() if batch_range is not None else None,
        "layers_in": layers_in,
        "launches": sum(s.launches for s in steps),
        "concats_eliminated": concat.counts.get("eliminated", 0),
        "concat_copies": concat.counts.get("copies", 0),
        "fusions": [f for r in results for f in r.fusions],
        "fallback_ops": fallback_ops(gm),
        "layers": (layers := [_layer(s, plan) for s in steps if s.launches > 0]),
        "int8": int8_summary(layers),
        "int8_search": plan.precision.search if plan.precision is not None else None,
        "arena_bytes": plan.arena_bytes,
        "naive_activation_bytes": plan.naive_bytes,
        "buffers": len(plan.buffers),
        "passes": [{"name": r.name, "ms": round(1e3 * r.seconds, 2), **r.counts} for r in results],
    }


def _search_line(search: dict[str, Any]) -> str:
    """The accuracy-budget search in one line: the budget, what it kept in fp16, what it measured."""
    last = next((e for e in reversed(search["log"]) if e["meets"]), search["log"][-1])
    return (f"  int8 accuracy budget  : {search['budget']}: {len(search['fp16_layers'])} of {search['candidates']} "
            f"int8 layers kept in fp16, measured top-1 {last['top1_agreement']:.3f}, SQNR {last['sqnr_db']:.1f} dB "
            f"on {search['samples']} samples ({search['evaluations']} evaluations, {search['seconds']:.1f} s)")


def format_report(report: dict[str, Any]) -> str:
    """A few readable lines: the headline numbers, then what fused and what fell back."""
    kinds: dict[str, int] = {}
    for f in report["fusions"]:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    lines = [
        f"torch_gie report: {report['model']} ({report['precision']}, {report['backend']} backend, "
        f"{report['device']})",
        *([f"  batch range           : {report['batch_range'][0]}..{report['batch_range'][2]} "
           f"(tuned for {report['batch_range'][1]}, arena planned for {report['batch_range'][2]})"]
          if report.get("batch_range") else []),
        f"  ops in captured graph : {report['layers_in']}",
        f"  launches per forward  : {report['launches']}",
        "  fusions               : " + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())),
        f"  concats eliminated    : {report['concats_eliminated']} (copies left: {report['concat_copies']})",
        f"  activation arena      : {report['arena_bytes'] / 2**20:.2f} MiB "
        f"(vs {report['naive_activation_bytes'] / 2**20:.2f} MiB without reuse, {report['buffers']} buffers)",
        *([f"  int8                  : {report['int8']['int8_layers']} of {report['int8']['kernel_layers']} "
           f"kernel layers, {100 * report['int8']['int8_mac_share']:.1f}% of MACs (the rest fp16)"]
          if report.get("int8") else []),
        *([_search_line(report["int8_search"])] if report.get("int8_search") else []),
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
