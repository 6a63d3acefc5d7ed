"""``GIEModule``: the drop-in ``nn.Module`` a compile returns. It checks every call's inputs
against the compiled signature (count, shape, dtype, device) and runs the program."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..batch_range import BatchRange
from .batched import BatchedProgram
from .program import Program


class GIEModule(nn.Module):
    """A compiled model. Call it like the original; ``report()`` says what was built.

    Outputs are fresh tensors in the original dtype and a contiguous layout. With
    ``static_outputs=True`` the module returns its internal output buffers instead: no copy and
    no allocation, in the network precision and the planned layout (fp16, channels_last for
    images), overwritten by the next call.

    Built with ``batch_range`` (a ``BatchedProgram``), it takes any batch size in the range (dim
    0 of every input, the same for all); ``_signature`` then holds the shapes at ``opt``.
    """

    def __init__(self, program: Program | BatchedProgram, example_inputs: tuple[torch.Tensor, ...],
                 report: dict[str, Any], static_outputs: bool = False, options: dict[str, Any] | None = None,
                 batch_range: BatchRange | None = None):
        super().__init__()
        self.build_options = dict(options or {})  # the compile options, which torch_gie.save records
        self._program = program
        self._signature = [(tuple(t.shape), t.dtype, t.device) for t in example_inputs]
        self._report = report
        self.static_outputs = static_outputs
        self.batch_range = batch_range

    def report(self) -> dict[str, Any]:
        return self._report

    def profile(self, iters: int = 20, reps: int = 10) -> list[dict]:
        """Per-layer GPU time on CUDA (see ``Program.profile``): one dict per step with its
        name, op, kernel description, launches and median ms."""
        if self._program.arena.device.type != "cuda":
            raise RuntimeError("profile() times kernels with CUDA graphs and needs a CUDA-compiled module")
        return self._program.profile(iters, reps)

    def _check_inputs(self, inputs: tuple) -> None:
        if len(inputs) != len(self._signature):
            raise ValueError(f"expected {len(self._signature)} input tensor(s), got {len(inputs)}")
        for i, (t, (shape, dtype, device)) in enumerate(zip(inputs, self._signature)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"input {i}: expected a tensor, got {type(t).__name__}")
            if self.batch_range is not None:
                self._check_batch(i, t, shape, inputs[0])
            elif tuple(t.shape) != shape:
                hint = " (the batch size is fixed at compile time: compile again for this batch size, " \
                    "or compile with batch_range=(min, opt, max))" \
                    if len(shape) == t.dim() and tuple(t.shape[1:]) == shape[1:] else ""
                raise ValueError(f"input {i}: expected shape {shape}, got {tuple(t.shape)}{hint}")
            if t.dtype != dtype:
                raise ValueError(f"input {i}: expected dtype {dtype}, got {t.dtype}")
            if t.device != device:
                raise ValueError(f"input {i}: expected device {device}, got {t.device}")

    def _check_batch(self, i: int, t: torch.Tensor, shape: tuple[int, ...], first: torch.Tensor) -> None:
        r = self.batch_range
        expected = ("B",) + shape[1:]
        if t.dim() != len(shape) or tuple(t.shape[1:]) != shape[1:]:
            raise ValueError(f"input {i}: expected shape {expected} with batch B in {r.min}..{r.max}, "
                             f"got {tuple(t.shape)}")
        if t.shape[0] not in r:
            raise ValueError(f"input {i}: batch size {t.shape[0]} is outside the engine's batch_range "
                             f"[{r.min}, {r.max}] (min {r.min}, max {r.max}); compile with a batch_range "
                             f"that covers it")
        if i and t.shape[0] != first.shape[0]:
            raise ValueError(f"input {i}: batch size {t.shape[0]} differs from input 0's {first.shape[0]}; "
                             "every input carries the same batch")

    @torch.no_grad()
    def forward(self, *inputs: torch.Tensor) -> Any:
        self._check_inputs(inputs)
        return self._program.run(inputs, static_outputs=self.static_outputs)

    def extra_repr(self) -> str:
        r = self._report
        batch = f", batch_range={self.batch_range.as_tuple()}" if self.batch_range is not None else ""
        return (f"model={r['model']}, precision={r['precision']}, backend={r['backend']}, "
                f"launches={r['launches']}, layers_in={r['layers_in']}{batch}")
