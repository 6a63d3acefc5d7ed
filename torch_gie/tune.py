"""Autotuning: time each layer's candidate kernel configs on the target GPU, keep the fastest,
and cache the choice keyed by GPU, Triton version and the layer's exact signature.

Kernels only expose ``configs`` and a settable ``config``; the tuner lives here, apart from them.
Like TensorRT's timing cache, choices are looked up in the user's cache (``$TORCH_GIE_CACHE`` or
``~/.cache/torch_gie/tuning.json``) and in the timings shipped with torch_gie
(``tuning_db.json``, measured on the GPUs named in its keys) on every build; only ``tune=True``
times layers that neither knows, ``tune="refresh"`` every layer. Candidates are timed the way the
compiled forward runs them: replayed in a CUDA graph (``timing.time_in_cuda_graph``).
"""
from __future__ import annotations

import json
import logging
import os

import torch

from .runtime.steps import KernelStep
from .timing import time_in_cuda_graph

log = logging.getLogger(__name__)


SHIPPED_DB = os.path.join(os.path.dirname(__file__), "tuning_db.json")


def _load(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        log.warning("torch_gie: ignoring unreadable tuning cache %s", path)
        return {}


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

    def __init__(self, path: str | None = None, max_configs: int = 8, time_new: bool = True,
                 refresh: bool = False):
        import triton
        self.path = path or cache_path()
        self.prefix = f"{torch.cuda.get_device_name()}|triton {triton.__version__}|"
        self.shipped = _load(SHIPPED_DB)
        self.cache: dict[str, dict] = _load(self.path)
        self.time_new = time_new or refresh
        self.refresh = refresh  # time every layer, replacing what the caches hold
        self.max_configs = max_configs  # kernels list their configs best-guess first
        self.timed = self.reused = 0

    def tune(self, step: KernelStep, env: list) -> None:
        layer = getattr(step.kernel, "layer", None)
        configs = getattr(layer, "configs", None)
        if not configs or len(configs) < 2:
            return
        key = self.prefix + signature(step, env)
        known = None if self.refresh else self.cache.get(key) or self.shipped.get(key)
        if known is not None:
            try:
                layer.config = known
                self.reused += 1
                return
            except ValueError as exc:  # written by another torch_gie version: time it again
                log.warning("torch_gie: ignoring cached config for %s: %s", step.name, exc)
        if not self.time_new:
            return
        best, best_ms = None, float("inf")
        for config in configs[:self.max_configs]:
            try:
                layer.config = config
                ms = time_in_cuda_graph(lambda: step(env))
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
        if not self.timed:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w") as f:
            json.dump(self.cache, f, indent=0, sort_keys=True)
