"""torch_gie: an ahead-of-time inference compiler for PyTorch.

``torch_gie.compile(model, example_inputs, precision="fp16")`` captures the model with torch.fx,
fuses it (BatchNorm folding, conv+bias+activation+residual, sibling 1x1 merging, concat
elimination), plans one activation arena and lowers every fused op to a Triton kernel; the
result is a drop-in ``nn.Module``; ``torch_gie.save``/``torch_gie.load`` write and read it as an
engine file. ``torch_gie.explain`` reports the same without building.
"""
from .compiler import compile, explain
from .errors import CompileError, OutOfMemoryError
from .report import format_report
from .runtime.module import GIEModule
from .serialize import load, save

__version__ = "0.1.0"
__all__ = ["compile", "explain", "CompileError", "OutOfMemoryError", "GIEModule", "format_report", "save", "load",
           "__version__"]
