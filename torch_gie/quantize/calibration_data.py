"""The calibration data a user passes, checked and normalized batch by batch: whatever iterable they
have (one tensor, a list of tensors, a DataLoader of tensors or of (input, label) pairs) becomes
a stream of input tuples shaped like the example inputs, on their device, all finite. A bad batch
fails here, naming the batch and the input, not deep inside a calibration forward pass.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, ...]


def _as_example_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> Batch:
    examples = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not examples or not all(isinstance(e, torch.Tensor) for e in examples):
        raise TypeError("example_inputs must be a tensor or a non-empty tuple/list of tensors")
    return examples


def _is_tensor_sequence(obj: Any) -> bool:
    return isinstance(obj, (tuple, list)) and bool(obj) and all(isinstance(t, torch.Tensor) for t in obj)


def _batches_of(data: Any, num_inputs: int) -> Iterable[Any]:
    """``data`` as an iterable of batches: a tensor is one batch, and so is a tuple/list of
    tensors for a model of several inputs (for a one-input model it is a list of batches)."""
    if isinstance(data, torch.Tensor):
        return [data]
    if num_inputs > 1 and _is_tensor_sequence(data):
        return [data]
    if isinstance(data, (str, bytes, dict)) or not isinstance(data, Iterable):
        raise TypeError(f"calibration_data must be a tensor, a tuple/list of tensors or an iterable of "
                        f"batches (e.g. a DataLoader), got {type(data).__name__}")
    return data


def _inputs_of(batch: Any, num_inputs: int, index: int) -> Sequence[Any]:
    """The model inputs in one batch, labels dropped: for a one-input model a tuple/list batch
    (a DataLoader's (input, label)) contributes its first element; for k inputs a batch is k
    tensors, or a pair whose first element is the k tensors ((inputs, label))."""
    if num_inputs == 1:
        return [batch[0] if isinstance(batch, (tuple, list)) and batch else batch]
    if isinstance(batch, (tuple, list)) and batch and _is_tensor_sequence(batch[0]):  # (inputs, label)
        batch = batch[0]
    if not isinstance(batch, (tuple, list)) or len(batch) != num_inputs:
        got = f"{len(batch)} items" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}"
        raise ValueError(f"calibration batch {index}: the model takes {num_inputs} inputs (like example_inputs), "
                         f"got {got}; yield a tuple of {num_inputs} tensors, or (inputs, label)")
    return batch


def _checked(x: Any, example: torch.Tensor, index: int, position: int) -> torch.Tensor:
    """One input of one batch, checked against its example and moved to the example's device and
    dtype (``.to`` copies when it has to and never writes into the user's tensor)."""
    where = f"calibration batch {index}, input {position}"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected a tensor, got {type(x).__name__}")
    if x.dim() != example.dim():
        raise ValueError(f"{where}: expected rank {example.dim()} like the example {tuple(example.shape)}, "
                         f"got shape {tuple(x.shape)}")
    if tuple(x.shape[1:]) != tuple(example.shape[1:]):
        raise ValueError(f"{where}: expected shape (N, {', '.join(map(str, example.shape[1:]))}) "
                         f"(any batch size N), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{where}: the batch is empty (batch size 0)")
    if example.is_floating_point() != x.is_floating_point() or not (x.is_floating_point() or x.dtype == example.dtype):
        expected = "a floating dtype" if example.is_floating_point() else str(example.dtype)
        raise ValueError(f"{where}: expected {expected} like the example ({example.dtype}), got {x.dtype}")
    x = x.to(device=example.device, dtype=example.dtype)
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{where}: holds {bad} NaN/Inf value(s); calibration data must be finite")
    return x


def iter_calibration_batches(data: Any, example_inputs: torch.Tensor | Sequence[torch.Tensor], *,
                             progress: bool = True, desc: str = "int8 calibration") -> Iterator[Batch]:
    """Yield each calibration batch as a tuple of tensors matching ``example_inputs``: the same
    number of inputs, rank and non-batch dims (any batch size), a floating dtype where the example
    is floating (cast to the example's dtype), on the example's device, all finite; else raise a
    ValueError naming the batch and the input. See ``_batches_of`` and ``_inputs_of`` for the
    accepted forms and how labels are dropped. The yielded tensors may be the user's own when no
    move or cast was needed: read them, never write into them. A tqdm bar shows when ``data`` has
    a len, ``progress`` is true and stderr is a terminal (tqdm's own check: off in redirected logs)."""
    if data is None:
        raise ValueError("int8 needs calibration data: pass calibration_data= (a tensor, a list of batches "
                         "or a DataLoader) or a calibration_cache file written by an earlier calibration")
    examples = _as_example_tuple(example_inputs)
    batches = _batches_of(data, len(examples))
    total = len(batches) if hasattr(batches, "__len__") else None
    seen = 0
    with tqdm(batches, total=total, desc=desc, unit="batch", leave=False,
              disable=True if not progress or total is None else None) as bar:
        for index, batch in enumerate(bar):
            inputs = _inputs_of(batch, len(examples), index)
            yield tuple(_checked(x, e, index, k) for k, (x, e) in enumerate(zip(inputs, examples)))
            seen += 1
    if seen == 0:
        raise ValueError("calibration_data yielded no batches: pass at least one batch")
    logger.debug("calibration: %d batches checked", seen)
