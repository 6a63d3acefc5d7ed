"""The rewrite pipeline: one literal, ordered list of passes, and the runner that applies it.

The runner (not each pass) lints the graph after every step, times it, names the result, and on
request writes the graph after each step to ``dump_dir`` as ``NN-name.txt``.
"""
from __future__ import annotations

import logging
import os
import time

from torch import fx

from ..errors import CompileError
from .base import PassContext, PassResult
from .eliminate_concat import eliminate_concat
from .eliminate_dead_code import eliminate_dead_code
from .fold_batchnorm import fold_batchnorm
from .fold_gate_into_conv import fold_gate_into_conv
from .fold_padding import fold_padding
from .fuse_activation_patterns import fuse_activation_patterns
from .fuse_channel_shuffle import fuse_channel_shuffle
from .fuse_conv_epilogue import fuse_conv_epilogue
from .fuse_elementwise_activation import fuse_elementwise_activation
from .fuse_squeeze_excitation import fuse_squeeze_excitation
from .merge_sibling_convs import merge_sibling_convs
from .remove_identity import remove_identity
from .sink_channel_permutes import sink_channel_permutes

log = logging.getLogger(__name__)

PIPELINE = [
    remove_identity,               # first: Dropout/Identity/contiguous would hide adjacency
    fold_padding,                  # zero pads into the conv/pool after them
    sink_channel_permutes,         # before folding: ConvNeXt's Linears become 1x1 convs a scale can fold into
    fold_batchnorm,                # before epilogue fusion: the BN sits between conv and its activation
    fuse_activation_patterns,      # before epilogue fusion: x * sigmoid(x) is then a SiLU a conv absorbs
    fuse_conv_epilogue,            # after folding: conv -> act -> add -> act chains are now adjacent
    fuse_elementwise_activation,   # leftovers: unfoldable BN + act, add + act, mul + act
    fuse_squeeze_excitation,       # after epilogue fusion: the SE's layers carry their activations
    fold_gate_into_conv,           # after SE fusion: the gate multiply goes into the next conv's loads
    fuse_channel_shuffle,          # before concat elimination: a shuffled cat becomes an interleaved one
    merge_sibling_convs,           # after vertical fusion: siblings merge only with equal epilogues
    eliminate_dead_code,
    eliminate_concat,              # last: places producers (merged segments too) into concat slots
]

__all__ = ["PIPELINE", "PassContext", "PassResult", "run_passes"]


def run_passes(gm: fx.GraphModule, ctx: PassContext | None = None) -> list[PassResult]:
    ctx = ctx or PassContext()
    results = []
    if ctx.dump_dir:
        os.makedirs(ctx.dump_dir, exist_ok=True)
        _dump(gm, ctx.dump_dir, "00-captured")
    for i, rewrite in enumerate(PIPELINE, start=1):
        name = rewrite.__name__
        if name in ctx.disabled:
            continue
        start = time.perf_counter()
        try:
            result = rewrite(gm, ctx)
            gm.graph.lint()
        except Exception as exc:  # a bug in a rewrite must say where, not surface as a raw error
            raise CompileError(f"rewrite pass {name} failed: {type(exc).__name__}: {exc}. "
                               f"Compiling with disable_passes=['{name}'] skips it.") from exc
        result.name = name
        for f in result.fusions:
            f["pass"] = name
        result.seconds = time.perf_counter() - start
        results.append(result)
        log.debug("%s: %s (%.1f ms)", name, result.counts, 1e3 * result.seconds)
        if ctx.dump_dir:
            _dump(gm, ctx.dump_dir, f"{i:02d}-{name}")
    gm.recompile()
    return results


def _dump(gm: fx.GraphModule, folder: str, stem: str) -> None:
    with open(os.path.join(folder, stem + ".txt"), "w") as f:
        f.write(str(gm.graph))
