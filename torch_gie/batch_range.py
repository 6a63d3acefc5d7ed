"""Dynamic batch (``compile(..., batch_range=(min, opt, max))``, TensorRT's optimization profiles):
the range, checked; how each value of a graph traced at ``opt`` changes with the batch; and
each value's shape, and each reshape's target, at any batch in the range.

The graph is traced, fused, calibrated and tuned once, at ``opt``. ``check_batch_polymorphic``
then proves (by shape propagation with fake tensors at ``min`` and ``max``, no compute) that every
value either has the batch in its leading dim, as ``k * batch`` rows (an image, a token tensor of
``batch * windows`` rows), or does not depend on it (a constant); a model whose code fixes the
batch size (a reshape to a literal size, a batch reduction) is refused there. Every batch size
then reuses one arena planned for ``max``: a value at batch ``b`` is the first ``k * b`` rows of
its buffer (rows are outermost in NHWC and contiguous layouts alike).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from . import ops
from .errors import CompileError
from .graph import GraphRunner, is_canonical, spec


@dataclass(frozen=True)
class BatchRange:
    """Batch sizes ``min <= opt <= max`` one engine serves; kernels are tuned for ``opt``."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, value) -> BatchRange:
        """ValueError, saying what came, unless ``value`` is three ints with 1 <= min <= opt <= max."""
        if isinstance(value, BatchRange):
            return value
        if not isinstance(value, (tuple, list)) or len(value) != 3:
            raise ValueError(f"batch_range must be a tuple (min, opt, max) of three batch sizes, got {value!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"batch_range must hold ints (min, opt, max), got {value!r} "
                             f"({', '.join(type(v).__name__ for v in value)})")
        lo, opt, hi = value
        if lo < 1:
            raise ValueError(f"batch_range min must be at least 1, got batch_range={tuple(value)}")
        if not lo <= opt <= hi:
            raise ValueError(f"batch_range must satisfy min <= opt <= max, got min={lo}, opt={opt}, max={hi}")
        return cls(lo, opt, hi)

    def __contains__(self, batch: int) -> bool:
        return self.min <= batch <= self.max

    def __str__(self) -> str:
        return f"[{self.min}, {self.max}] (tuned for {self.opt})"

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.min, self.opt, self.max)


def example_batch(inputs: Sequence[torch.Tensor]) -> int:
    """The batch size of the example inputs: their common leading dim (ValueError otherwise)."""
    sizes = {t.shape[0] if t.dim() else None for t in inputs}
    if len(sizes) != 1 or None in sizes:
        raise ValueError("batch_range needs example inputs that all have the batch as their leading dim, "
                         f"got shapes {[tuple(t.shape) for t in inputs]}")
    return sizes.pop()


def rebatch_inputs(inputs: Sequence[torch.Tensor], batch: int) -> tuple[torch.Tensor, ...]:
    """The example inputs with ``batch`` samples: their own samples repeated (or the first
    ``batch`` of them). New tensors: the caller's are not touched."""
    n = example_batch(inputs)
    if n == batch:
        return tuple(inputs)
    reps = -(-batch // n)
    return tuple(t.repeat((reps,) + (1,) * (t.dim() - 1))[:batch] for t in inputs)


class GraphBatching:
    """How the values of a graph traced at batch ``opt`` change with the batch. ``rows[node]``:
    the value has ``rows[node] * batch`` rows (its leading dim); a value missing from it has one
    shape at every batch."""

    def __init__(self, opt: int, rows: dict[fx.Node, int]):
        self.opt, self.rows = opt, rows

    def shape(self, node: fx.Node, batch: int) -> tuple[int, ...]:
        traced = tuple(node.meta["shape"])
        if node not in self.rows:
            return traced
        return (self.rows[node] * batch,) + traced[1:]

    def at(self, batch: int) -> BatchShapes:
        return BatchShapes(self, batch)


@dataclass(frozen=True)
class BatchShapes:
    """Shapes at one batch size, as ``build_program`` asks for them."""

    batching: GraphBatching
    batch: int

    def rows(self, node: fx.Node) -> int:
        return self.batching.shape(node, self.batch)[0]

    def view_spec(self, node: fx.Node):
        """A view op's spec at this batch: a reshape to the traced (concrete) shape is rebatched."""
        if is_canonical(node, ops.reshape):
            return ops.replace(spec(node), shape=self.batching.shape(node, self.batch))
        return spec(node)


class _Refused(Exception):
    """Stops a probe that found a value that cannot follow the batch (``_Probe.refused`` says why)."""


class _Probe(GraphRunner):
    """Runs the graph on fake tensors (shapes only) at another batch and records every tensor
    result's shape. A reshape of a value whose rows changed reshapes to (-1, *traced[1:]): its
    traced target holds the example's batch as a number, where the model's code computed it
    (``x.size(0)``) or left it to be inferred (-1). One whose code gave a literal leading size
    is refused: that size does not follow the batch."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.refused: str | None = None  # why the graph cannot follow the batch

    def run_node(self, n: fx.Node):
        if is_canonical(n, ops.reshape):
            (x,) = self.fetch_args_kwargs_from_env(n)[0]
            traced = tuple(n.meta["shape"])
            grew = tuple(x.shape) != tuple(n.args[0].meta["shape"])
            if grew and spec(n).literal_leading:
                self.refused = (f"batch_range: {n.name} reshapes to a literal leading size ({traced[0]}) in the "
                                "model's code, which fixes the batch size; write it as x.reshape(x.size(0), ...) "
                                "or x.reshape(-1, ...), or compile without batch_range (one engine per batch size)")
                raise _Refused
            result = x.reshape((-1,) + traced[1:] if grew and traced else traced)
        else:
            result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.shapes[n] = tuple(result.shape)
        return result


def _probe(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], batch: int) -> dict[fx.Node, tuple[int, ...]]:
    probe = _Probe(gm)
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fakes = [mode.from_tensor(torch.empty((batch,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device))
                     for t in inputs]
            probe.run(*fakes)
    except Exception as exc:  # whatever the model's own code raises at that batch
        if probe.refused is not None:  # raised here, without the interpreter's notes on the node
            raise CompileError(probe.refused) from None
        raise CompileError(f"batch_range: the compiled graph does not run at batch {batch}: "
                           f"{type(exc).__name__}: {exc}. The model's code fixes the batch size; compile "
                           f"without batch_range (one engine per batch size)") from exc
    return probe.shapes


def check_batch_polymorphic(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], batch_range: BatchRange
                            ) -> GraphBatching:
    """Each value's rows per sample, proven at ``min`` and ``max`` (``inputs`` are at ``opt``).
    CompileError naming the value whose shape follows neither rule (batch-proportional leading
    dim, or independent of the batch)."""
    opt = batch_range.opt
    probes = {b: _probe(gm, inputs, b) for b in sorted({batch_range.min, batch_range.max} - {opt})}
    rows: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        traced = node.meta.get("shape")
        if traced is None or node.op == "output":
            continue
        traced = tuple(traced)
        seen = {b: shapes.get(node) for b, shapes in probes.items()}
        if all(s is None or s == traced for s in seen.values()):
            continue  # independent of the batch (or not a tensor at the probes)
        k = traced[0] // opt if traced and traced[0] % opt == 0 else None
        if k is None or any(s != (k * b,) + traced[1:] for b, s in seen.items()):
            at = ", ".join(f"{s} at batch {b}" for b, s in seen.items())
            raise CompileError(f"batch_range: {node.name} has shape {traced} at batch {opt} but {at}: only the "
                               "leading dim may follow the batch; compile without batch_range "
                               "(one engine per batch size)")
        rows[node] = k
    return GraphBatching(opt, rows)


@contextmanager
def traced_shapes_at(gm: fx.GraphModule, batching: GraphBatching, batch: int) -> Iterator[None]:
    """Within the block, every ``meta["shape"]`` says the shape at ``batch``: the planner places
    buffers from it, so the arena is planned for the batch range's max. Restored on exit (the
    kernels are built, and the report written, for the traced ``opt`` shapes)."""
    saved = {n: n.meta["shape"] for n in gm.graph.nodes if "shape" in n.meta}
    try:
        for node in saved:
            node.meta["shape"] = batching.shape(node, batch)
        yield
    finally:
        for node, shape in saved.items():
            node.meta["shape"] = shape
