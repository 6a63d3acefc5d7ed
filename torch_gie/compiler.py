"""The two entry points: ``compile`` (capture -> passes -> plan -> build) and ``explain``
(the same without building kernels)."""
from __future__ import annotations

import copy
import logging
import os
import warnings
from typing import Any

import torch
from torch import nn

from .backends import reference
from .capture import as_input_tuple, capture
from .dot import write_dot
from .passes import PassContext, run_passes
from .plan import make_plan
from .plan.precision import plan_precision
from .quantize.budget import SEARCH_SAMPLES, check_budget, search_fp16_layers
from .quantize.build import DEFAULT_CALIBRATOR, attach_layer_quant, calibrate_int8, fp16_layers
from .report import build_report, count_compute_ops, fallback_warning
from .runtime.module import GIEModule
from .runtime.program import build_program
from .tune import Tuner

log = logging.getLogger("torch_gie")

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}
BACKENDS = ("auto", "triton", "reference")
_OPTIONS = {"dump_dir", "disable_passes", "cuda_graph", "static_outputs", "dot", "tune", "streams",
            "fp32_precision"}


TUNE_MODES = (False, True, "refresh")


def _check_args(module, precision: str, backend: str, options: dict) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; known options: {sorted(_OPTIONS)}")
    if options.get("tune", False) not in TUNE_MODES:
        raise ValueError(f"tune must be one of {TUNE_MODES}, got {options['tune']!r}")


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA inputs, got inputs on {device}; move model and "
                         "inputs to a GPU, set TRITON_INTERPRET=1 to run the kernels in Triton's "
                         "interpreter, or use backend='reference'")
    return backend


def _prepare(module: nn.Module, example_inputs, precision: str, backend: str, options: dict,
             int8: dict | None = None):
    _check_args(module, precision, backend, options)
    inputs = as_input_tuple(example_inputs)
    devices = {t.device for t in inputs}
    if len(devices) != 1:
        raise ValueError(f"all example inputs must be on one device, got {sorted(map(str, devices))}")
    device = inputs[0].device
    param = next(iter(module.parameters()), None)
    if param is not None and param.device != device:
        raise ValueError(f"the module's parameters are on {param.device} but the example inputs are on "
                         f"{device}; move one of them (module.to(device)) before compiling")
    if module.training:
        log.warning("torch_gie: %s is in training mode; compiling its eval-mode behaviour "
                    "(the module you passed is left unchanged)", type(module).__name__)
    model = copy.deepcopy(module).eval()  # never mutate what the user gave us
    for p in model.parameters():
        p.requires_grad_(False)
    gm = capture(model, inputs)
    layers_in = count_compute_ops(gm)
    ctx = PassContext(disabled=frozenset(options.get("disable_passes", ())), dump_dir=options.get("dump_dir"))
    results = run_passes(gm, ctx)
    streams = options.get("streams", True) and device.type == "cuda" and options.get("cuda_graph", True)
    if precision != "int8":
        return model, inputs, device, gm, layers_in, results, make_plan(gm, PRECISIONS[precision], streams=streams)
    # int8: layers that cannot run int8 run in fp16 on the GPU (fp32 on the CPU reference backend)
    order = [n for n in gm.graph.nodes if n.op != "output"]
    int8 = dict(int8 or {})
    budget = int8.pop("accuracy_budget", None)
    precision_plan, qparams, kept = calibrate_int8(gm, order, inputs, keep_samples=SEARCH_SAMPLES if budget else 0,
                                                   **int8)
    base = torch.float16 if device.type == "cuda" else torch.float32
    if budget is not None:  # calibrated ranges stay valid: quantization classes are structural
        fp16, search = search_fp16_layers(gm, order, inputs, kept, fp16_layers(order, int8.get("layer_precisions")),
                                          budget, qparams, base, device)
        precision_plan = plan_precision(gm, order, fp16)
        precision_plan.search = search
    plan = make_plan(gm, base, streams=streams, precision=precision_plan)
    plan.qparams = qparams
    attach_layer_quant(plan)
    return model, inputs, device, gm, layers_in, results, plan


def compile(module: nn.Module, example_inputs, *, precision: str = "fp16", backend: str = "auto",
            calibration_data=None, calibrator=DEFAULT_CALIBRATOR, calibration_cache=None,
            layer_precisions: dict[str, str] | None = None, accuracy_budget: dict[str, float] | None = None,
            **options: Any) -> GIEModule:
    """Compile ``module`` for inputs shaped like ``example_inputs`` (a tensor or tuple of tensors).

    precision: "fp32" | "fp16" | "int8". int8 (see docs/int8.md): ``calibration_data`` is any
    iterable of input batches (a DataLoader works) the activation ranges are measured on;
    ``calibrator`` "percentile" (default, 99.99th), "entropy", "mse", "minmax" or a Calibrator;
    ``calibration_cache`` a JSON path: read when it exists (no calibration), else written;
    ``layer_precisions`` {"layer.name": "fp16"} pins layers out of int8; ``accuracy_budget``
    ({"top1_agreement": 0.99} and/or {"sqnr_db": 30}: the first output's argmax agreement with
    fp32 and mean per-sample SQNR, on the first 256 calibration samples) keeps the most
    sensitive int8 layers in fp16 until the network meets it (ValueError if even all-fp16 misses;
    the search is in ``report()["int8_search"]``; needs calibration_data). backend: "auto" (triton on CUDA,
    reference on CPU) | "triton" | "reference". Options: ``cuda_graph`` (default True on CUDA),
    ``static_outputs`` (return internal buffers, default False), ``disable_passes`` (names),
    ``dump_dir`` (write the graph after each pass), ``tune`` (False: use known timings only;
    True: also time layers no cache knows; "refresh": time every layer anew),
    ``streams`` (run independent branches concurrently inside the CUDA graph, default True),
    ``fp32_precision`` ("tf32x3" default: fp32-accurate tensor-core dots; "ieee", "tf32").
    """
    _check_args(module, precision, backend, options)
    backend = _resolve_backend(backend, as_input_tuple(example_inputs)[0].device)  # fail before capture
    if accuracy_budget is not None:
        if precision != "int8":
            raise ValueError(f"accuracy_budget applies to precision='int8', got precision={precision!r}")
        check_budget(accuracy_budget)
        if calibration_data is None:
            raise ValueError("accuracy_budget measures the network on calibration_data; pass calibration_data= "
                             "(a calibration cache alone holds ranges, not samples)")
    int8 = dict(calibration_data=calibration_data, calibrator=calibrator, calibration_cache=calibration_cache,
                layer_precisions=layer_precisions, accuracy_budget=accuracy_budget)
    model, inputs, device, gm, layers_in, results, plan = _prepare(module, example_inputs, precision,
                                                                    backend, options, int8)
    warning = fallback_warning(gm)
    if warning:
        warnings.warn(warning, stacklevel=2)
    lowering, fallback, converters = _lowering(backend, plan, device, options)
    program = build_program(gm, plan, lowering, backend, device, fallback, converters)
    tuner = None
    if device.type == "cuda" and backend == "triton":  # known timings always apply; tune=True times new layers
        tune = options.get("tune", False)
        tuner = Tuner(time_new=bool(tune), refresh=tune == "refresh")
    with torch.no_grad():
        program._load_inputs(inputs)
        program.warm_up(fallback, tuner)
        if tuner is not None:
            tuner.save()
        if device.type == "cuda" and options.get("cuda_graph", True):
            program.capture_cuda_graph()
    report = build_report(model=type(module).__name__, layers_in=layers_in, results=results, gm=gm, plan=plan,
                          steps=program.steps, precision=precision, backend=backend, device=str(device))
    log.info("torch_gie: compiled %s: %d ops -> %d launches", report["model"], layers_in, report["launches"])
    return GIEModule(program, inputs, report, static_outputs=options.get("static_outputs", False), options=options)


def explain(module: nn.Module, example_inputs, *, precision: str = "fp16", backend: str = "auto",
            dot: str | None = None, calibration_data=None, calibrator=DEFAULT_CALIBRATOR,
            calibration_cache=None, layer_precisions: dict[str, str] | None = None,
            **options: Any) -> dict[str, Any]:
    """The compile report without building kernels; ``dot="graph.dot"`` also writes the optimized
    graph for Graphviz (and an SVG beside it when ``dot`` is installed). int8 takes the
    calibration arguments of ``compile`` (it calibrates, to say which layers run int8)."""
    int8 = dict(calibration_data=calibration_data, calibrator=calibrator, calibration_cache=calibration_cache,
                layer_precisions=layer_precisions)
    model, inputs, device, gm, layers_in, results, plan = _prepare(module, example_inputs, precision,
                                                                    backend, options, int8)
    program = build_program(gm, plan, lambda node: None, "none", torch.device("meta"), None,
                            reference.converters())
    report = build_report(model=type(module).__name__, layers_in=layers_in, results=results, gm=gm, plan=plan,
                          steps=program.steps, precision=precision, backend=_resolve_backend(backend, device),
                          device=str(device))
    if dot:
        report["dot"] = write_dot(gm, dot)
    return report


def _lowering(backend: str, plan, device: torch.device, options: dict):
    # The Triton backend is imported only when asked for: the reference backend (and explain)
    # must work where triton is not installed (it is an install requirement on Linux x86-64 only).
    ref = lambda node: reference.lower(node, plan.dtype, device)  # noqa: E731
    if backend == "reference":
        return ref, None, reference.converters()
    from .backends import triton as triton_backend
    return (lambda node: triton_backend.lower(node, plan.dtype, device, options)), ref, triton_backend.converters()
