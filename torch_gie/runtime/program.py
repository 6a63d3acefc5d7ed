"""A compiled program: the arena, the static input views, and the list of steps that run the
optimized graph; optionally captured once into a CUDA graph and replayed.

``build_program`` turns (graph, plan, lowering) into steps; ``Program.run`` copies the inputs
into their static views, runs (or replays) the steps and returns the outputs, by default as
fresh tensors in the original dtypes and layout. The memory and execution context live in a
``Storage`` that the programs of one engine share (one per batch size, see ``batched.py``).
"""
from __future__ import annotations

import functools
import logging
import math
import operator
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .. import ops, precompile
from ..batch_range import BatchShapes
from ..cuda_graphs import capture
from ..errors import CompileError, OutOfMemoryError, build_step, is_out_of_memory
from ..graph import cat_input_slot, is_canonical, is_fallback_compute, spec
from ..plan import Plan
from ..plan.memory import materialize
from ..timing import memory_bandwidth, time_in_cuda_graph
from .steps import ConvertStep, CopyStep, FallbackStep, Kernel, KernelStep, QuantConvertStep, Step, ViewStep

log = logging.getLogger(__name__)

Lowering = Callable[[fx.Node], Kernel]
Convert = Callable[[torch.Tensor, torch.Tensor], None]

# An int8 network input is quantized as it is copied into the engine. A small input (a
# latency-bound call) is instead copied as it comes into a static staging buffer in the caller's
# float dtype, and quantized by the first step, inside the CUDA graph: the call then costs the
# host one ``copy_`` (about 10 us) instead of a Triton launch (60-80 us on the H200's host, more
# than a batch-1 GoogLeNet's whole replay), and the GPU one more pass over the input (at most
# 2 x 16 MiB: about 11 us at 3 TB/s). A larger input's call is bound by the GPU, where that extra
# pass would only cost.
STAGE_INPUT_MAX_BYTES = 16 << 20


@dataclass
class Converters:
    """int8 builds: how a backend quantizes real values into codes of a QParams and
    dequantizes codes into a float dtype (``fn(x, out)`` writes out)."""

    quantize: Callable[[Any], Convert]
    dequantize: Callable[[Any, torch.dtype], Convert]


def allocate(nbytes: int, device: torch.device) -> torch.Tensor:
    """``nbytes`` uninitialized bytes on ``device``. Every buffer of the engine's own (the arena,
    the static inputs) is allocated here: one place to see what a build asks for, and the seam
    tests replace to simulate running out of memory."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


@dataclass
class Storage:
    """What the programs of one engine share: the activation arena, the pinned buffers (static
    inputs, by buffer index), the constants converted once at build, and the execution context.
    One re-entrant lock and, on CUDA, one stream serialize every call, whatever its batch size:
    the programs of a ``batch_range`` engine all run on this one arena."""

    arena: torch.Tensor
    pinned: dict[int, torch.Tensor]
    constants: dict[fx.Node, Any] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    stream: torch.cuda.Stream | None = None


def allocate_storage(plan: Plan, device: torch.device) -> Storage:
    """The arena and the zero-filled static-input buffers ``plan`` places values in."""
    with build_step("allocating the activation arena", plan.arena_bytes):
        arena = allocate(max(plan.arena_bytes, 1), device)
    pinned = {}
    for b in plan.buffers:
        if b.pinned:
            with build_step("allocating the static input buffers", b.nbytes):
                pinned[b.index] = allocate(b.nbytes, device).zero_()
    return Storage(arena, pinned, stream=torch.cuda.Stream(device) if device.type == "cuda" else None)


class Program:
    def __init__(self, gm: fx.GraphModule, plan: Plan, steps: list[Step], env: list,
                 ids: dict[fx.Node, int], storage: Storage, static_inputs: list[torch.Tensor]):
        self.gm, self.plan, self.steps, self.env, self.ids = gm, plan, steps, env, ids
        self.storage, self.arena, self.static_inputs = storage, storage.arena, static_inputs
        self.input_loaders: list[Convert | None] = [None] * len(static_inputs)
        self.input_steps = 0  # leading steps that quantize staged int8 inputs (``_staging_buffer``)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._held: list[torch.Tensor] = []  # what the captured graph writes to (``capture_cuda_graph``)
        # One call at a time owns the static inputs, the arena and the graph (see ``run``); the
        # lock and stream are the storage's, shared with the engine's other batch sizes.
        self._lock, self._stream = storage.lock, storage.stream

    @property
    def launches(self) -> int:
        return sum(s.launches for s in self.steps)

    def _load_inputs(self, inputs: Sequence[torch.Tensor]) -> None:
        for dst, src, load in zip(self.static_inputs, inputs, self.input_loaders):
            if load is None:
                dst.copy_(src)
            else:
                load(src, dst)  # quantized in the copy (an int8 network input)

    def _run_steps(self) -> None:
        for step in self.steps:
            step(self.env)

    def run(self, inputs: Sequence[torch.Tensor], *, static_outputs: bool = False) -> Any:
        """One forward. Thread-safe: calls are serialized by a lock, and on CUDA each runs on the
        program's own stream, ordered after the caller's current stream (so inputs the caller
        just produced are ready) and before whatever the caller issues next (its stream waits
        for the outputs). Two calls therefore never overlap on the static buffers, on the host
        or on the GPU. With ``static_outputs`` the returned buffers are overwritten by the next
        call, from any thread: copy them before another call."""
        with self._lock:
            if self._stream is None:
                return self._forward(inputs, static_outputs)
            caller = torch.cuda.current_stream(self._stream.device)
            self._stream.wait_stream(caller)
            with torch.cuda.stream(self._stream):
                result = self._forward(inputs, static_outputs)
            caller.wait_stream(self._stream)
            for t in inputs:  # read on our stream: not reusable before that read is done
                t.record_stream(self._stream)
            if not static_outputs:  # allocated on our stream, used on the caller's
                fx.node.map_aggregate(result, lambda t: t.record_stream(caller)
                                      if isinstance(t, torch.Tensor) and t.is_cuda else None)
            return result

    def _forward(self, inputs: Sequence[torch.Tensor], static_outputs: bool) -> Any:
        self._load_inputs(inputs)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run_steps()
        return self.outputs(fresh=not static_outputs)

    def outputs(self, fresh: bool = True) -> Any:
        """The graph's outputs from env: fresh contiguous copies in the original dtypes, or the
        static buffers themselves (overwritten by the next call)."""
        def value(n: fx.Node):
            t = self.env[self.ids[n]]
            if not fresh or not isinstance(t, torch.Tensor):
                return t
            return t.to(dtype=n.meta.get("dtype", t.dtype), memory_format=torch.contiguous_format, copy=True)
        return fx.node.map_arg(self.gm.graph.output_node().args[0], value)

    def _run_steps_on_streams(self) -> None:
        """Issue each step on its planned stream, waiting only on the steps it reads from; the
        side streams fork from and join back into the current stream (as graph capture needs)."""
        plan = self.plan.streams
        main = torch.cuda.current_stream()
        for step in self.steps[:self.input_steps]:  # before the fork: every stream sees the codes
            step(self.env)
        streams = [main] + [torch.cuda.Stream() for _ in range(plan.streams - 1)]
        for s in streams[1:]:
            s.wait_stream(main)
        events: dict[fx.Node, torch.cuda.Event] = {}
        for step in self.steps[self.input_steps:]:
            index = plan.stream.get(step.node, 0)
            if isinstance(step, (FallbackStep, ConvertStep)):
                # PyTorch code may read anything its inputs alias: everything issued so far first.
                index = 0
                for s in streams[1:]:
                    main.wait_stream(s)
            stream = streams[index]
            with torch.cuda.stream(stream):
                for dep in plan.waits.get(step.node, ()):
                    stream.wait_event(events[dep])
                step(self.env)
                if step.node in self._recorded:
                    events[step.node] = torch.cuda.Event()
                    events[step.node].record(stream)
        for s in streams[1:]:
            main.wait_stream(s)

    def capture_cuda_graph(self) -> None:
        """Record the steps once into a CUDA graph (after a warm-up run compiled the kernels);
        with a stream plan, independent branches become parallel branches of the graph.

        The graph keeps every tensor its kernels held when it was recorded (``kernel_tensors``):
        a layer may later replace a scratch workspace with a bigger one for a larger batch size
        (``batched.py``), and this graph goes on writing the one it recorded."""
        self._recorded = {d for deps in self.plan.streams.waits.values() for d in deps}
        run = self._run_steps_on_streams if self.plan.streams.streams > 1 else self._run_steps
        with build_step("capturing the CUDA graph"):
            self.graph = capture(run)
        self._held = kernel_tensors(self.steps)

    def drop_cuda_graph(self) -> None:
        """Free the captured graph (its memory pool goes with it) and what it kept alive."""
        self.graph, self._held = None, []

    def warm_up(self, fallback_lowering: Lowering | None, tuner=None) -> None:
        """Run every step once (tuning it first when a tuner is given); a kernel step that fails
        is replaced by ``fallback_lowering`` for that layer, with a warning (a layer Triton
        cannot compile must not sink the model). On a GPU the kernels these launches need are
        first compiled in parallel threads (``torch_gie.precompile``)."""
        device = self.arena.device
        if precompile.enabled(device):
            if tuner is not None:
                configs_for = lambda step: tuner.configs_to_run(step, self.env)  # noqa: E731
            else:
                configs_for = lambda step: [step.kernel.layer.config]  # noqa: E731
            precompile.precompile(self.steps, self.env, configs_for, device)
        for step in _progress(self.steps, "building kernels"):
            try:
                if tuner is not None and isinstance(step, KernelStep):
                    with build_step(f"tuning layer {step.name}"):
                        tuner.tune(step, self.env)
                with build_step(f"running layer {step.name}"):  # Triton compiles, workspaces
                    step(self.env)
            except OutOfMemoryError:
                raise  # no fallback runs in less memory: the build fails, naming the step
            except Exception as exc:
                if not isinstance(step, KernelStep) or fallback_lowering is None or step.backend == "reference":
                    raise CompileError(f"layer {step.name} ({step.op}) failed while building: "
                                       f"{type(exc).__name__}: {exc}") from exc
                warnings.warn(f"torch_gie: no kernel for layer {step.name} ({step.op}): "
                              f"{type(exc).__name__}: {exc}; running it with PyTorch instead", stacklevel=2)
                step.kernel, step.backend = fallback_lowering(step.node), "reference"
                step(self.env)


    def profile(self, iters: int = 20, reps: int = 10) -> list[dict]:
        """Per-step GPU time in ms, to see where a forward spends its time.

        On CUDA each step is captured alone, ``reps`` times in a row, into its own CUDA graph and
        replayed ``iters`` times (median of the event-timed replays, divided by ``reps``): the
        figure holds the kernels and their in-graph launch cost as the full graph replays them,
        without the Python and launch overhead of eager calls (which swamps batch-1 kernels).
        The sum over steps can differ from the whole graph's time: there, independent branches
        overlap on streams and neighbouring kernels' tails and heads overlap.

        Kernel steps also report ``bytes`` (inputs, outputs and weights once), ``floor_ms`` (those
        bytes at the GPU's measured bandwidth, ``timing.memory_bandwidth``), ``floor_fraction``
        (floor over measured time: 1.0 is the memory floor), ``flops`` and ``tflops``."""
        rows = []
        bandwidth = memory_bandwidth()
        for step in self.steps:
            kernel = getattr(getattr(step, "kernel", None), "describe", None)
            ms = self._time_step(step, iters, reps) if step.launches else 0.0
            row = {"name": step.name, "op": step.op, "ms": ms, "launches": step.launches,
                   "kernel": kernel() if kernel else step.op}
            if isinstance(step, KernelStep):
                nbytes, flops = step_cost(step, self.env)
                floor_ms = nbytes / bandwidth * 1e3
                row.update(bytes=nbytes, flops=flops, floor_ms=floor_ms,
                           floor_fraction=floor_ms / ms if ms > 0 else 0.0,
                           tflops=flops / ms / 1e9 if ms > 0 else 0.0)
            rows.append(row)
        return rows

    def _time_step(self, step: Step, iters: int, reps: int) -> float:
        # A fallback step stores a new tensor in env; the captured forward must keep reading its own.
        saved = list(self.env)
        try:
            return time_in_cuda_graph(lambda: step(self.env), reps=reps, iters=iters)
        finally:
            self.env[:] = saved


def step_cost(step: KernelStep, env: list) -> tuple[int, int]:
    """(bytes, flops) a kernel step must at least move and compute: each input and output view
    once, its weights once; 2 * MACs for convs and Linear layers (0 otherwise)."""
    def nbytes(t) -> int:
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
    seen, total = set(), 0
    for t in [env[i] for i in step.in_ids] + list(step.outs):
        key = (t.data_ptr(), tuple(t.shape), t.stride()) if isinstance(t, torch.Tensor) else id(t)
        if key not in seen:
            seen.add(key)
            total += nbytes(t)
    layer = getattr(step.kernel, "layer", None)
    # A fallback's "layer" may be a PyTorch builtin, which has no __dict__ (and no weights here).
    for name, value in getattr(layer, "__dict__", {}).items():
        if not name.startswith("_") and isinstance(value, torch.Tensor):
            total += nbytes(value)  # packed weights, biases, scales
    node, flops = step.node, 0
    out_numel = math.prod(node.meta["shape"]) if "shape" in node.meta else 0
    if node.target is ops.conv2d:
        flops = 2 * out_numel * spec(node).weight[0].numel()
    elif node.target is ops.linear:
        flops = 2 * out_numel * spec(node).weight.shape[1]
    return total, flops


def kernel_tensors(steps: list[Step]) -> list[torch.Tensor]:
    """Every tensor the steps' kernel objects hold now (packed weights, scratch workspaces),
    found through nested kernel objects and their dicts and lists."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()

    def walk(obj, depth: int) -> None:
        if id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, depth + 1)
        elif type(obj).__module__.startswith("torch_gie.") and hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                walk(v, depth + 1)

    for step in steps:
        if isinstance(step, KernelStep):
            walk(step.kernel, 0)
    return found


def _progress(items: list, what: str):
    """Iterate with a progress bar on a terminal when tqdm is installed (builds can take minutes)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=f"torch_gie: {what}", leave=False, disable=None)


def _fallback_callable(gm: fx.GraphModule, node: fx.Node) -> Callable[..., Any]:
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    if node.op == "call_method":
        return lambda self_, *args, **kwargs: getattr(self_, node.target)(*args, **kwargs)
    return node.target


def _lower(node: fx.Node, lowering: Lowering, backend: str, fallback: Lowering | None) -> tuple[Kernel, str]:
    """The node's kernel from ``lowering``; if that fails to build and a ``fallback`` lowering is
    given, the fallback's, with a warning."""
    try:
        return lowering(node), backend
    except Exception as exc:
        if fallback is None or is_out_of_memory(exc):
            raise
        warnings.warn(f"torch_gie: no kernel for layer {node.name} ({node.target.__name__}): "
                      f"{type(exc).__name__}: {exc}; running it with PyTorch instead", stacklevel=3)
        return fallback(node), "reference"


def build_program(gm: fx.GraphModule, plan: Plan, lowering: Lowering, backend: str,
                  device: torch.device, fallback: Lowering | None = None,
                  converters: Converters | None = None, *, storage: Storage | None = None,
                  shapes: BatchShapes | None = None,
                  kernels: dict[fx.Node, tuple[Kernel, str]] | None = None) -> Program:
    """The program running ``gm`` as ``plan`` places it. By default it allocates its own
    storage and lowers every canonical node. The programs of a ``batch_range`` engine share one
    ``storage`` (planned for the range's max) and the ``kernels`` (node -> (kernel, backend))
    the first one lowered; ``shapes`` gives each value's rows at this program's batch size."""
    ids = {n: i for i, n in enumerate(gm.graph.nodes)}
    env: list = [None] * len(ids)
    storage = storage if storage is not None else allocate_storage(plan, device)
    for node, placement in plan.placements.items():
        view = materialize(storage.arena, placement, storage.pinned)
        if shapes is not None and view.dim():
            view = view[:shapes.rows(node)]  # the first rows of the max-size buffer: rows are outermost
        env[ids[node]] = view

    steps: list[Step] = []
    converted: dict[tuple, int] = {}

    def slot(value: fx.Node, want: torch.dtype | None, fmt: torch.memory_format, ours: bool = True) -> int:
        """The env slot of ``value`` as a consumer wants it: its own, or a copy as ``want`` in
        layout ``fmt`` made once (by a conversion step before its first consumer) and shared by
        every consumer. int8 codes cross to real values through the backend's converters."""
        have = plan.value_dtype(value) if ours else None
        if want is None or (have == want == torch.int8):
            return ids[value]
        if have == torch.int8 or want == torch.int8:
            direction = "quantize" if want == torch.int8 else "dequantize"
            qkey = (value, direction)
            if qkey not in converted:
                converted[qkey] = len(env)
                env.append(None)
                qp = plan.value_qparams(value)
                fn = converters.quantize(qp) if want == torch.int8 else converters.dequantize(qp, plan.dtype)
                dtype = torch.int8 if want == torch.int8 else plan.dtype
                steps.append(QuantConvertStep(value, ids[value], converted[qkey], dtype, fn, direction))
            if want == torch.int8 or (want == plan.dtype and fmt == torch.channels_last):
                return converted[qkey]
            src = converted[qkey]  # dequantized; PyTorch code wants it in its own dtype, contiguous
        elif fmt == torch.channels_last:  # a kernel's input: values of another dtype are converted
            if have in (None, want):
                return ids[value]
            src = ids[value]
        else:  # PyTorch code's input: our values leave in the model's dtype, contiguous
            if not ours:
                return ids[value]
            src = ids[value]
        key = (value, want, fmt)
        if key not in converted:
            converted[key] = len(env)
            env.append(None)
            steps.append(ConvertStep(value, src, converted[key], want, fmt))
        return converted[key]

    static_inputs = []
    for node in plan.order:
        if node.op == "placeholder":
            static_inputs.append(env[ids[node]])
        elif node.op == "get_attr":
            if node not in storage.constants:
                value = operator.attrgetter(node.target)(gm)
                if isinstance(value, torch.Tensor) and plan.value_dtype(node) != value.dtype:
                    with build_step(f"converting constant {node.name}"):  # once, at build
                        value = value.detach().to(device=device, dtype=plan.value_dtype(node))
                storage.constants[node] = value
            env[ids[node]] = storage.constants[node]
        elif is_canonical(node, ops.cat):
            copies = [(ids[node.args[i]], None, _slot_view(env[ids[node]], node, i))  # copy_ casts
                      for i in node.meta.get("cat_copies", range(len(node.args)))]
            if copies:
                steps.append(CopyStep(node, copies))
        elif is_canonical(node) and node.target in ops.VIEW_OPS:
            fn = functools.partial(node.target, spec(node) if shapes is None else shapes.view_spec(node))
            steps.append(ViewStep(node, fn, ids[node.args[0]], ids[node]))
        elif is_canonical(node):
            outs = [env[ids[u]] for u in _segments(node)] if getattr(spec(node), "out_splits", None) \
                else [env[ids[node]]]
            in_ids = [slot(i, want, torch.channels_last) for i, want in zip(node.args, _wanted_dtypes(node, plan))]
            if kernels is not None:
                kernel, used = kernels[node]
            else:
                with build_step(f"packing weights of layer {node.name}"):
                    kernel, used = _lower(node, lowering, backend, fallback)
            steps.append(KernelStep(node, kernel, in_ids, outs, used))
        elif "segment_of" in node.meta:
            continue  # written by its merged conv
        else:
            # PyTorch code sees what the original model saw: its dtypes, contiguous tensors.
            in_ids = {i: slot(i, i.meta.get("dtype"), torch.contiguous_format, _ours(i, plan))
                      for i in node.all_input_nodes}
            steps.append(FallbackStep(node, _fallback_callable(gm, node), in_ids, ids[node],
                                      launches=1 if is_fallback_compute(node) else 0))

    placeholders = [n for n in plan.order if n.op == "placeholder"]
    loaders, input_steps = [], []
    for i, node in enumerate(placeholders):
        if plan.value_dtype(node) != torch.int8:
            loaders.append(None)
            continue
        quantize = converters.quantize(plan.value_qparams(node))
        stage = _staging_buffer(static_inputs[i], node.meta.get("dtype", torch.float32), device)
        if stage is None:
            loaders.append(quantize)  # quantized in the copy
            continue
        env.append(stage)
        step = QuantConvertStep(node, len(env) - 1, ids[node], torch.int8, quantize, "quantize")
        step.out = static_inputs[i]  # the codes go where the plan placed the input
        input_steps.append(step)
        static_inputs[i] = stage  # the call copies into the staging buffer
        loaders.append(None)
    program = Program(gm, plan, input_steps + steps, env, ids, storage, static_inputs)
    program.input_loaders, program.input_steps = loaders, len(input_steps)
    return program


def _staging_buffer(codes: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """A static buffer in the caller's float ``dtype``, shaped as ``codes`` (NHWC for a 4-D input),
    where a small int8 network input waits to be quantized inside the CUDA graph; None where the
    input is quantized in the copy instead (``STAGE_INPUT_MAX_BYTES``)."""
    nbytes = codes.numel() * dtype.itemsize
    if device.type != "cuda" or dtype not in (torch.float16, torch.float32) or nbytes > STAGE_INPUT_MAX_BYTES:
        return None
    flat = allocate(nbytes, device).view(dtype)
    if codes.dim() == 4:
        n, c, h, w = codes.shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(codes.shape)


def _wanted_dtypes(node: fx.Node, plan: Plan) -> list[torch.dtype | None]:
    """The dtype a kernel reads each input in: an int8 layer reads its main input as codes and
    its residual as stored (codes or real); any other input (an SE gate), and every input of a
    float layer, in the network's float precision."""
    if not plan.is_int8_layer(node):
        return [plan.dtype] * len(node.args)
    wanted = [torch.int8] + [plan.dtype] * (len(node.args) - 1)
    if getattr(getattr(spec(node), "epilogue", None), "residual", False):
        wanted[-1] = plan.value_dtype(node.args[-1])
    return wanted


def _ours(node: fx.Node, plan: Plan) -> bool:
    """Is the value in the network precision and planned layout (an input, a kernel result, a
    view of one), rather than a PyTorch result?"""
    return node.op == "placeholder" or node in plan.placements or node in plan.value_dtypes


def _segments(node: fx.Node) -> list[fx.Node]:
    users = sorted((u for u in node.users if u.target is operator.getitem), key=lambda u: u.args[1])
    if [u.args[1] for u in users] != list(range(len(spec(node).out_splits))):
        raise RuntimeError(f"merged conv {node.name} must be used through one getitem per segment")
    return users


def _slot_view(cat_value: torch.Tensor, cat: fx.Node, i: int) -> torch.Tensor:
    _, offset, step = cat_input_slot(cat, i)
    return cat_value[:, offset: offset + step * (cat.args[i].meta["shape"][1] - 1) + 1: step]
