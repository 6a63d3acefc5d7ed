"""The calibration run: the optimized graph (after every fusion pass) runs in fp32 with PyTorch
over the user's calibration batches, and one observer per quantization class sees every value
of that class, exactly where the int8 kernels will quantize. A calibrator then turns each
observer into a range, and the ranges into QParams.

Ranges are keyed by a stable class name (the class root's node name) so a calibration cache
written by one build is found by the next build of the same model.
"""
from __future__ import annotations

from collections.abc import Iterable
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
            batches: Iterable[tuple[torch.Tensor, ...]]) -> dict[fx.Node, Observer]:
    """Run ``gm`` on every batch; return one observer per class root in ``roots``, fed with every
    value of that class."""
    observers = {root: Observer(name=root.name) for root in roots}
    observed = {v: observers[root] for v, root in classes.items() if root in observers}
    runner = _ObservingRunner(gm, observed)
    count = 0
    for batch in batches:
        runner.run(*batch)
        count += 1
    if count == 0:
        raise ValueError("calibration_data yielded no batches; pass an iterable of input batches")
    return observers


def class_ranges(observers: dict[fx.Node, Observer], calibrator: Calibrator) -> dict[str, TensorRange]:
    """Each class's calibrated range, keyed by its root's node name."""
    return {root.name: calibrator.compute_range(obs) for root, obs in observers.items()}
