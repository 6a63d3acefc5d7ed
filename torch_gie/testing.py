"""Helpers for checking compiled models against PyTorch (used by the tests and benchmarks).

Untrained torchvision models are poor test subjects: BatchNorm holds identity statistics, and
without them some (Inception-v3) blow activations up past fp16's range. ``calibrate_batchnorm_``
gives every BatchNorm the statistics of real activations, as training would, so fp16 runs and
error figures mean what they would for a trained network.
"""
from __future__ import annotations

import torch
from torch import nn

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64, the max over a (possibly nested) output; NaN fails."""
    if isinstance(ref, (tuple, list)):
        if not isinstance(out, (tuple, list)) or len(out) != len(ref):
            raise AssertionError("outputs have a different structure than the reference")
        return max(rel_err(o, r) for o, r in zip(out, ref))
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        raise AssertionError("output has NaN/inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, and zero-initialized weights re-drawn,
    so folding and fusion are tested on non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _NORMS):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
            if m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return redraw_zero_parameters_(model, seed)


@torch.no_grad()
def redraw_zero_parameters_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Parameters initialized to all zeros (classifier heads, some biases) redrawn small and random,
    so that a model's output depends on its input."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() > 0 and p.abs().max() == 0:
            p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.02)
    return model


@torch.no_grad()
def calibrate_batchnorm_(model: nn.Module, example: torch.Tensor, batches: int = 2) -> nn.Module:
    """Set every BatchNorm's running statistics to those of the activations on random inputs
    shaped like ``example`` (cumulative average over ``batches``); returns the model in eval."""
    norms = [m for m in model.modules() if isinstance(m, _NORMS)]
    saved = [m.momentum for m in norms]
    model.eval()  # only the norms train: the model's own train-mode branches (aux heads) stay off
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    g = torch.Generator(device=example.device).manual_seed(0)
    for _ in range(batches):
        model(torch.randn(example.shape, generator=g, device=example.device, dtype=example.dtype))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return model.eval()
