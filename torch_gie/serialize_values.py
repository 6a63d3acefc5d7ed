"""How an engine file's JSON header names values without naming code: tensors as references
into the file's tensor table, dtypes and memory formats by name, spec dataclasses from a fixed
table (``torch_gie.ops``, ``activations``, ``quantize.arith``), and what a graph node runs as a
canonical op or a function found by name in an allow-list of torch/operator/math namespaces
(``target_of`` refuses anything else at save time). Used by ``torch_gie.serialize``.
"""
from __future__ import annotations

import dataclasses
import keyword
import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from . import activations, ops
from .graph import is_canonical
from .quantize import arith

ALIGN = 64  # bytes: every tensor's offset in the data region

DTYPES = {str(d)[6:]: d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8,
                                    torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)}
MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last,
                   "preserve_format": torch.preserve_format}
# Spec classes by name: the only classes a file can construct.
DATACLASSES = {name: cls for mod in (ops, activations, arith) for name, cls in vars(mod).items()
                if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == mod.__name__}
CANONICAL = {fn.__name__: fn for fn in ops.CANONICAL_OPS}
# Namespaces a fallback's function may come from, and names in them that touch files, global
# state or call other callables: a file may run PyTorch math, never I/O.
NAMESPACES = {"torch": torch, "torch.nn.functional": F, "torch.Tensor": torch.Tensor, "operator": operator,
               "math": math, "builtins": {"getattr": getattr, "len": len}}
_DENIED = {"load", "save", "from_file", "compile", "attrgetter", "itemgetter", "methodcaller", "call", "numpy",
           "tofile", "storage", "untyped_storage", "share_memory_", "register_hook", "apply_", "map_", "map2_",
           "manual_seed", "seed", "use_deterministic_algorithms"}
_ALLOWED_PRIVATE = {"_assert"}


def allowed_name(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name) and name not in _DENIED and \
        not name.startswith("set_") and (not name.startswith("_") or name in _ALLOWED_PRIVATE)


def qualified_name(fn: Any) -> str | None:
    """``namespace.name`` of an allow-listed function, or None."""
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or not allowed_name(name):
        return None
    for ns_name, ns in NAMESPACES.items():
        found = ns.get(name) if isinstance(ns, dict) else getattr(ns, name, None)
        if found is fn:
            return f"{ns_name}.{name}"
    return None


def resolve(qualname: str) -> Any:
    ns_name, _, name = qualname.rpartition(".")
    ns = NAMESPACES.get(ns_name)
    if ns is None or not allowed_name(name):
        raise ValueError(f"function {qualname!r} is not in the allow-list of an engine file")
    fn = ns.get(name) if isinstance(ns, dict) else getattr(ns, name, None)
    if fn is None or not callable(fn) or isinstance(fn, type):
        raise ValueError(f"function {qualname!r} is not in the allow-list of an engine file")
    return fn


class Encoder:
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
        if name not in DTYPES:
            raise ValueError(f"tensors of dtype {t.dtype} cannot be saved")
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        pad = -self.size % ALIGN
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
        if dataclasses.is_dataclass(v) and DATACLASSES.get(type(v).__name__) is type(v):
            return {"$dc": type(v).__name__,
                    "fields": {f.name: self(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}}
        raise ValueError(f"a value of type {type(v).__name__} cannot be saved")


class Decoder:
    """JSON -> Python values; tensors from the byte table on ``device``; nodes by name."""

    def __init__(self, table: list[dict], data: bytearray, device: torch.device) -> None:
        self.table, self.data, self.device = table, data, device
        self.nodes: dict[str, fx.Node] = {}
        self._tensors: dict[int, torch.Tensor] = {}

    def tensor(self, i: int) -> torch.Tensor:
        if i not in self._tensors:
            entry = self.table[i]
            dtype, shape = DTYPES[entry["dtype"]], [int(s) for s in entry["shape"]]
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
            return DTYPES[body]
        if tag == "$device":
            return torch.device(body)
        if tag == "$memory_format":
            return MEMORY_FORMATS[body]
        if tag == "$slice":
            return slice(*(self(x) for x in body))
        if tag == "$ellipsis":
            return Ellipsis
        if tag == "$dc":
            return DATACLASSES[body](**{k: self(x) for k, x in v["fields"].items()})
        raise ValueError(f"unknown value tag {tag!r}")


def target_of(node: fx.Node, gm: fx.GraphModule) -> Any:
    """How a file names what a node runs; a ValueError when it would need the model's Python code."""
    if node.op in ("placeholder", "output", "get_attr"):
        return node.target
    if node.op == "call_function":
        if is_canonical(node):
            return {"canonical": node.target.__name__}
        qualname = qualified_name(node.target)
        if qualname is not None:
            return qualname
        what = getattr(node.target, "__qualname__", repr(node.target))
    elif node.op == "call_method" and allowed_name(node.target) and hasattr(torch.Tensor, node.target):
        return node.target
    elif node.op == "call_module":
        what = f"{node.target}: a {type(gm.get_submodule(node.target)).__name__} module object"
    else:
        what = str(node.target)
    raise ValueError(f"node {node.name} ({node.op} {what}) cannot be saved: the engine file stores no Python "
                     "code, only canonical ops and torch/torch.nn.functional/operator/math functions; write that "
                     "part of the model with those (e.g. F.pixel_shuffle for nn.PixelShuffle) and compile again")
