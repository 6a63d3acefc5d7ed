"""The calibration run: the optimized graph (after every fusion pass) runs in fp32 with PyTorch
over the user's calibration batches, and one observer per quantization class sees every value
of that class, exactly where the int8 kernels will quantize. A calibrator then turns each
observer into a range, and the ranges into QParams.

Ranges are keyed by a stable class name (the class root's node name) so a calibration cache
written by one build is found by the next build of the same model.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import fx

from ..graph import GraphRunner
from .calibrators import Calibrator, Observer, TensorRange


class _ObservingRunner(GraphRunner):
    def __init__(self, gm: fx.GraphModule, observed: dict[fx.Node, Observer]):
        super().__init__(gm)
        self.observed = observed

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        obs = self.observed.get(n)
        if obs is not None and isinstance(value, torch.Tensor):
            obs.update(value.detach().float())
        return value


@torch.no_grad()
def observe(gm: fx.GraphModule, classes: dict[fx.Node, fx.Node], roots: set[fx.Node],
            batches: Iterable[tuple[torch.Tensor, ...]], batch_size: int) -> dict[fx.Node, Observer]:
    """Run ``gm`` on every batch, regrouped to ``batch_size`` samples (``rebatch``); return one
    observer per class root in ``roots``, fed with every value of that class."""
    observers = {root: Observer(name=root.name) for root in roots}
    observed = {v: observers[root] for v, root in classes.items() if root in observers}
    runner = _ObservingRunner(gm, observed)
    count = 0
    for batch in rebatch(batches, batch_size):
        runner.run(*batch)
        count += 1
    if count == 0:
        raise ValueError("calibration_data yielded no batches; pass an iterable of input batches")
    return observers


def rebatch(batches: Iterable[tuple[torch.Tensor, ...]], size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """The samples of ``batches`` (any batch sizes) regrouped into batches of exactly ``size``:
    the captured graph may hold the example's batch size (a reshape, a view). A short last
    group is filled up by repeating its own samples, which moves no min or max and barely
    weighs on a histogram."""
    pending: list[tuple[torch.Tensor, ...]] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += batch[0].shape[0]
        while count >= size:
            joined = tuple(torch.cat(parts) for parts in zip(*pending))
            yield tuple(t[:size] for t in joined)
            rest = tuple(t[size:] for t in joined)
            count -= size
            pending = [rest] if count else []
    if count:
        joined = tuple(torch.cat(parts) for parts in zip(*pending))
        reps = -(-size // count)
        yield tuple(t.repeat((reps,) + (1,) * (t.dim() - 1))[:size] for t in joined)


def class_ranges(observers: dict[fx.Node, Observer], calibrator: Calibrator) -> dict[str, TensorRange]:
    """Each class's calibrated range, keyed by its root's node name."""
    return {root.name: calibrator.compute_range(obs) for root, obs in observers.items()}
