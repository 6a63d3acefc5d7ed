"""Tilings for the implicit-GEMM conv kernel (``conv2d.py``): the candidates the tuner times and
the untuned default, from the layer's channel counts, taps and (when known) output pixels.

Config keys: BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, and optionally FLAT_K (one runtime
loop over (tap, channel block)), GATHER_K / FOLD_KW (few input channels: K gathered across taps,
or kw folded into c on NHWC input), SPLIT_K (programs per output tile summing shares of K),
GROUPS_PER_TILE (grouped convs: that many consecutive groups form one block-diagonal
"super-group" GEMM, see ``conv2d_weights.py``; at most groups, the last super-group partial
when it does not divide them).

int8 layers get the fp16 tilings with BLOCK_K doubled where the channels allow it (the same
bytes per tile: half the element size; not for split-K or kw-folding tilings) and never under
INT8_MIN_BLOCK_K, the smallest K of an int8 ``tl.dot`` on NVIDIA GPUs (the interpreter does not
check it).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import triton

CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
# Optional keys FLAT_K (default False): run (tap, channel block) as one loop; GATHER_K (default
# False): for convs with few input channels (a 7x7 stem on RGB), where per-tap channel blocks
# would be mostly padding: on dense NHWC input (and dilation_w 1) the KW*C_in_g values of one
# kernel row are contiguous in memory and are loaded as one run per kh ("fold kw into c");
# otherwise the flattened K is gathered element by element. SPLIT_K (default 1, a power of two):
# that many programs per output tile each sum a share of the K loop into an fp32 workspace,
# and a second kernel adds the shares and runs the epilogue. PREFETCH_RES (default True): a
# residual epilogue over a short K loop (at most conv2d.PREFETCH_RESIDUAL_MAX_STEPS steps) loads
# its residual tile before the loop; False loads it after (``residual_twins``).
GATHER_BELOW = 16  # C_in_g under this gathers K across taps
# Split-K pays only when the output tiles leave SMs idle (batch 1, late ResNet stages).
NUM_SMS = 132  # H100 SXM: the heuristic aims at about one program per SM
SPLIT_K_MIN_K = 1024  # shorter K loops gain too little from splitting to pay for the reduction
MAX_SPLIT_K = 16
MIN_SPLIT_ITERS = 4  # K iterations each split keeps, so its loads still pipeline
BIG_TILE_MIN_M = 1 << 17  # output pixels from which 256-wide tiles are worth a tuning slot
# Super-groups: groups per tile are offered while the super-group is 16..128 channels wide, the
# default being the one closest to SUPER_GROUP_WIDTH: wide enough for full 16x16 MMA steps and
# few tiles, narrow enough that the block-diagonal zeros (GPT-fold MMA work) stay cheap. On an
# H100, ResNeXt-50's 32-wide super-groups beat 16 and 64 by 10-25% and 128 by 2x.
SUPER_GROUP_MIN, SUPER_GROUP_MAX, SUPER_GROUP_WIDTH = 16, 128, 32
# Rank cost of tile columns (and K rows) that hold no real channel (padded groups of a partial
# super-group, or a 104-wide super-group in a 128-wide tile): 25% padding weighs as much as half
# a power of two away from SUPER_GROUP_WIDTH.
SUPER_GROUP_PAD_COST = 2.0
# Narrow pointwise convs (1x1, both channel counts up to this: MobileNet/MnasNet/EfficientNet's
# 16..64-channel projections) are memory-bound: whole-channel tiles, tall pixel tiles.
NARROW_POINTWISE = 64
INT8_MIN_BLOCK_K = 32  # int8 MMA (mma.sync and wgmma) steps K by 32


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, flat: bool, gather: bool = False,
         fold: bool = False) -> dict:
    cfg = {**dict(zip(CONFIG_KEYS, (bm, bn, bk, warps, stages))), "FLAT_K": flat, "GATHER_K": gather}
    return {**cfg, "FOLD_KW": True} if fold else cfg


def _with_split(cfg: dict, split: int) -> dict:
    return {**cfg, "SPLIT_K": split} if split > 1 else cfg


def _with_gpt(cfg: dict, gpt: int) -> dict:
    return {**cfg, "GROUPS_PER_TILE": gpt} if gpt > 1 else cfg


def group_tile_options(c_out_g: int, c_in_g: int, groups: int) -> list[int]:
    """GROUPS_PER_TILE values worth timing, best guess first. A super-group of GPT groups is a
    GPT·width-channel GEMM (width = max(C_in_g, C_out_g)) tiled by the next power of two; GPT
    is a divisor of ``groups`` or a power of two (the last super-group then partial, so RegNet's
    13 or 55 groups of 8 still get 16-, 32-, 64-wide tiles), for super-groups of
    SUPER_GROUP_MIN..MAX channels. Per tile width the GPT padding the fewest columns is kept
    (a divisor on ties); they rank by distance from SUPER_GROUP_WIDTH plus SUPER_GROUP_PAD_COST
    times the padded fraction of all tile columns (ties: the narrower). [1] for ungrouped
    convs. Fewer than three options add the widest divisor under the minimum, so a plain
    per-group tiling also gets timed."""
    if groups == 1:
        return [1]
    width = max(c_in_g, c_out_g)
    best: dict[int, tuple[float, bool, int]] = {}  # tile width -> (rank, padded, gpt)
    for gpt in range(1, groups + 1):
        span = gpt * width
        padded = groups % gpt != 0
        if not SUPER_GROUP_MIN <= span <= SUPER_GROUP_MAX or (padded and gpt & (gpt - 1)):
            continue
        tile = triton.next_power_of_2(span)
        pad_fraction = 1 - groups * width / (triton.cdiv(groups, gpt) * tile)
        rank = abs(math.log2(tile / SUPER_GROUP_WIDTH)) + SUPER_GROUP_PAD_COST * pad_fraction
        best[tile] = min(best.get(tile, (math.inf, True, 0)), (rank, padded, gpt))
    fit = [gpt for _, _, gpt in sorted(best.values(), key=lambda r: (r[0], r[2]))]
    narrow = [d for d in range(1, groups + 1) if groups % d == 0 and d * width < SUPER_GROUP_MIN]
    return fit + narrow[-1:] if len(fit) < 3 or not fit else fit


def _unsplit_default(c_out_g: int, c_in_g: int, dtype: torch.dtype, taps: int,
                     grouped: bool = False) -> dict:
    fp16 = dtype == torch.float16
    if taps > 1 and c_in_g < GATHER_BELOW:
        bn = min(128, max(16, triton.next_power_of_2(c_out_g)))
        return _cfg(128, bn, 32, 4, 3 if fp16 else 2, False, True)
    bn = min(128, max(16, triton.next_power_of_2(c_out_g)))
    bk = min(64 if fp16 else 32, max(16, triton.next_power_of_2(c_in_g)))
    bm = 128 if fp16 else 64  # fp32 runs on FMA (ieee) or tf32 with twice the smem per tile
    warps = 8 if bm * bn >= 128 * 128 else 4
    # Three stages: at the compute-heavy layers of six families on the H200 (NOTES 49) three beat
    # four and five for every ungrouped tiling timed both ways, in fp16 and int8 (up to 1.4x:
    # one program more fits per SM). Super-groups keep the four they were tuned with.
    stages = 4 if grouped and fp16 and bn * bk <= 64 * 64 else 3
    return _cfg(bm, bn, bk, warps, stages, taps > 1)


def _tiles(cfg: dict, m: int, c_out_g: int, groups: int) -> int:
    gpt = cfg.get("GROUPS_PER_TILE", 1)
    return triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(gpt * c_out_g, cfg["BLOCK_N"]) * triton.cdiv(groups, gpt)


def _pick_split(tiles: int, k_iters: int) -> int:
    """Double the split while the grid is under one wave and every split keeps at least
    MIN_SPLIT_ITERS iterations of the K loop."""
    split = 1
    while split < MAX_SPLIT_K and tiles * split < NUM_SMS and k_iters >= 2 * split * MIN_SPLIT_ITERS:
        split *= 2
    return split


def _few_tile_configs(base: dict, c_out_g: int, c_in_g: int, dtype: torch.dtype, taps: int,
                      m: int | None, groups: int) -> list[dict]:
    """Tilings, best guess first, for a long-K conv whose output tiles under ``base`` do not
    fill the GPU; [] otherwise. Tiles shrink to 64x64 or less (BLOCK_M to the pixel count),
    then K splits until about one program per SM. When the small tiles alone fill the GPU
    (ResNet-50's layer4 at batch 32: 200 64x64 tiles, where 128x128 leaves 80 of 132 SMs idle)
    they lead unsplit, followed by the base's wider tiles split until they fill it too (fuller
    MMA tiles for a reduction's cost). All keep ``base``'s K-loop form: FLAT_K for multi-tap
    convs (its (tap, channel block) loop splits evenly; the unrolled form would split only the
    few channel blocks of each tap)."""
    gpt = base.get("GROUPS_PER_TILE", 1)
    k_in = gpt * c_in_g  # channels per tap of the (super-)group's GEMM
    if m is None or taps * k_in < SPLIT_K_MIN_K or _tiles(base, m, c_out_g, groups) >= NUM_SMS:
        return []
    bm, bn, bk = min(64, max(16, triton.next_power_of_2(m))), min(64, base["BLOCK_N"]), base["BLOCK_K"]
    k_iters = triton.cdiv(taps * k_in, bk) if base["GATHER_K"] else taps * triton.cdiv(k_in, bk)
    stages = 4 if dtype == torch.float16 else 3

    def plan(tbm: int, tbn: int) -> tuple[dict, int]:
        warps, st = (8, 3) if tbm * tbn >= 128 * 128 else (4, stages)
        tiling = _with_gpt(_cfg(tbm, tbn, bk, warps, st, base["FLAT_K"], base["GATHER_K"]), gpt)
        return tiling, _pick_split(_tiles(tiling, m, c_out_g, groups), k_iters)

    plans = [plan(tbm, tbn) for tbm, tbn in ((bm, bn), (bm, bn // 2), (bm // 2, bn)) if min(tbm, tbn) >= 16]
    # The default: the widest tiles that reach 3/4 of a wave, else the most programs.
    programs = [_tiles(t, m, c_out_g, groups) * s for t, s in plans]
    full = [i for i, p in enumerate(programs) if 4 * p >= 3 * NUM_SMS]
    tiling, split = plans[full[0] if full else programs.index(max(programs))]
    if split == 1:
        wbm, wbn = base["BLOCK_M"], base["BLOCK_N"]
        wide = [plan(tbm, tbn) for tbm, tbn in ((wbm, wbn // 2), (wbm // 2, wbn), (wbm, wbn))
                if min(tbm, tbn) >= 16 and (tbm, tbn) != (bm, bn)]
        cands = [tiling] + [_with_split(t, s) for t, s in wide]
        if k_iters >= 4 * MIN_SPLIT_ITERS:
            cands.append(_with_split(tiling, 2))
        cands += [t for t, s in plans if s == 1]
    else:
        cands = [_with_split(tiling, split), _with_split(tiling, split // 2)]
        if 2 * split <= MAX_SPLIT_K and k_iters >= 4 * split:
            cands.append(_with_split(tiling, 2 * split))
        cands = [c for c in cands + [_with_split(t, s) for t, s in plans] if "SPLIT_K" in c]
    return [c for i, c in enumerate(cands) if c != base and c not in cands[:i]]


def _grouped_default(c_out_g: int, c_in_g: int, dtype: torch.dtype, taps: int, groups: int,
                     gpt: int | None = None) -> dict:
    """The unsplit default for ``gpt`` groups per tile (default: the best-guess option), tiled
    for the super-group's channel counts."""
    gpt = group_tile_options(c_out_g, c_in_g, groups)[0] if gpt is None else gpt
    return _with_gpt(_unsplit_default(gpt * c_out_g, gpt * c_in_g, dtype, taps, groups > 1), gpt)


def _int8_tilings(cands: list[dict], c_in_g: int, taps: int) -> list[dict]:
    """fp16 tilings -> int8 ones: BLOCK_K doubled (half the bytes per element), capped at the
    K it covers (a tap's channels per super-group, or all of K when gathered), and at least
    INT8_MIN_BLOCK_K; duplicates dropped. Split-K tilings keep their BLOCK_K, so each split
    keeps the K iterations its split count was chosen for, and so do kw-folding ones (a kernel
    row of KW·C_in_g values, 21 for a 7x7 on RGB, fits one 32-wide step).
    Order: 4-warp tilings first, the 8-warp ones after them (the tuner times only the first
    few). Measured on the H200 (benchmarks/NOTES.md, items 30 and 49), int8 128x128 8-warp tiles
    lost to 4-warp ones on every 1x1 and 64-channel 3x3 layer of ResNet-50 at batch 128 and 1, by
    up to 2x on bottleneck 1x1s with an int8 residual, while 128x128 with 4 warps was the best
    tiling of 5 of 9 compute-heavy int8 layers; fp16's tiles cannot be reused in fp16's order.
    (Twice the stages or twice the rows where BLOCK_K cannot double, tried to keep fp16's bytes
    in flight, lost everywhere: gone.)"""
    out = []
    for cfg in cands:
        k_width = cfg.get("GROUPS_PER_TILE", 1) * c_in_g
        if cfg["GATHER_K"] or cfg.get("FOLD_KW", False):
            k_width *= taps
        keep = cfg.get("SPLIT_K", 1) > 1 or cfg.get("FOLD_KW", False)
        bk = cfg["BLOCK_K"] if keep else min(2 * cfg["BLOCK_K"], 128, triton.next_power_of_2(k_width))
        tiling = {**cfg, "BLOCK_K": max(INT8_MIN_BLOCK_K, bk)}
        if tiling not in out:
            out.append(tiling)
    four_warps = [c for c in out if c["num_warps"] <= 4]
    return four_warps + [c for c in out if c not in four_warps]


# Candidates, from the first, that get a twin loading the residual after the K loop.
RESIDUAL_TWINS = 3


def residual_twins(cands: list[dict], short_k: Callable[[dict], bool]) -> list[dict]:
    """For a layer whose epilogue adds a residual: each of the first RESIDUAL_TWINS candidates
    whose K loop is short enough for the residual to be loaded before it (``short_k``) is
    followed by its twin with PREFETCH_RES False. Neither order wins everywhere. Measured on the
    H200 (benchmarks/NOTES.md 58), int8 bottleneck 1x1s at batch 128: loading after the loop
    took 128 -> 512 from 91 to 77 us and 256 -> 1024 from 52 to 45 (fewer registers held across
    the MMA: more programs per SM), while 64 -> 256 ran 3% faster with the prefetch."""
    out = []
    for i, cfg in enumerate(cands):
        out.append(cfg)
        if i < RESIDUAL_TWINS and "PREFETCH_RES" not in cfg and short_k(cfg):
            out.append({**cfg, "PREFETCH_RES": False})
    return out


def default_conv2d_config(c_out_g: int, c_in_g: int, dtype: torch.dtype = torch.float16,
                          taps: int = 1, m: int | None = None, groups: int = 1) -> dict:
    """A sensible untuned tiling for H100 (taps = KH·KW): wide tiles narrowed to the channel
    counts. Multi-tap convs use the flat K loop: compiled for sm_90 it needs fewer registers
    than the unrolled one (164 vs 247 for 3x3 64->64 at 128x64x64) and never spilled in our
    checks, and its loads pipeline across taps even when C_in_g is a single BLOCK_K.
    Given m (output pixels N·OH·OW), a long-K conv with too few output tiles to fill the GPU
    gets smaller tiles instead, split-K when even those leave SMs idle. Grouped convs tile
    super-groups (``group_tile_options``). int8 takes fp16's tiling (``_int8_tilings``)."""
    if dtype == torch.int8:
        return conv2d_configs(c_out_g, c_in_g, torch.int8, taps, m, groups)[0]
    base = _grouped_default(c_out_g, c_in_g, dtype, taps, groups)
    few = _few_tile_configs(base, c_out_g, c_in_g, dtype, taps, m, groups)
    return few[0] if few else base


def conv2d_configs(c_out_g: int, c_in_g: int, dtype: torch.dtype = torch.float16,
                   taps: int = 1, m: int | None = None, groups: int = 1) -> list[dict]:
    """Candidate tilings for the tuner: the default first, then larger and small-channel ones,
    with both K-loop forms for multi-tap convs. Given m, few-tile candidates (small and split-K
    tiles, if any) lead, with the plain default right after them (the tuner times only the
    first 8). Grouped convs then get the other groups-per-tile options, and the rest is tiled
    for the default one. int8 takes fp16's tilings (``_int8_tilings``)."""
    if dtype == torch.int8:
        return _int8_tilings(conv2d_configs(c_out_g, c_in_g, torch.float16, taps, m, groups),
                             c_in_g, taps)
    base = _grouped_default(c_out_g, c_in_g, dtype, taps, groups)
    cands = _few_tile_configs(base, c_out_g, c_in_g, dtype, taps, m, groups) + [base]
    gpt = base.get("GROUPS_PER_TILE", 1)
    if groups > 1:
        cands += _grouped_configs(c_out_g, c_in_g, dtype, taps, groups, gpt, cands)
    if taps == 1 and groups == 1 and max(c_out_g, c_in_g) <= NARROW_POINTWISE:
        cands += [c for c in _narrow_pointwise_configs(c_out_g, c_in_g, dtype, m) if c not in cands]
    c_out_g, c_in_g = gpt * c_out_g, gpt * c_in_g  # the tiles below are for the super-group
    if m is not None and m >= BIG_TILE_MIN_M and dtype == torch.float16 and c_in_g >= GATHER_BELOW:
        # Huge GEMMs (VGG at batch 128): 256-wide tiles halve the operand traffic per MMA.
        for bm, bn in ((256, 128), (128, 256)):
            if bn <= max(16, triton.next_power_of_2(c_out_g)):
                cands.append(_cfg(bm, bn, 64, 8, 3, taps > 1))
    if taps > 1 and c_in_g < GATHER_BELOW:
        for bm, bn, bk, warps, stages, fold in ((128, 64, 32, 4, 3, True), (128, 64, 32, 4, 4, True),
                                                (128, 64, 64, 4, 3, False), (128, 128, 32, 8, 3, True),
                                                (64, 64, 32, 4, 3, False), (64, 64, 32, 4, 4, True)):
            cfg = _with_gpt(_cfg(bm, min(bn, max(16, triton.next_power_of_2(c_out_g))), bk, warps,
                                 stages, False, not fold, fold), gpt)
            if cfg not in cands:
                cands.append(cfg)
    bk_max = 64 if dtype == torch.float16 else 32  # fp32 tiles cost twice the shared memory
    for bm, bn, bk, warps, stages in (
        (128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
        (128, 128, 32, 8, 4),
        (64, 64, 32, 4, 4), (128, 32, 32, 4, 4), (64, 32, 32, 4, 3), (128, 16, 16, 4, 3),
        (64, 16, 16, 4, 3), (32, 16, 16, 2, 2),
    ):
        if bn > 2 * max(16, triton.next_power_of_2(c_out_g)):
            continue  # mostly-empty tiles: never faster
        for flat in (True, False) if taps > 1 and bn >= 64 else (taps > 1,):
            cfg = _with_gpt(_cfg(bm, bn, min(bk, bk_max), warps, stages, flat), gpt)
            if cfg not in cands:
                cands.append(cfg)
    return cands


def _narrow_pointwise_configs(c_out: int, c_in: int, dtype: torch.dtype, m: int | None) -> list[dict]:
    """1x1 convs of at most NARROW_POINTWISE channels each way. Reading x and writing the output
    is the whole cost (batch 32 at 112x112: 401k pixels by 16..64 channels), so each program
    takes every output channel (one N tile: x is read once) and all of K in one step, and 256
    or 512 pixels: 16..64 KB of fp16 traffic per program, still 800..1600 programs for 132 SMs.
    Channel rows of 16..64 fp16 are 32..128 contiguous bytes: the loads vectorize. Shorter tiles
    follow for small M (batch 1), where only they give every SM a program."""
    bn = max(16, triton.next_power_of_2(c_out))
    bk = min(64 if dtype == torch.float16 else 32, max(16, triton.next_power_of_2(c_in)))
    # One K step leaves nothing to pipeline: 2 stages, fp32 halves the tile (shared memory).
    tiles = [(256, 8), (512, 8), (256, 4), (128, 4)] if dtype == torch.float16 else [(128, 4), (256, 8)]
    if m is not None and triton.cdiv(m, 128) < NUM_SMS:
        tiles = [(64, 4), (32, 2), *tiles]
    return [_cfg(bm, bn, bk, warps, 2, False) for bm, warps in tiles]


def _grouped_configs(c_out_g: int, c_in_g: int, dtype: torch.dtype, taps: int, groups: int,
                     gpt: int, known: list[dict]) -> list[dict]:
    """The other groups-per-tile options at their default tiling, then the default option with
    taller and shorter pixel tiles (narrow super-groups are memory-bound: rows per program
    matter more than the MMA shape)."""
    cands = [_grouped_default(c_out_g, c_in_g, dtype, taps, groups, d)
             for d in group_tile_options(c_out_g, c_in_g, groups)[1:4]]
    base = _grouped_default(c_out_g, c_in_g, dtype, taps, groups, gpt)
    for bm, warps in ((256, 8), (64, 4)):
        if dtype == torch.float16 or bm <= 128:
            cands.append({**base, "BLOCK_M": bm, "num_warps": warps})
    return [c for i, c in enumerate(cands) if c not in known and c not in cands[:i]]


def check_config(config: dict, keys: Sequence[str] = CONFIG_KEYS, min_block: int = 16,
                 min_block_k: int | None = None) -> dict:
    """Validate a tiling dict (GPU limits the interpreter does not check) and return a copy;
    ``min_block_k``: BLOCK_K's own minimum (int8 dots: INT8_MIN_BLOCK_K)."""
    missing = [k for k in keys if k not in config]
    if missing:
        raise ValueError(f"config is missing {missing}; expected keys {tuple(keys)}")
    for key in (k for k in keys if k.startswith("BLOCK_")):
        v = config[key]
        if v < min_block or v & (v - 1):
            raise ValueError(f"config {key} must be a power of two >= {min_block}, got {v}")
    if min_block_k is not None and config.get("BLOCK_K", min_block_k) < min_block_k:
        raise ValueError(f"config BLOCK_K must be >= {min_block_k} for this dtype, got {config['BLOCK_K']}")
    split = config.get("SPLIT_K", 1)
    if not isinstance(split, int) or split < 1 or split & (split - 1):
        raise ValueError(f"config SPLIT_K must be a power of two >= 1, got {split!r}")
    gpt = config.get("GROUPS_PER_TILE", 1)
    if not isinstance(gpt, int) or gpt < 1:
        raise ValueError(f"config GROUPS_PER_TILE must be an int >= 1, got {gpt!r}")
    return dict(config)


