"""The calibration cache, like TensorRT's: a JSON file of calibrated ranges so that rebuilding an
int8 engine skips the calibration run. It records each tensor's range (lo, hi, non_negative),
from which its QParams re-derive, the calibrator that chose them, and a fingerprint of the graph
they belong to; a cache written for another graph or by another format version is refused.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from torch_gie.quantize.arith import QParams
from torch_gie.quantize.calibrators import TensorRange

CACHE_FORMAT = "torch_gie calibration cache"
CACHE_VERSION = 1

_HOW_TO_FIX = "delete the file to recalibrate, or pass another calibration_cache path"


def graph_fingerprint(names_and_shapes: Iterable[tuple[str, tuple]]) -> str:
    """A short hash of the calibrated tensors' names and shapes, in graph order: a cache is valid
    only for the graph structure it was calibrated on."""
    canonical = [[str(name), [int(d) if isinstance(d, int) else str(d) for d in shape]]
                 for name, shape in names_and_shapes]
    digest = hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()
    return digest[:16]


def _as_range(name: str, value: QParams | tuple) -> TensorRange:
    if isinstance(value, QParams):
        return TensorRange(*value.real_range, value.unsigned)
    if isinstance(value, tuple) and len(value) == 3:
        lo, hi, non_negative = value
        return TensorRange(float(lo), float(hi), bool(non_negative))
    raise TypeError(f"range of {name!r}: expected QParams or (lo, hi, non_negative), got {value!r}")


def save_calibration_cache(path: str | os.PathLike, ranges: Mapping[str, QParams | tuple],
                           fingerprint: str, calibrator: str) -> None:
    """Write the cache atomically (a temporary file renamed over ``path``), so an interrupted
    write never leaves a half file that the next build would refuse."""
    tensors = {}
    for name, value in ranges.items():
        r = _as_range(name, value)
        qp = r.qparams()
        # scale and zero_point are for people reading the file; loading re-derives them.
        tensors[name] = {"lo": r.lo, "hi": r.hi, "non_negative": r.non_negative,
                         "scale": qp.scale, "zero_point": qp.zero_point}
    doc = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "fingerprint": fingerprint,
           "calibrator": calibrator, "tensors": tensors}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _entry(path: Path, name: str, entry: object) -> TensorRange:
    bad = f"calibration cache {path}: tensor {name!r} has a malformed entry {entry!r}; {_HOW_TO_FIX}"
    if not isinstance(entry, dict):
        raise ValueError(bad)
    lo, hi, non_negative = entry.get("lo"), entry.get("hi"), entry.get("non_negative")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (lo, hi))
    if not numbers or not isinstance(non_negative, bool) or lo > hi or (non_negative and lo < 0):
        raise ValueError(bad)
    return TensorRange(float(lo), float(hi), non_negative)


def load_calibration_cache(path: str | os.PathLike, fingerprint: str, *,
                           expected_names: Iterable[str] | None = None,
                           calibrator: str | None = None) -> dict[str, TensorRange]:
    """The ranges of a cache written for the graph ``fingerprint`` identifies, by tensor name
    (``TensorRange(...).qparams()`` gives the QParams). ValueError, saying what differs and how
    to fix it, for a malformed file, another version, another fingerprint (``expected_names``,
    when given, lets the message list the tensors that differ) or, when ``calibrator`` is given,
    a cache written by another calibrator."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"calibration cache {path} is not valid JSON ({err}); {_HOW_TO_FIX}") from None
    if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not a torch_gie calibration cache (no format field "
                         f"{CACHE_FORMAT!r}); {_HOW_TO_FIX}")
    if doc.get("version") != CACHE_VERSION:
        raise ValueError(f"calibration cache {path} has version {doc.get('version')!r}, this torch_gie "
                         f"reads version {CACHE_VERSION}; {_HOW_TO_FIX}")
    tensors = doc.get("tensors")
    if not isinstance(tensors, dict) or not isinstance(doc.get("fingerprint"), str):
        raise ValueError(f"calibration cache {path} lacks its 'tensors' or 'fingerprint' field; {_HOW_TO_FIX}")
    if doc["fingerprint"] != fingerprint:
        detail = ""
        if expected_names is not None:
            expected = set(expected_names)
            missing, extra = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
            detail = f" (tensors not in the cache: {missing[:5]}; in the cache only: {extra[:5]})"
        raise ValueError(f"calibration cache {path} was written for another graph: fingerprint "
                         f"{doc['fingerprint']!r}, this model's is {fingerprint!r}{detail}; {_HOW_TO_FIX}")
    if calibrator is not None and doc.get("calibrator") != calibrator:
        raise ValueError(f"calibration cache {path} was written by the {doc.get('calibrator')!r} calibrator, "
                         f"this build asks for {calibrator!r}; {_HOW_TO_FIX}")
    return {name: _entry(path, name, entry) for name, entry in tensors.items()}
