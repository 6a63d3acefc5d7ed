"""One engine for a range of batch sizes (``compile(..., batch_range=(min, opt, max))``).

A ``BatchedProgram`` holds one ``Storage`` (the arena planned for ``max``), the kernel objects
lowered and tuned at ``opt`` (packed weights and chosen configs; the Triton kernels take the
batch as a runtime size), and a small LRU of per-batch ``Program``s: the static views of the
shared arena at that batch (``view[:rows]``), the steps, and on CUDA the program's own CUDA
graph. A batch size seen for the first time gets its program built, warmed up and captured in
that call (no re-trace, re-calibration or re-tuning); at most ``max_programs`` stay (the least
recently used is dropped, and its CUDA graph freed; ``opt``'s stays). All of them run on the
one arena, so they share one lock and stream: calls are serialized whatever their batch.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..batch_range import BatchRange, GraphBatching
from ..errors import OutOfMemoryError, build_step, release_failed_build
from .program import Program
from .steps import Kernel, KernelStep

DEFAULT_MAX_PROGRAMS = 8  # batch sizes that keep a built program (and CUDA graph) at once


class BatchedProgram:
    """Runs each call with the program of its batch size (``run``), building it on first use.

    ``build(shapes, kernels)`` makes a program at ``shapes.batch`` on the shared storage, with the
    given kernels (node -> (kernel, backend)); ``warm_up(program)`` runs it once (kernels compile
    for the new sizes, workspaces grow) before ``capture_cuda_graph``."""

    def __init__(self, base: Program, batch_range: BatchRange, batching: GraphBatching,
                 build: Callable[..., Program], warm_up: Callable[[Program], None], cuda_graph: bool,
                 max_programs: int = DEFAULT_MAX_PROGRAMS):
        if max_programs < 1:
            raise ValueError(f"max_batch_graphs must be at least 1, got {max_programs}")
        self.batch_range, self.batching, self.base = batch_range, batching, base
        self._build, self._warm_up, self._cuda_graph = build, warm_up, cuda_graph
        self.max_programs = max_programs
        self._programs: OrderedDict[int, Program] = OrderedDict({batch_range.opt: base})
        self.built = 1  # programs built so far (evicted ones rebuilt count again)
        self._lock, self._stream = base.storage.lock, base.storage.stream

    # The opt program stands for the engine where one program is asked for (report, save, profile).
    @property
    def gm(self):
        return self.base.gm

    @property
    def plan(self):
        return self.base.plan

    @property
    def arena(self) -> torch.Tensor:
        return self.base.arena

    @property
    def steps(self):
        return self.base.steps

    @property
    def graph(self):
        return self.base.graph

    def profile(self, iters: int = 20, reps: int = 10) -> list[dict]:
        return self.base.profile(iters, reps)

    @property
    def batch_sizes(self) -> list[int]:
        """The batch sizes holding a built program, least recently used first."""
        return list(self._programs)

    def kernels(self) -> dict[Any, tuple[Kernel, str]]:
        """The opt program's kernel per node: what every other batch size runs (a layer whose
        kernel failed at build already runs its PyTorch fallback there)."""
        return {s.node: (s.kernel, s.backend) for s in self.base.steps if isinstance(s, KernelStep)}

    def program(self, batch: int) -> Program:
        """The program for ``batch``, built (and captured) now if no program holds it."""
        with self._lock:
            program = self._programs.get(batch)
            if program is None:
                return self._add(batch, capture=self._cuda_graph)
            self._programs.move_to_end(batch)
            if self._cuda_graph and program.graph is None:  # prepared (max) but not captured yet
                with build_step("capturing a batch size's CUDA graph"), torch.no_grad(), self._on_stream():
                    program.capture_cuda_graph()
            return program

    def prepare(self, batch: int) -> None:
        """Build ``batch``'s program and run it once, without capturing it (its first call does).
        The build prepares the max batch this way first, so the layers' scratch workspaces reach
        their largest size before any graph records them."""
        with self._lock:
            self._add(batch, capture=False)

    def _add(self, batch: int, capture: bool) -> Program:
        try:
            program = self._make(batch, capture)
        except OutOfMemoryError as exc:
            # Name the batch, and free the half-built program now: the error the caller may keep
            # must not keep the program's frames (its graph's pool, its buffers) alive.
            error = OutOfMemoryError(f"{exc.step}, for batch size {batch}", exc.nbytes, exc.detail)
            release_failed_build(exc)
            raise error from None
        self._programs[batch] = program
        while len(self._programs) > self.max_programs:
            self._evict()
        return program

    def _make(self, batch: int, capture: bool) -> Program:
        with build_step("building a batch size's program"), torch.no_grad(), self._on_stream():
            program = self._build(self.batching.at(batch), self.kernels())
            self._warm_up(program)
            if capture:
                program.capture_cuda_graph()
        self.built += 1
        return program

    def _evict(self) -> None:
        """Drop the least recently used program other than opt's, and its CUDA graph."""
        victim = next(b for b in self._programs if b != self.batch_range.opt)
        self._programs.pop(victim).drop_cuda_graph()

    @contextmanager
    def _on_stream(self) -> Iterator[None]:
        """Build work on the engine's stream: after what earlier calls queued there (they used the
        arena) and the caller's stream, and before what the caller issues next."""
        if self._stream is None:
            yield
            return
        caller = torch.cuda.current_stream(self._stream.device)
        self._stream.wait_stream(caller)
        with torch.cuda.stream(self._stream):
            yield
        caller.wait_stream(self._stream)

    def run(self, inputs: Sequence[torch.Tensor], *, static_outputs: bool = False) -> Any:
        """One forward with the program of the inputs' batch size (checked by the caller)."""
        with self._lock:  # re-entrant: the program's own run takes it again
            program = self.program(inputs[0].shape[0])
            return program.run(inputs, static_outputs=static_outputs)
