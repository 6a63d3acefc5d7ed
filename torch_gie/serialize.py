"""Engine files: ``save`` writes a compiled module (its optimized graph, specs, int8 parameters and
chosen kernel configs) and ``load`` rebuilds it without the model's Python code and without pickle.

Layout (like safetensors): ``MAGIC`` (8 bytes), the header length (8 bytes, little-endian), a JSON
header, then the raw tensor bytes the header's ``tensors`` table points into. The header's
``digest`` is the sha256 of the header without it (canonical JSON) followed by the tensor bytes.
Nothing in a file names Python code: graph targets are canonical ops, or functions looked up by
name in an allow-list of torch/operator/math namespaces; spec classes come from a fixed table.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import keyword
import logging
import math
import operator
import os
import struct
from importlib import metadata
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

import torch_gie

from . import activations, ops
from .compiler import _lowering, _resolve_backend
from .graph import is_canonical
from .passes import PassResult
from .plan import make_plan
from .plan.precision import PrecisionPlan
from .quantize import arith
from .report import build_report
from .runtime.module import GIEModule
from .runtime.program import build_program
from .runtime.steps import KernelStep

log = logging.getLogger("torch_gie")

MAGIC = b"TGIEENG\x00"
FORMAT = "torch_gie.engine"
FORMAT_VERSION = 1
_ALIGN = 64
_META_KEYS = ("shape", "dtype", "spec", "slot", "segment_of", "cat_copies", "source", "fallback_reason",
              "tensor_valued", "quant")
_SAVED_OPTIONS = ("cuda_graph", "streams", "fp32_precision", "tune", "disable_passes")
_REBUILD = "rebuild it on this machine: torch_gie.compile(model, example_inputs, ...) then torch_gie.save"

_DTYPES = {str(d)[6:]: d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8,
                                    torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)}
_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last,
                   "preserve_format": torch.preserve_format}
# Spec classes by name: the only classes a file can construct.
_DATACLASSES = {name: cls for mod in (ops, activations, arith) for name, cls in vars(mod).items()
                if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == mod.__name__}
_CANONICAL = {fn.__name__: fn for fn in ops.CANONICAL_OPS}
# Namespaces a fallback's function may come from, and names in them that touch files, global
# state or call other callables: a file may run PyTorch math, never I/O.
_NAMESPACES = {"torch": torch, "torch.nn.functional": F, "torch.Tensor": torch.Tensor, "operator": operator,
               "math": math, "builtins": {"getattr": getattr, "len": len}}
_DENIED = {"load", "save", "from_file", "compile", "attrgetter", "itemgetter", "methodcaller", "call", "numpy",
           "tofile", "storage", "untyped_storage", "share_memory_", "register_hook", "apply_", "map_", "map2_",
           "manual_seed", "seed", "use_deterministic_algorithms"}
_ALLOWED_PRIVATE = {"_assert"}


def _allowed_name(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name) and name not in _DENIED and \
        not name.startswith("set_") and (not name.startswith("_") or name in _ALLOWED_PRIVATE)


def _qualified_name(fn: Any) -> str | None:
    """``namespace.name`` of an allow-listed function, or None."""
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or not _allowed_name(name):
        return None
    for ns_name, ns in _NAMESPACES.items():
        found = ns.get(name) if isinstance(ns, dict) else getattr(ns, name, None)
        if found is fn:
            return f"{ns_name}.{name}"
    return None


def _resolve(qualname: str) -> Any:
    ns_name, _, name = qualname.rpartition(".")
    ns = _NAMESPACES.get(ns_name)
    if ns is None or not _allowed_name(name):
        raise ValueError(f"function {qualname!r} is not in the allow-list of an engine file")
    fn = ns.get(name) if isinstance(ns, dict) else getattr(ns, name, None)
    if fn is None or not callable(fn) or isinstance(fn, type):
        raise ValueError(f"function {qualname!r} is not in the allow-list of an engine file")
    return fn


class _Encoder:
    """Python values of a graph -> JSON, tensors into a byte table (shared tensors stored once)."""

    def __init__(self) -> None:
        self.tensors: list[dict] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self._ids: dict[int, int] = {}
        self._keep: list[torch.Tensor] = []  # ids stay valid while we hold the tensors

    def tensor(self, t: torch.Tensor) -> int:
        if id(t) in self._ids:
            return self._ids[id(t)]
        name = str(t.dtype)[6:]
        if name not in _DTYPES:
            raise ValueError(f"tensors of dtype {t.dtype} cannot be saved")
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        pad = -self.size % _ALIGN
        self.chunks.append(b"\0" * pad + data)
        begin = self.size + pad
        self.size = begin + len(data)
        self.tensors.append({"dtype": name, "shape": list(t.shape), "offsets": [begin, self.size]})
        self._ids[id(t)] = len(self.tensors) - 1
        self._keep.append(t)
        return self._ids[id(t)]

    def __call__(self, v: Any) -> Any:
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else {"$float": repr(v)}
        if isinstance(v, fx.Node):
            return {"$node": v.name}
        if isinstance(v, torch.Tensor):
            return {"$tensor": self.tensor(v)}
        if isinstance(v, torch.dtype):
            return {"$dtype": str(v)[6:]}
        if isinstance(v, torch.device):
            return {"$device": str(v)}
        if isinstance(v, torch.memory_format):
            return {"$memory_format": str(v)[6:]}
        if isinstance(v, slice):
            return {"$slice": [self(v.start), self(v.stop), self(v.step)]}
        if v is Ellipsis:
            return {"$ellipsis": None}
        if isinstance(v, tuple):  # torch.Size too
            return {"$tuple": [self(x) for x in v]}
        if isinstance(v, list):
            return [self(x) for x in v]
        if isinstance(v, dict):
            return {"$dict": [[self(k), self(x)] for k, x in v.items()]}
        if dataclasses.is_dataclass(v) and _DATACLASSES.get(type(v).__name__) is type(v):
            return {"$dc": type(v).__name__,
                    "fields": {f.name: self(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}}
        raise ValueError(f"a value of type {type(v).__name__} cannot be saved")


class _Decoder:
    """JSON -> Python values; tensors from the byte table on ``device``; nodes by name."""

    def __init__(self, table: list[dict], data: bytearray, device: torch.device) -> None:
        self.table, self.data, self.device = table, data, device
        self.nodes: dict[str, fx.Node] = {}
        self._tensors: dict[int, torch.Tensor] = {}

    def tensor(self, i: int) -> torch.Tensor:
        if i not in self._tensors:
            entry = self.table[i]
            dtype, shape = _DTYPES[entry["dtype"]], [int(s) for s in entry["shape"]]
            begin, end = (int(o) for o in entry["offsets"])
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if min(shape, default=0) < 0 or not 0 <= begin <= end <= len(self.data) or end - begin != nbytes:
                raise ValueError(f"tensor {i} lies outside the data region")
            raw = torch.frombuffer(self.data, dtype=torch.uint8, count=nbytes, offset=begin).clone() \
                if nbytes else torch.empty(0, dtype=torch.uint8)
            self._tensors[i] = raw.view(dtype).reshape(shape).to(self.device)
        return self._tensors[i]

    def __call__(self, v: Any) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, list):
            return [self(x) for x in v]
        if not isinstance(v, dict) or len(v) not in (1, 2):
            raise ValueError(f"unexpected value {str(v)[:80]}")
        tag = next(iter(v))
        body = v[tag]
        if tag == "$node":
            return self.nodes[body]
        if tag == "$tensor":
            return self.tensor(body)
        if tag == "$tuple":
            return tuple(self(x) for x in body)
        if tag == "$dict":
            return {self(k): self(x) for k, x in body}
        if tag == "$float":
            return float(body)  # "nan", "inf", "-inf"
        if tag == "$dtype":
            return _DTYPES[body]
        if tag == "$device":
            return torch.device(body)
        if tag == "$memory_format":
            return _MEMORY_FORMATS[body]
        if tag == "$slice":
            return slice(*(self(x) for x in body))
        if tag == "$ellipsis":
            return Ellipsis
        if tag == "$dc":
            return _DATACLASSES[body](**{k: self(x) for k, x in v["fields"].items()})
        raise ValueError(f"unknown value tag {tag!r}")


def _target(node: fx.Node, gm: fx.GraphModule) -> Any:
    """How a file names what a node runs; a ValueError when it would need the model's Python code."""
    if node.op in ("placeholder", "output", "get_attr"):
        return node.target
    if node.op == "call_function":
        if is_canonical(node):
            return {"canonical": node.target.__name__}
        qualname = _qualified_name(node.target)
        if qualname is not None:
            return qualname
        what = getattr(node.target, "__qualname__", repr(node.target))
    elif node.op == "call_method" and _allowed_name(node.target) and hasattr(torch.Tensor, node.target):
        return node.target
    elif node.op == "call_module":
        what = f"{node.target}: a {type(gm.get_submodule(node.target)).__name__} module object"
    else:
        what = str(node.target)
    raise ValueError(f"node {node.name} ({node.op} {what}) cannot be saved: the engine file stores no Python "
                     "code, only canonical ops and torch/torch.nn.functional/operator/math functions; write that "
                     "part of the model with those (e.g. F.pixel_shuffle for nn.PixelShuffle) and compile again")


def _encode_graph(gm: fx.GraphModule, enc: _Encoder, configs: dict[str, dict]) -> dict:
    nodes, constants = [], {}
    for node in gm.graph.nodes:
        entry = {"name": node.name, "op": node.op, "target": _target(node, gm),
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


def _int8_header(plan, enc: _Encoder) -> dict | None:
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
    enc = _Encoder()
    graph = _encode_graph(program.gm, enc, _kernel_choices(program))
    options = getattr(module, "build_options", {})
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "versions": _versions(),
        "device": _device_info(program.arena.device),
        "build": {"precision": report["precision"], "backend": report["backend"],
                  "plan_dtype": str(program.plan.dtype)[6:], "static_outputs": module.static_outputs,
                  "options": {k: enc(options[k]) for k in _SAVED_OPTIONS if k in options}},
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


def _decode_graph(graph: dict, dec: _Decoder) -> tuple[fx.GraphModule, dict[str, dict]]:
    g = fx.Graph()
    choices = {}
    for entry in graph["nodes"]:
        op, target = entry["op"], entry["target"]
        if op == "call_function":
            target = _CANONICAL[target["canonical"]] if isinstance(target, dict) else _resolve(target)
        elif op == "call_method" and not (isinstance(target, str) and _allowed_name(target)
                                          and hasattr(torch.Tensor, target)):
            raise ValueError(f"method {target!r} is not in the allow-list of an engine file")
        elif op in ("get_attr",) and not all(part.isidentifier() for part in target.split(".")):
            raise ValueError(f"bad constant name {target!r}")
        elif op not in ("placeholder", "output", "get_attr", "call_method"):
            raise ValueError(f"node kind {op!r} cannot be loaded")
        args = dec(entry["args"])
        if target is getattr and not (len(args) == 2 and isinstance(args[1], str) and _allowed_name(args[1])):
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


def _precision_plan(int8: dict, nodes: dict[str, fx.Node], dec: _Decoder) -> tuple[PrecisionPlan, dict]:
    pp = PrecisionPlan(int8_layers={nodes[n] for n in int8["int8_layers"]},
                       classes={nodes[v]: nodes[r] for v, r in int8["classes"].items()},
                       int8_classes={nodes[n] for n in int8["int8_classes"]}, search=dec(int8["search"]))
    return pp, {nodes[r]: dec(qp) for r, qp in int8["qparams"].items()}


def load(path: str | os.PathLike, device: torch.device | str | None = None) -> GIEModule:
    """Rebuild the module ``save`` wrote, on ``device`` (default: the kind it was built for; a CUDA
    engine loads only on the GPU model it was built on). No tracing, calibration or tuning: the
    graph, int8 parameters and kernel configs come from the file. ValueError for a damaged,
    foreign or incompatible file."""
    header, data = _read(path)
    try:
        device = _target_device(header["device"], device)
        build = header["build"]
        backend = _resolve_backend(build["backend"], device)
        dec = _Decoder(header["tensors"], data, device)
        options = {k: dec(v) for k, v in build["options"].items()}
        gm, choices = _decode_graph(header["graph"], dec)
        precision, qparams = None, {}
        if header["int8"] is not None:
            precision, qparams = _precision_plan(header["int8"], dec.nodes, dec)
        inputs = tuple(torch.zeros(i["shape"], dtype=_DTYPES[i["dtype"]], device=device) for i in header["inputs"])
        meta_report = header["report"]
        passes = dec(meta_report["passes"])
        fusions = dec(meta_report["fusions"])
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"{os.fspath(path)}: malformed engine header ({type(exc).__name__}: {exc})") from exc
    streams = options.get("streams", True) and device.type == "cuda" and options.get("cuda_graph", True)
    plan = make_plan(gm, _DTYPES[build["plan_dtype"]], streams=streams, precision=precision)
    plan.qparams = qparams  # node.meta["quant"] came with the graph: no calibration
    lowering, fallback, converters = _lowering(backend, plan, device, options)
    program = build_program(gm, plan, lowering, backend, device, fallback, converters)
    _apply_kernel_choices(program, choices, fallback)
    with torch.no_grad():  # as compile does, with the saved configs instead of a tuner
        program._load_inputs(inputs)
        program.warm_up(fallback)
        if device.type == "cuda" and options.get("cuda_graph", True):
            program.capture_cuda_graph()
    results = [PassResult(p["name"], {k: v for k, v in p.items() if k not in ("name", "ms")},
                          [f for f in fusions if f.get("pass") == p["name"]], p["ms"] / 1e3) for p in passes]
    report = build_report(model=meta_report["model"], layers_in=meta_report["layers_in"], results=results, gm=gm,
                          plan=plan, steps=program.steps, precision=build["precision"], backend=backend,
                          device=str(device))
    report["loaded_from"] = os.fspath(path)
    report["engine"] = {"format_version": header["format_version"], "built_with": header["versions"]}
    log.info("torch_gie: loaded %s from %s", report["model"], os.fspath(path))
    return GIEModule(program, inputs, report, static_outputs=build["static_outputs"], options=options)



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
