"""The two entry points: ``compile`` (capture -> passes -> plan -> build) and ``explain``
(the same without building kernels)."""
from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .backends import reference
from .batch_range import BatchRange, GraphBatching, check_batch_polymorphic, rebatch_inputs, traced_shapes_at
from .capture import as_input_tuple, capture
from .dot import write_dot
from .errors import OutOfMemoryError, build_step, release_failed_build
from .passes import PassContext, run_passes
from .plan import Plan, make_plan
from .plan.precision import plan_precision
from .quantize.budget import SEARCH_SAMPLES, check_budget, search_fp16_layers
from .quantize.build import DEFAULT_CALIBRATOR, attach_layer_quant, calibrate_int8, fp16_layers
from .report import build_report, count_compute_ops, fallback_warning
from .runtime.batched import DEFAULT_MAX_PROGRAMS, BatchedProgram
from .runtime.module import GIEModule
from .runtime.program import Program, allocate_storage, build_program
from .tune import Tuner

log = logging.getLogger("torch_gie")

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}
BACKENDS = ("auto", "triton", "reference")
_OPTIONS = {"dump_dir", "disable_passes", "cuda_graph", "static_outputs", "dot", "tune", "streams",
            "fp32_precision", "max_batch_graphs"}


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
    graphs = options.get("max_batch_graphs", DEFAULT_MAX_PROGRAMS)
    if not isinstance(graphs, int) or isinstance(graphs, bool) or graphs < 1:
        raise ValueError(f"max_batch_graphs must be an int >= 1, got {graphs!r}")


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA inputs, got inputs on {device}; move model and "
                         "inputs to a GPU, set TRITON_INTERPRET=1 to run the kernels in Triton's "
                         "interpreter, or use backend='reference'")
    return backend


def _prepare(module: nn.Module, example_inputs, precision: str, backend: str, options: dict,
             int8: dict | None = None, batch_range: BatchRange | None = None):
    """Capture, fuse, (int8: calibrate) and plan. With ``batch_range`` the example inputs are
    regrouped to ``opt`` samples and everything but the plan happens at ``opt``; the plan is made
    for ``max``. Returns (model copy, inputs, device, graph, ops in, pass results, plan, batching)."""
    _check_args(module, precision, backend, options)
    inputs = as_input_tuple(example_inputs)
    if batch_range is not None:
        inputs = rebatch_inputs(inputs, batch_range.opt)
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
    with build_step("copying the model"):
        model = copy.deepcopy(module).eval()  # never mutate what the user gave us
    for p in model.parameters():
        p.requires_grad_(False)
    with build_step("tracing the model on the example inputs"):
        gm = capture(model, inputs)
    layers_in = count_compute_ops(gm)
    ctx = PassContext(disabled=frozenset(options.get("disable_passes", ())), dump_dir=options.get("dump_dir"))
    with build_step("running the graph passes"):
        results = run_passes(gm, ctx)
    batching = check_batch_polymorphic(gm, inputs, batch_range) if batch_range is not None else None
    streams = options.get("streams", True) and device.type == "cuda" and options.get("cuda_graph", True)
    if precision != "int8":
        plan = plan_for(gm, PRECISIONS[precision], streams, batching, batch_range)
        return model, inputs, device, gm, layers_in, results, plan, batching
    # int8: layers that cannot run int8 run in fp16 on the GPU (fp32 on the CPU reference backend)
    order = [n for n in gm.graph.nodes if n.op != "output"]
    int8 = dict(int8 or {})
    budget = int8.pop("accuracy_budget", None)
    with build_step("calibrating int8 ranges"):  # at the traced batch size (opt with batch_range)
        precision_plan, qparams, kept = calibrate_int8(gm, order, inputs,
                                                       keep_samples=SEARCH_SAMPLES if budget else 0, **int8)
    base = torch.float16 if device.type == "cuda" else torch.float32
    if budget is not None:  # calibrated ranges stay valid: quantization classes are structural
        fp16, search = search_fp16_layers(gm, order, inputs, kept, fp16_layers(order, int8.get("layer_precisions")),
                                          budget, qparams, base, device)
        precision_plan = plan_precision(gm, order, fp16)
        precision_plan.search = search
    plan = plan_for(gm, base, streams, batching, batch_range, precision_plan)
    plan.qparams = qparams
    attach_layer_quant(plan)
    return model, inputs, device, gm, layers_in, results, plan, batching


def plan_for(gm, dtype: torch.dtype, streams: bool, batching: GraphBatching | None,
             batch_range: BatchRange | None, precision=None) -> Plan:
    """``make_plan`` at the traced shapes, or with ``batch_range`` at its max (one arena every
    batch size of the engine reuses)."""
    if batching is None:
        return make_plan(gm, dtype, streams=streams, precision=precision)
    with traced_shapes_at(gm, batching, batch_range.max):
        return make_plan(gm, dtype, streams=streams, precision=precision)


def compile(module: nn.Module, example_inputs, *, precision: str = "fp16", backend: str = "auto",
            batch_range: tuple[int, int, int] | None = None,
            calibration_data=None, calibrator=DEFAULT_CALIBRATOR, calibration_cache=None,
            layer_precisions: dict[str, str] | None = None, accuracy_budget: dict[str, float] | None = None,
            **options: Any) -> GIEModule:
    """Compile ``module`` for inputs shaped like ``example_inputs`` (a tensor or tuple of tensors).

    batch_range: None (default) binds the engine to the example inputs' shapes. ``(min, opt, max)``
    builds one engine for every batch size in [min, max] (dim 0 of every input; the other dims
    stay fixed): traced, calibrated (int8) and tuned once at ``opt`` (the example inputs are
    regrouped to ``opt`` samples, their own samples repeated or cut), with one activation arena
    planned for ``max``. A batch size's program and CUDA graph are built on its first call, then
    reused; at most ``max_batch_graphs`` (default 8) are kept, least recently used dropped (opt's
    stays). A batch outside the range raises ValueError. CompileError if the model's code fixes
    the batch size (e.g. a reshape to a literal batch).

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
    ``fp32_precision`` ("tf32x3" default: fp32-accurate tensor-core dots; "ieee", "tf32"),
    ``max_batch_graphs`` (with batch_range: batch sizes that keep a program and CUDA graph).

    A build that runs out of memory raises ``torch_gie.OutOfMemoryError`` naming the build step
    and the bytes asked for, with everything it had allocated freed.
    """
    _check_args(module, precision, backend, options)
    backend = _resolve_backend(backend, as_input_tuple(example_inputs)[0].device)  # fail before capture
    batch = BatchRange.parse(batch_range) if batch_range is not None else None
    if batch is None and "max_batch_graphs" in options:
        raise ValueError("max_batch_graphs bounds the programs of a batch_range engine; "
                         "pass batch_range=(min, opt, max) too")
    if accuracy_budget is not None:
        if precision != "int8":
            raise ValueError(f"accuracy_budget applies to precision='int8', got precision={precision!r}")
        check_budget(accuracy_budget)
        if calibration_data is None:
            raise ValueError("accuracy_budget measures the network on calibration_data; pass calibration_data= "
                             "(a calibration cache alone holds ranges, not samples)")
    int8 = dict(calibration_data=calibration_data, calibrator=calibrator, calibration_cache=calibration_cache,
                layer_precisions=layer_precisions, accuracy_budget=accuracy_budget)
    try:
        return _compile(module, example_inputs, precision, backend, options, int8, batch)
    except OutOfMemoryError as exc:
        release_failed_build(exc)  # the partial engine is freed before the caller sees the error
        raise


def _compile(module: nn.Module, example_inputs, precision: str, backend: str, options: dict, int8: dict,
             batch: BatchRange | None) -> GIEModule:
    # Everything the build allocates is a local of this frame or of the ones it calls, which
    # ``release_failed_build`` clears when the build fails for lack of memory.
    with build_step("building the engine"):  # steps not named further in
        model, inputs, device, gm, layers_in, results, plan, batching = _prepare(
            module, example_inputs, precision, backend, options, int8, batch)
        warning = fallback_warning(gm)
        if warning:
            warnings.warn(warning, stacklevel=3)
        tuner = None
        if device.type == "cuda" and backend == "triton":  # known timings always apply; tune=True times new layers
            tune = options.get("tune", False)
            tuner = Tuner(time_new=bool(tune), refresh=tune == "refresh")
        program = build_engine(gm, plan, inputs, device, backend, options, tuner=tuner, batch_range=batch,
                               batching=batching)
    report = build_report(model=type(module).__name__, layers_in=layers_in, results=results, gm=gm, plan=plan,
                          steps=program.steps, precision=precision, backend=backend, device=str(device),
                          batch_range=batch)
    log.info("torch_gie: compiled %s: %d ops -> %d launches", report["model"], layers_in, report["launches"])
    return GIEModule(program, inputs, report, static_outputs=options.get("static_outputs", False), options=options,
                     batch_range=batch)


def build_engine(gm, plan: Plan, inputs: tuple[torch.Tensor, ...], device: torch.device, backend: str,
                 options: dict, *, tuner: Tuner | None = None, batch_range: BatchRange | None = None,
                 batching: GraphBatching | None = None,
                 configure: Callable[[Program, Any], None] | None = None) -> Program | BatchedProgram:
    """Lower, allocate, warm up (tuning with ``tuner``) and capture: the program ``GIEModule``
    runs. ``configure(program, fallback_lowering)`` runs after lowering, before the warm-up
    (``load`` sets the saved kernel configs there). With ``batch_range``: the opt program is built and tuned, the
    max program warmed up (layer workspaces reach their largest size), opt's CUDA graph captured;
    other batch sizes are built on first use (``BatchedProgram``)."""
    start = time.perf_counter()
    lowering, fallback, converters = _lowering(backend, plan, device, options)
    cuda_graph = device.type == "cuda" and options.get("cuda_graph", True)
    storage = allocate_storage(plan, device)

    def build(shapes=None, kernels=None) -> Program:
        return build_program(gm, plan, lowering, backend, device, fallback, converters, storage=storage,
                             shapes=shapes, kernels=kernels)

    program = build(batching.at(batch_range.opt) if batch_range is not None else None)
    if configure is not None:
        configure(program, fallback)
    lowered = time.perf_counter()
    with torch.no_grad():
        program._load_inputs(inputs)
        program.warm_up(fallback, tuner)
        if tuner is not None:
            tuner.save()
    warmed = time.perf_counter()
    engine: Program | BatchedProgram = program
    if batch_range is not None:
        engine = BatchedProgram(program, batch_range, batching, build, lambda p: p.warm_up(fallback), cuda_graph,
                                options.get("max_batch_graphs", DEFAULT_MAX_PROGRAMS))
        if batch_range.max != batch_range.opt:
            engine.prepare(batch_range.max)
    if cuda_graph:
        with torch.no_grad():
            program.capture_cuda_graph()
    # Where a build or a load spends its time (a cold load is mostly Triton compiling in warm-up).
    log.info("torch_gie: engine built in %.2f s (lowering and arena %.2f s, warm-up%s %.2f s, "
             "the rest%s %.2f s)", time.perf_counter() - start, lowered - start,
             " and tuning" if tuner is not None else "", warmed - lowered,
             " incl. CUDA graph capture" if cuda_graph else "", time.perf_counter() - warmed)
    return engine


def explain(module: nn.Module, example_inputs, *, precision: str = "fp16", backend: str = "auto",
            dot: str | None = None, batch_range: tuple[int, int, int] | None = None, calibration_data=None,
            calibrator=DEFAULT_CALIBRATOR, calibration_cache=None, layer_precisions: dict[str, str] | None = None,
            **options: Any) -> dict[str, Any]:
    """The compile report without building kernels; ``dot="graph.dot"`` also writes the optimized
    graph for Graphviz (and an SVG beside it when ``dot`` is installed). int8 takes the
    calibration arguments of ``compile`` (it calibrates, to say which layers run int8); with
    ``batch_range`` the graph is checked for it and the arena planned for its max."""
    int8 = dict(calibration_data=calibration_data, calibrator=calibrator, calibration_cache=calibration_cache,
                layer_precisions=layer_precisions)
    batch = BatchRange.parse(batch_range) if batch_range is not None else None
    model, inputs, device, gm, layers_in, results, plan, batching = _prepare(module, example_inputs, precision,
                                                                              backend, options, int8, batch)
    program = build_program(gm, plan, lambda node: None, "none", torch.device("meta"), None,
                            reference.converters(), shapes=batching.at(batch.opt) if batch is not None else None)
    report = build_report(model=type(module).__name__, layers_in=layers_in, results=results, gm=gm, plan=plan,
                          steps=program.steps, precision=precision, backend=_resolve_backend(backend, device),
                          device=str(device), batch_range=batch)
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
