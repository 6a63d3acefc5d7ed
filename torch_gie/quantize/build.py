"""The int8 steps of a build, between the rewrite passes and kernel lowering: pick the int8
layers (``plan.precision``), calibrate the quantization classes on the user's data (or read
them from a calibration cache), and give every int8 layer its ``LayerQuant``
(``node.meta["quant"]``), which the backends lower."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx

from ..graph import is_canonical
from ..plan import Plan
from ..plan.precision import INT8_LAYERS, PrecisionPlan, main_input, plan_precision, residual_input
from .arith import LayerQuant, QParams
from .cache import graph_fingerprint, load_calibration_cache, save_calibration_cache
from .calibrate import class_ranges, observe
from .calibration_data import iter_calibration_batches
from .calibrators import get_calibrator

log = logging.getLogger("torch_gie")

DEFAULT_CALIBRATOR = "percentile"


def layer_names(node: fx.Node) -> set[str]:
    """Names a user may pin a layer by: the graph node's name, and the traced module path in
    both spellings ("features.3.conv.0" / "features_3_conv_0")."""
    names = {node.name}
    source = node.meta.get("source")
    if source:
        names |= {source, source.replace("_", ".")}
    return names


def fp16_layers(order: list[fx.Node], layer_precisions: dict[str, str] | None) -> set[fx.Node]:
    """The layers ``layer_precisions`` pins to fp16 (values "fp16" or "int8"; any other value or
    an unknown name is an error naming what exists)."""
    if not layer_precisions:
        return set()
    candidates = [n for n in order if is_canonical(n) and n.target in INT8_LAYERS]
    by_name = {}
    for n in candidates:
        for name in layer_names(n):
            by_name.setdefault(name, n)
    pinned = set()
    for name, prec in layer_precisions.items():
        if prec not in ("fp16", "int8"):
            raise ValueError(f"layer_precisions[{name!r}] must be 'fp16' or 'int8', got {prec!r}")
        key = name if name in by_name else name.replace(".", "_")
        if key not in by_name:
            known = sorted(n.meta.get("source", n.name) for n in candidates)
            raise ValueError(f"layer_precisions names {name!r}, which is not a conv, Linear or pool of the "
                             f"optimized graph; int8-capable layers are: {', '.join(known[:12])}"
                             f"{', ...' if len(known) > 12 else ''}")
        if prec == "fp16":
            pinned.add(by_name[key])
    return pinned


def _observed_roots(pp: PrecisionPlan) -> set[fx.Node]:
    """Classes whose range matters: those an int8 layer reads as codes or writes."""
    roots = set()
    for layer in pp.int8_layers:
        roots.add(pp.classes[main_input(layer)])
        for v, root in pp.classes.items():
            if v is layer or v.meta.get("segment_of") is layer:
                roots.add(root)
    for layer in pp.int8_layers:  # residuals an int8 layer may read as codes
        if residual_input(layer) in pp.classes:
            roots.add(pp.classes[residual_input(layer)])
    return {r for r in roots if "shape" in r.meta}


def calibrate_int8(gm: fx.GraphModule, order: list[fx.Node], example_inputs: tuple[torch.Tensor, ...], *,
                   calibration_data: Any, calibrator: Any, calibration_cache: str | os.PathLike | None,
                   layer_precisions: dict[str, str] | None, progress: bool = True, keep_samples: int = 0
                   ) -> tuple[PrecisionPlan, dict[fx.Node, QParams], list[tuple[torch.Tensor, ...]]]:
    """The precision plan, every observed class's QParams, from the cache when it covers this
    graph, else by running ``gm`` in fp32 over ``calibration_data`` (and writing the cache), and
    the first checked batches holding ``keep_samples`` samples (for the accuracy-budget search: a
    generator cannot be iterated twice). Kept batches may be the user's tensors: read them only."""
    pp = plan_precision(gm, order, fp16_layers(order, layer_precisions))
    roots = sorted(_observed_roots(pp), key=lambda n: order.index(n) if n in order else -1)
    fingerprint = graph_fingerprint([(r.name, tuple(r.meta["shape"])) for r in roots])
    cal = get_calibrator(calibrator)
    by_name = {r.name: r for r in roots}
    kept: list[tuple[torch.Tensor, ...]] = []
    if calibration_cache is not None and os.path.exists(calibration_cache):
        ranges = load_calibration_cache(calibration_cache, fingerprint, expected_names=list(by_name))
        log.info("torch_gie: int8 ranges of %d tensors read from %s", len(ranges), calibration_cache)
        if keep_samples and calibration_data is not None:
            for _ in _keeping(iter_calibration_batches(calibration_data, example_inputs, progress=False),
                              kept, keep_samples):
                if sum(b[0].shape[0] for b in kept) >= keep_samples:
                    break
    else:
        if calibration_data is None:
            raise ValueError("precision='int8' needs calibration_data=<an iterable of input batches, e.g. a "
                             "DataLoader of representative images> to measure activation ranges, or "
                             "calibration_cache=<path of a cache written by an earlier build of this model>")
        batches = _keeping(iter_calibration_batches(calibration_data, example_inputs, progress=progress),
                           kept, keep_samples)
        with torch.no_grad():
            batches = (tuple(t.to(torch.float32) for t in b) for b in batches)
            observers = observe(gm, pp.classes, set(roots), batches, example_inputs[0].shape[0])
        ranges = class_ranges(observers, cal)
        if calibration_cache is not None:
            save_calibration_cache(calibration_cache, ranges, fingerprint, repr(cal))
            log.info("torch_gie: int8 calibration cache written to %s", calibration_cache)
    qparams = {by_name[name]: r.qparams() for name, r in ranges.items() if name in by_name}
    return pp, qparams, kept


def _keeping(batches: Iterator[tuple[torch.Tensor, ...]], kept: list, samples: int
             ) -> Iterator[tuple[torch.Tensor, ...]]:
    """``batches`` passed through, the first ones (``samples`` samples) also appended to ``kept``."""
    held = 0
    for batch in batches:
        if held < samples:
            kept.append(batch)
            held += batch[0].shape[0]
        yield batch


def attach_layer_quant(plan: Plan) -> None:
    """``node.meta["quant"]`` for every int8 layer: its input's QParams, its output's when the
    output is stored as codes (else real values in the float precision), its residual's when
    the residual is read as codes."""
    pp = plan.precision
    for node in plan.order:
        node.meta.pop("quant", None)
        if node not in pp.int8_layers:
            continue
        outputs = [u for u in node.users if u.meta.get("segment_of") is node] or [node]
        out_int8 = plan.value_dtype(outputs[0]) == torch.int8
        residual = residual_input(node)
        res_int8 = residual is not None and plan.value_dtype(residual) == torch.int8
        node.meta["quant"] = LayerQuant(
            input=plan.value_qparams(main_input(node)),
            output=plan.value_qparams(outputs[0]) if out_int8 else None,
            residual=plan.value_qparams(residual) if res_int8 else None,
            out_dtype=plan.dtype)
