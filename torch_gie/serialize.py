"""Engine files: ``save`` writes a compiled module (its optimized graph, specs, int8 parameters and
chosen kernel configs) and ``load`` rebuilds it without the model's Python code and without pickle.

Layout (like safetensors): ``MAGIC`` (8 bytes), the header length (8 bytes, little-endian), a JSON
header, then the raw tensor bytes the header's ``tensors`` table points into. The header's
``digest`` is the sha256 of the header without it (canonical JSON) followed by the tensor bytes.
Nothing in a file names Python code: graph targets are canonical ops, or functions looked up by
name in an allow-list of torch/operator/math namespaces; spec classes come from a fixed table.
"""
from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import struct
import time
from importlib import metadata

import torch
from torch import fx

import torch_gie

from .batch_range import BatchRange, check_batch_polymorphic
from .compiler import _resolve_backend, build_engine, plan_for
from .errors import OutOfMemoryError, release_failed_build
from .passes import PassResult
from .plan.precision import PrecisionPlan
from .report import build_report
from .runtime.module import GIEModule
from .runtime.steps import KernelStep
from .serialize_values import (
    CANONICAL,
    DTYPES,
    Decoder,
    Encoder,
    allowed_name,
    resolve,
    target_of,
)

log = logging.getLogger("torch_gie")

MAGIC = b"TGIEENG\x00"
FORMAT = "torch_gie.engine"
FORMAT_VERSION = 1
_META_KEYS = ("shape", "dtype", "spec", "slot", "segment_of", "cat_copies", "source", "fallback_reason",
              "tensor_valued", "quant")
_SAVED_OPTIONS = ("cuda_graph", "streams", "fp32_precision", "tune", "disable_passes", "max_batch_graphs")
_REBUILD = "rebuild it on this machine: torch_gie.compile(model, example_inputs, ...) then torch_gie.save"

def _encode_graph(gm: fx.GraphModule, enc: Encoder, configs: dict[str, dict]) -> dict:
    nodes, constants = [], {}
    for node in gm.graph.nodes:
        entry = {"name": node.name, "op": node.op, "target": target_of(node, gm),
                 "args": enc(tuple(node.args)), "kwargs": {k: enc(v) for k, v in node.kwargs.items()},
                 "meta": {k: enc(node.meta[k]) for k in _META_KEYS if k in node.meta}}
        if node.name in configs:
            entry["kernel"] = enc(configs[node.name])
        if node.op == "get_attr":
            constants[node.target] = enc(operator.attrgetter(node.target)(gm))
        nodes.append(entry)
    return {"nodes": nodes, "constants": constants}


def _kernel_choices(program) -> dict[str, dict]:
    """Each kernel step's backend and chosen config (so loading neither tunes nor guesses)."""
    out = {}
    for step in program.steps:
        if isinstance(step, KernelStep):
            layer = getattr(step.kernel, "layer", None)
            entry = {"backend": step.backend}
            if layer is not None and hasattr(layer, "configs") and hasattr(layer, "config"):
                entry["config"] = layer.config
            out[step.name] = entry
    return out


def _device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"type": device.type}
    return {"type": "cuda", "gpu": torch.cuda.get_device_name(device),
            "capability": list(torch.cuda.get_device_capability(device))}


def _versions() -> dict:
    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = None
    return {"torch_gie": torch_gie.__version__, "torch": torch.__version__, "triton": triton}


def _int8_header(plan, enc: Encoder) -> dict | None:
    pp = plan.precision
    if pp is None:
        return None
    return {"int8_layers": sorted(n.name for n in pp.int8_layers),
            "classes": {v.name: root.name for v, root in pp.classes.items()},
            "int8_classes": sorted(n.name for n in pp.int8_classes),
            "qparams": {root.name: enc(qp) for root, qp in plan.qparams.items()},
            "search": enc(pp.search)}


def _digest(header: dict, data: bytes | bytearray | memoryview) -> str:
    h = hashlib.sha256(_canonical({k: v for k, v in header.items() if k != "digest"}))
    h.update(data)
    return "sha256:" + h.hexdigest()


def _canonical(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def save(module: GIEModule, path: str | os.PathLike) -> None:
    """Write ``module`` (a ``torch_gie.compile`` result) to ``path`` as an engine file that
    ``torch_gie.load`` rebuilds for the same GPU (or CPU) without the model's code. Raises
    ValueError, before writing anything, for a graph that runs the model's own Python code."""
    if not isinstance(module, GIEModule):
        raise TypeError(f"torch_gie.save takes a module torch_gie.compile returned, got {type(module).__name__}")
    program, report = module._program, module.report()
    enc = Encoder()
    graph = _encode_graph(program.gm, enc, _kernel_choices(program))
    options = getattr(module, "build_options", {})
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "versions": _versions(),
        "device": _device_info(program.arena.device),
        "build": {"precision": report["precision"], "backend": report["backend"],
                  "plan_dtype": str(program.plan.dtype)[6:], "static_outputs": module.static_outputs,
                  "options": {k: enc(options[k]) for k in _SAVED_OPTIONS if k in options},
                  # inputs and graph shapes are at opt; the loader re-plans the arena for max
                  "batch_range": list(module.batch_range.as_tuple()) if module.batch_range is not None else None},
        "inputs": [{"shape": list(shape), "dtype": str(dtype)[6:]} for shape, dtype, _ in module._signature],
        "graph": graph,
        "int8": _int8_header(program.plan, enc),
        "report": {"model": report["model"], "layers_in": report["layers_in"],
                   "passes": enc(report["passes"]), "fusions": enc(report["fusions"])},
        "tensors": enc.tensors,
    }
    data = b"".join(enc.chunks)
    header["digest"] = _digest(header, data)
    blob = _canonical(header)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(blob)) + blob)
        f.write(data)
    os.replace(tmp, path)  # a reader never sees half a file


def _read(path: str | os.PathLike) -> tuple[dict, bytearray]:
    """The verified header and the tensor bytes; ValueError for anything but an intact engine file."""
    with open(path, "rb") as f:
        raw = bytearray(f.read())
    where = f"{os.fspath(path)} is not a torch_gie engine file"
    if raw[:len(MAGIC)] != MAGIC:
        raise ValueError(f"{where} (bad magic bytes; engine files come from torch_gie.save)")
    if len(raw) < len(MAGIC) + 8:
        raise ValueError(f"{where}: truncated")
    (length,) = struct.unpack_from("<Q", raw, len(MAGIC))
    start = len(MAGIC) + 8
    if start + length > len(raw):
        raise ValueError(f"{where}: truncated (the header claims {length} bytes, the file has {len(raw) - start})")
    try:
        header = json.loads(bytes(raw[start:start + length]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: malformed header ({exc}); the file is corrupted or modified") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{where}: the header names no {FORMAT} format")
    version, versions = header.get("format_version"), header.get("versions")
    if version != FORMAT_VERSION:
        built_by = versions.get("torch_gie") if isinstance(versions, dict) else None
        raise ValueError(f"{os.fspath(path)} was written in engine format version {version!r} (torch_gie "
                         f"{built_by}); this torch_gie {torch_gie.__version__} reads version {FORMAT_VERSION}: "
                         f"{_REBUILD}")
    data = raw[start + length:]
    try:
        end = max((int(t["offsets"][1]) for t in header["tensors"]), default=0)
        digest = _digest(header, data)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"{where}: malformed header ({type(exc).__name__}: {exc})") from exc
    if end != len(data):
        what = "truncated" if end > len(data) else "corrupted or modified (unexpected data size)"
        raise ValueError(f"{where}: {what}")
    if header.get("digest") != digest:
        raise ValueError(f"{os.fspath(path)}: the digest does not match: the engine file is corrupted or modified")
    here = _versions()
    for name in ("torch", "triton"):
        if isinstance(versions, dict) and versions.get(name) != here[name]:
            log.warning("torch_gie: %s was built with %s %s, this is %s %s; rebuild if it misbehaves",
                        os.fspath(path), name, versions.get(name), name, here[name])
    return header, data


def _describe(device: dict) -> str:
    if device.get("type") != "cuda":
        return str(device.get("type"))
    return f"GPU {device.get('gpu')} (compute capability {'.'.join(map(str, device.get('capability') or ()))})"


def _target_device(built: dict, device: torch.device | str | None) -> torch.device:
    """The device to load on; refuses a device of another kind, or another GPU than the build's."""
    device = torch.device(built["type"] if device is None else device)
    if device.type != built["type"]:
        raise ValueError(f"the engine was built for {_describe(built)} and cannot load on {device}: {_REBUILD}")
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"the engine was built for {_describe(built)} and this machine has no GPU: {_REBUILD}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    here = _device_info(device)
    if (built.get("gpu"), built.get("capability")) != (here["gpu"], here["capability"]):
        raise ValueError(f"the engine was built for {_describe(built)}, this is {_describe(here)}; kernel "
                         f"choices and compiled code are specific to a GPU: {_REBUILD}")
    return device


def _decode_graph(graph: dict, dec: Decoder) -> tuple[fx.GraphModule, dict[str, dict]]:
    g = fx.Graph()
    choices = {}
    for entry in graph["nodes"]:
        op, target = entry["op"], entry["target"]
        if op == "call_function":
            target = CANONICAL[target["canonical"]] if isinstance(target, dict) else resolve(target)
        elif op == "call_method" and not (isinstance(target, str) and allowed_name(target)
                                          and hasattr(torch.Tensor, target)):
            raise ValueError(f"method {target!r} is not in the allow-list of an engine file")
        elif op in ("get_attr",) and not all(part.isidentifier() for part in target.split(".")):
            raise ValueError(f"bad constant name {target!r}")
        elif op not in ("placeholder", "output", "get_attr", "call_method"):
            raise ValueError(f"node kind {op!r} cannot be loaded")
        args = dec(entry["args"])
        if target is getattr and not (len(args) == 2 and isinstance(args[1], str) and allowed_name(args[1])):
            raise ValueError("an engine file may read public attributes only (getattr)")
        node = g.create_node(op, target, args, {k: dec(v) for k, v in entry["kwargs"].items()}, name=entry["name"])
        if node.name != entry["name"]:
            raise ValueError(f"duplicate node name {entry['name']!r}")
        dec.nodes[node.name] = node
        if "kernel" in entry:
            choices[node.name] = dec(entry["kernel"])
    for entry in graph["nodes"]:  # meta may name later nodes (a concat slot names its cat)
        dec.nodes[entry["name"]].meta.update({k: dec(v) for k, v in entry["meta"].items() if k in _META_KEYS})
    constants = {name: dec(v) for name, v in graph["constants"].items()}
    return fx.GraphModule(constants, g, class_name="LoadedEngine"), choices


def _precision_plan(int8: dict, nodes: dict[str, fx.Node], dec: Decoder) -> tuple[PrecisionPlan, dict]:
    pp = PrecisionPlan(int8_layers={nodes[n] for n in int8["int8_layers"]},
                       classes={nodes[v]: nodes[r] for v, r in int8["classes"].items()},
                       int8_classes={nodes[n] for n in int8["int8_classes"]}, search=dec(int8["search"]))
    return pp, {nodes[r]: dec(qp) for r, qp in int8["qparams"].items()}


def load(path: str | os.PathLike, device: torch.device | str | None = None) -> GIEModule:
    """Rebuild the module ``save`` wrote, on ``device`` (default: the kind it was built for; a CUDA
    engine loads only on the GPU model it was built on). No tracing, calibration or tuning: the
    graph, int8 parameters and kernel configs come from the file. ValueError for a damaged,
    foreign or incompatible file. A ``batch_range`` engine loads as one again (its arena planned
    for max, its other batch sizes built on first use). ``torch_gie.OutOfMemoryError`` (naming the
    step) if it does not fit, with what it had allocated freed."""
    try:
        return _load(path, device)
    except OutOfMemoryError as exc:
        release_failed_build(exc)  # as compile does: nothing of the partial engine stays allocated
        raise


def _load(path: str | os.PathLike, device: torch.device | str | None) -> GIEModule:
    # The decoded weights and the partial engine are locals of this frame and the ones it calls,
    # which ``release_failed_build`` clears when the load runs out of memory.
    start = time.perf_counter()
    header, data = _read(path)
    try:
        device = _target_device(header["device"], device)
        build = header["build"]
        backend = _resolve_backend(build["backend"], device)
        dec = Decoder(header["tensors"], data, device)
        options = {k: dec(v) for k, v in build["options"].items()}
        gm, choices = _decode_graph(header["graph"], dec)
        precision, qparams = None, {}
        if header["int8"] is not None:
            precision, qparams = _precision_plan(header["int8"], dec.nodes, dec)
        inputs = tuple(torch.zeros(i["shape"], dtype=DTYPES[i["dtype"]], device=device) for i in header["inputs"])
        batch = BatchRange.parse(tuple(build["batch_range"])) if build.get("batch_range") is not None else None
        meta_report = header["report"]
        passes = dec(meta_report["passes"])
        fusions = dec(meta_report["fusions"])
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"{os.fspath(path)}: malformed engine header ({type(exc).__name__}: {exc})") from exc
    decoded = time.perf_counter()
    program, plan = _build(gm, header, inputs, device, backend, options, precision, qparams, choices, batch)
    results = [PassResult(p["name"], {k: v for k, v in p.items() if k not in ("name", "ms")},
                          [f for f in fusions if f.get("pass") == p["name"]], p["ms"] / 1e3) for p in passes]
    report = build_report(model=meta_report["model"], layers_in=meta_report["layers_in"], results=results, gm=gm,
                          plan=plan, steps=program.steps, precision=build["precision"], backend=backend,
                          device=str(device), batch_range=batch)
    report["loaded_from"] = os.fspath(path)
    report["engine"] = {"format_version": header["format_version"], "built_with": header["versions"]}
    log.info("torch_gie: loaded %s from %s in %.2f s (reading, checking and decoding %.2f s, building "
             "%.2f s)", report["model"], os.fspath(path), time.perf_counter() - start, decoded - start,
             time.perf_counter() - decoded)
    return GIEModule(program, inputs, report, static_outputs=build["static_outputs"], options=options,
                     batch_range=batch)


def _build(gm, header: dict, inputs, device, backend: str, options: dict, precision, qparams, choices, batch):
    """Plan and build as ``compile`` does, with the saved configs instead of a tuner."""
    build = header["build"]
    batching = check_batch_polymorphic(gm, inputs, batch) if batch is not None else None
    streams = options.get("streams", True) and device.type == "cuda" and options.get("cuda_graph", True)
    plan = plan_for(gm, DTYPES[build["plan_dtype"]], streams, batching, batch, precision)
    plan.qparams = qparams  # node.meta["quant"] came with the graph: no calibration
    program = build_engine(gm, plan, inputs, device, backend, options, batch_range=batch, batching=batching,
                           configure=lambda p, fallback: _apply_kernel_choices(p, choices, fallback))
    return program, plan



def _apply_kernel_choices(program, choices: dict[str, dict], fallback) -> None:
    """Each kernel step as it was built: the same backend (a layer that fell back to PyTorch at
    build time does so again) and the same config."""
    for step in program.steps:
        choice = choices.get(step.name) if isinstance(step, KernelStep) else None
        if choice is None:
            continue
        if choice["backend"] == "reference" and step.backend != "reference" and fallback is not None:
            step.kernel, step.backend = fallback(step.node), "reference"
        layer = getattr(step.kernel, "layer", None)
        if "config" in choice and layer is not None and hasattr(layer, "config"):
            try:
                layer.config = choice["config"]
            except ValueError as exc:
                raise ValueError(f"the saved kernel config of layer {step.name} is not valid for this torch_gie "
                                 f"({exc}): {_REBUILD}") from exc
