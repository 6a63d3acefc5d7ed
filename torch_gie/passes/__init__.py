"""The rewrite pipeline: one literal, ordered list of passes, and the runner that applies it.

The runner (not each pass) lints the graph after every step, times it, names the result, and on
request writes the graph after each step to ``dump_dir`` as ``NN-name.txt``.
"""
from __future__ import annotations

import logging
import os
import time

from torch import fx

from .base import PassContext, PassResult
from .eliminate_concat import eliminate_concat
from .eliminate_dead_code import eliminate_dead_code
from .fold_batchnorm import fold_batchnorm
from .fuse_conv_epilogue import fuse_conv_epilogue
from .fuse_elementwise_activation import fuse_elementwise_activation
from .merge_sibling_convs import merge_sibling_convs
from .remove_identity import remove_identity

log = logging.getLogger(__name__)

PIPELINE = [
    remove_identity,               # first: Dropout/Identity would hide conv -> bn adjacency
    fold_batchnorm,                # before epilogue fusion: the BN sits between conv and its activation
    fuse_conv_epilogue,            # after folding: conv -> act -> add -> act chains are now adjacent
    fuse_elementwise_activation,   # leftovers: unfoldable BN + act, add + act
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
        result = rewrite(gm, ctx)
        gm.graph.lint()
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
