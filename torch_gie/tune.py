"""Autotuning: time each layer's candidate kernel configs on the target GPU, keep the fastest,
and cache the choice on disk keyed by GPU, Triton version and the layer's exact signature.

Kernels only expose ``configs`` and a settable ``config``; the tuner lives here, apart from them.
The cache is a JSON file (``$TORCH_GIE_CACHE`` or ``~/.cache/torch_gie/tuning.json``).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch

from .runtime.steps import KernelStep

log = logging.getLogger(__name__)


def cache_path() -> str:
    return os.environ.get("TORCH_GIE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "torch_gie",
                                                          "tuning.json"))


def _describe_tensor(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)}/{t.stride()}/{str(t.dtype)[6:]}"


def signature(step: KernelStep, env: list) -> str:
    """What the best config can depend on: kernel kind and attributes, input and output views."""
    layer = step.kernel.layer
    attrs = {k: v for k, v in vars(layer).items()
             if isinstance(v, (int, float, str, tuple, bool)) and not k.startswith("_config")}
    ins = [_describe_tensor(env[i]) for i in step.in_ids]
    outs = [_describe_tensor(o) for o in step.outs]
    return f"{type(layer).__name__}|{sorted(attrs.items())}|{ins}|{outs}"


class Tuner:
    """Picks and remembers the fastest config per layer signature."""

    def __init__(self, path: Optional[str] = None, max_configs: int = 8):
        import triton
        self.path = path or cache_path()
        self.prefix = f"{torch.cuda.get_device_name()}|triton {triton.__version__}|"
        self.cache: dict[str, dict] = {}
        if os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    self.cache = json.load(f)
            except (OSError, json.JSONDecodeError):
                log.warning("torch_gie: ignoring unreadable tuning cache %s", self.path)
        self.max_configs = max_configs  # kernels list their configs best-guess first
        self.timed = self.reused = 0

    def tune(self, step: KernelStep, env: list) -> None:
        layer = getattr(step.kernel, "layer", None)
        configs = getattr(layer, "configs", None)
        if not configs or len(configs) < 2:
            return
        key = self.prefix + signature(step, env)
        if key in self.cache:
            layer.config = self.cache[key]
            self.reused += 1
            return
        import triton.testing
        best, best_ms = None, float("inf")
        for config in configs[:self.max_configs]:
            try:
                layer.config = config
                ms = triton.testing.do_bench(lambda: step(env), warmup=3, rep=15, return_mode="median")
            except Exception as exc:  # a config may not fit this GPU (shared memory): skip it
                log.debug("config %s failed for %s: %s", config, step.name, exc)
                continue
            if ms < best_ms:
                best, best_ms = config, ms
        if best is None:
            raise RuntimeError(f"no kernel config ran for layer {step.name}")
        layer.config = best
        self.cache[key] = best
        self.timed += 1
        log.info("tuned %s: %s (%.3f ms)", step.name, best, best_ms)

    def save(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w") as f:
            json.dump(self.cache, f, indent=0, sort_keys=True)
