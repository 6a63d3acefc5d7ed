"""Autotuning: time each layer's candidate kernel configs on the target GPU, keep the fastest,
and cache the choice keyed by GPU, Triton version and the layer's exact signature.

Kernels only expose ``configs`` and a settable ``config``; the tuner lives here, apart from them.
Like TensorRT's timing cache, choices are looked up in the user's cache (``$TORCH_GIE_CACHE`` or
``~/.cache/torch_gie/tuning.json``) and in the timings shipped with torch_gie
(``tuning_db.json``, measured on the GPUs named in its keys; a GPU without entries of its own uses
those of another GPU of its architecture, e.g. H100 timings on an H200) on every build; only ``tune=True``
times layers that neither knows, ``tune="refresh"`` every layer. Candidates are timed the way the
compiled forward runs them: replayed in a CUDA graph (``timing.time_in_cuda_graph``).
"""
from __future__ import annotations

import json
import logging
import os

import torch

from .errors import is_out_of_memory
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


# GPUs of one architecture rank kernel configs alike (same SMs, shared memory, tensor cores);
# their timings stand in for each other when the exact GPU has none.
_ARCHITECTURES = {"H100": "sm_90", "H200": "sm_90", "GH200": "sm_90", "H800": "sm_90",
                  "A100": "sm_80", "A800": "sm_80", "A30": "sm_80"}


def architecture(gpu_name: str) -> str | None:
    return next((arch for key, arch in _ARCHITECTURES.items() if key in gpu_name), None)


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
        gpu = torch.cuda.get_device_name()
        self.prefix = f"{gpu}|triton {triton.__version__}|"
        self.shipped = _load(SHIPPED_DB)
        # Prefixes of other GPUs of this architecture in the shipped cache, tried after our own.
        arch = architecture(gpu)
        others = {k.split("|", 1)[0] for k in self.shipped} - {gpu}
        self.fallback_prefixes = [f"{name}|triton {triton.__version__}|" for name in sorted(others)
                                  if arch is not None and architecture(name) == arch]
        self.cache: dict[str, dict] = _load(self.path)
        self.time_new = time_new or refresh
        self.refresh = refresh  # time every layer, replacing what the caches hold
        self.max_configs = max_configs  # kernels list their configs best-guess first
        self.timed = self.reused = 0

    def _known(self, step: KernelStep, env: list) -> tuple[str, dict | None]:
        """(cache key, the config a cache holds for this layer or None; always None when
        refreshing)."""
        sig = signature(step, env)
        key = self.prefix + sig
        known = None if self.refresh else self.cache.get(key) or self.shipped.get(key) or \
            next((self.shipped[p + sig] for p in self.fallback_prefixes if p + sig in self.shipped), None)
        return key, known

    def configs_to_run(self, step: KernelStep, env: list) -> list[dict]:
        """The configs ``tune`` will launch for this layer: the cached one, or the candidates it
        times, or the layer's own (``torch_gie.precompile`` compiles them ahead)."""
        layer = getattr(step.kernel, "layer", None)
        configs = getattr(layer, "configs", None)
        if not configs or len(configs) < 2:
            return [layer.config] if getattr(layer, "config", None) else []
        _, known = self._known(step, env)
        if known is not None:
            return [known]
        return list(configs[:self.max_configs]) if self.time_new else [layer.config]

    def tune(self, step: KernelStep, env: list) -> None:
        layer = getattr(step.kernel, "layer", None)
        configs = getattr(layer, "configs", None)
        if not configs or len(configs) < 2:
            return
        key, known = self._known(step, env)
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
                if is_out_of_memory(exc):
                    raise  # the GPU's memory, not this config: the build fails (naming the layer)
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
