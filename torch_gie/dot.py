"""Graphviz view of an optimized graph: one box per launch (fused ops show what they absorbed),
concat slots drawn as the buffer they write into; SVG when the ``dot`` program is installed."""
from __future__ import annotations

import shutil
import subprocess

from torch import fx

from . import ops
from .graph import is_canonical, is_fallback_compute, spec

_COLORS = {"conv2d": "#cfe2ff", "linear": "#d1e7dd", "pool2d": "#fff3cd", "cat": "#e2e3e5"}


def _label(node: fx.Node) -> str:
    if is_canonical(node):
        s = spec(node)
        text = node.target.__name__
        if node.target is ops.conv2d:
            k = tuple(s.weight.shape[2:])
            text += f" {k[0]}x{k[1]}/{s.stride[0]} {s.weight.shape[1] * s.groups}->{s.out_channels}"
            if s.out_splits:
                text += f" merged {list(s.out_splits)}"
        ep = getattr(s, "epilogue", None)
        if ep is not None and not ep.is_empty:
            text += f"\\n{ep.describe()}"
        if "slot" in node.meta:
            parent, off, _ = node.meta["slot"]
            text += f"\\n-> {parent.name}[{off}:]"
        return f"{node.name}\\n{text}"
    return f"{node.name}\\n{node.target if node.op != 'call_module' else node.target}"


def to_dot(gm: fx.GraphModule) -> str:
    lines = ["digraph torch_gie {", "  rankdir=TB; node [shape=box, style=filled, fontname=Helvetica];"]
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        color = "#f8d7da" if is_fallback_compute(node) else \
            _COLORS.get(getattr(node.target, "__name__", ""), "#ffffff")
        lines.append(f'  "{node.name}" [label="{_label(node)}", fillcolor="{color}"];')
        for inp in node.all_input_nodes:
            if inp.op != "get_attr":
                lines.append(f'  "{inp.name}" -> "{node.name}";')
    lines.append("}")
    return "\n".join(lines)


def write_dot(gm: fx.GraphModule, path: str) -> str:
    """Write ``path`` (.dot); if ``dot`` is installed also ``path`` with .svg. Returns the last written."""
    with open(path, "w") as f:
        f.write(to_dot(gm))
    if shutil.which("dot"):
        svg = path.rsplit(".", 1)[0] + ".svg"
        subprocess.run(["dot", "-Tsvg", path, "-o", svg], check=True)
        return svg
    return path
