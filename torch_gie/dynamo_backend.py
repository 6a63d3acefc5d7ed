"""``torch.compile(model, backend="torch_gie")``: torch_gie as a TorchDynamo backend, for users
who already call torch.compile. Registered through the ``torch_dynamo_backends`` entry point
(setup.py), so the name works without importing torch_gie first.

Dynamo hands over each captured graph with the module's parameters and buffers lifted to graph
inputs (placeholders named ``L_self_..._parameters_...`` / ``_buffers_...``). They become
constants of the graph again, so BatchNorm folds and weights pack at build time; the engine
keeps its own copy, as ``torch_gie.compile`` does. The remaining inputs are the real ones. A
graph torch_gie cannot build (a graph break's fragment without tensors, an unsupported op that
fails, another batch size than the engine's) runs eagerly, with a warning.

Options: ``torch.compile(model, backend="torch_gie", options={"precision": "fp16", ...})``,
the keyword arguments of ``torch_gie.compile``. Where the package runs from a source tree that
was never pip-installed (no entry point), ``torch_gie.dynamo_backend.register()`` adds the name.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

from .compiler import compile as gie_compile

_LIFTED = ("_parameters_", "_buffers_")


def _is_lifted_state(node: fx.Node, example: Any) -> bool:
    """A placeholder Dynamo made of a parameter or buffer of the traced module."""
    return isinstance(example, nn.Parameter) or any(tag in str(node.target) for tag in _LIFTED)


def constants_inlined(gm: fx.GraphModule, examples: Sequence[Any]) -> tuple[fx.GraphModule, list[int]]:
    """A copy of ``gm`` whose lifted parameters and buffers are ``get_attr`` constants, and the
    positions of the inputs that stay inputs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(examples):
        raise ValueError(f"graph has {len(placeholders)} inputs, got {len(examples)} examples")
    root = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    kept = []
    for i, (node, example) in enumerate(zip(placeholders, examples)):
        if isinstance(example, torch.Tensor) and _is_lifted_state(node, example):
            name = f"_c{i}"
            root.register_buffer(name, example.detach())
            env[node] = graph.get_attr(name)
        else:
            env[node] = graph.placeholder(node.name)
            kept.append(i)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    for name, mod in gm.named_children():
        root.add_module(name, mod)
    for name, value in vars(gm).items():  # get_attr targets Dynamo kept as attributes
        if isinstance(value, torch.Tensor) and not hasattr(root, name):
            root.register_buffer(name, value)
    return fx.GraphModule(root, graph).eval(), kept


def torch_gie_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
    """The Dynamo backend: a torch_gie engine for the graph, or the graph itself on failure."""
    options = dict(kwargs.get("options") or {})
    try:
        inlined, kept = constants_inlined(gm, example_inputs)
        inputs = tuple(example_inputs[i] for i in kept)
        if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
            raise ValueError("the graph has no tensor inputs")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fallback lists: the engine's report() has them
            engine = gie_compile(inlined, inputs, **options)
    except Exception as exc:  # noqa: BLE001 - any failure means: run this graph eagerly
        warnings.warn(f"torch_gie backend: running this graph eagerly ({type(exc).__name__}: {exc})",
                      stacklevel=2)
        return gm.forward

    def run(*args: Any) -> Any:
        return engine(*(args[i] for i in kept))

    run.engine = engine  # for reports: torch.compile(...)'s graphs keep theirs here
    return run


def register() -> None:
    """Make ``backend="torch_gie"`` known to torch.compile without the installed entry point (a
    source tree on PYTHONPATH); a no-op when the name is known already."""
    from torch._dynamo import list_backends, register_backend
    if "torch_gie" not in list_backends(exclude_tags=()):
        register_backend(torch_gie_backend, name="torch_gie")
