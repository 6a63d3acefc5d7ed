"""The excitation of a squeeze-and-excitation block for all images in two launches:
``gate[n] = act2(W2 @ act1(W1 @ mean_hw(x[n]) + b1) + b2)`` (EfficientNet, MobileNetV3, RegNetY).

W1 is linear, so ``W1 @ sum_hw(x) = sum_p W1[:, c_p] @ sum_{hw_p}(x[c_p])`` over the tiles p of
``global_pool.spatial_split`` (channel blocks c_p, pixel chunks hw_p). Stage 1 (squeeze): each
program reduces its tile of x, as a global pool does, and multiplies the sums by its columns of
W1: fp32 partial hidden pre-activations ``[N, P, Cr]`` go to a workspace the layer keeps (no
atomics: reproducible). The hidden layer's work is spread over as many programs as the pool's,
each reading only its slice of W1. Stage 2 (excite): program (image block, output-channel block)
sums the P partials into ``h = act1(. / HW + b1)`` and applies its columns of W2. Both matmuls
are skinny (M = images), so they run as broadcast products on CUDA cores; no tile grows with
H*W, so shared memory stays a few KB at any spatial size.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch_gie.activations import ActLike, act_constexprs, as_act
from torch_gie.kernels.epilogue import activate_channels
from torch_gie.kernels.global_pool import dense_pixels, reduce_pixels, spatial_split

_DTYPES = (torch.float16, torch.float32)
_CONFIG_KEYS = ("BLOCK_N", "BLOCK_R", "BLOCK_C", "num_warps")
# Register tiles, in elements per warp (fp32: 64 per thread): stage 1's W1 slice, stage 2's
# partials tile and its broadcast product [BLOCK_N, BLOCK_R, BLOCK_C].
_ELEMS_PER_WARP = 2048
_MAX_ELEMS_PER_WARP = 4096  # the most a config may ask for (128 per thread)


@triton.jit
def _squeeze_kernel(
    # pointers: x (N, C, H, W); W1 [CR, C] (layer dtype); hidden partials [N, P, CR] fp32
    x_ptr, w1_ptr, part_ptr,
    # sizes; program (n * S + s, channel block b) writes partial p = s * num_programs(1) + b
    C, CR, H, W, S, CHUNK, P,
    # x strides
    sxn, sxc, sxh, sxw,
    # meta-parameters: the pixel tiling (global_pool.spatial_split), hidden units per W1 load
    DENSE_HW: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    n = tl.program_id(0) // S
    s = tl.program_id(0) % S
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    w1_cols = w1_ptr + c[None, :]
    # The first W1 slice is loaded before the pixels: both are in flight together.
    r = tl.arange(0, BLOCK_R)
    w1 = tl.load(w1_cols + r[:, None] * C, mask=(r < CR)[:, None] & c_ok[None, :], other=0.0)
    x_img = x_ptr + n.to(tl.int64) * sxn + c[None, :] * sxc
    sums = reduce_pixels(x_img, c_ok, s * CHUNK, tl.minimum(s * CHUNK + CHUNK, H * W), W, sxh,
                         sxw, False, DENSE_HW, BLOCK_HW, BLOCK_C)[None, :]
    dest = part_ptr + (n.to(tl.int64) * P + s * tl.num_programs(1) + tl.program_id(1)) * CR
    tl.store(dest + r, tl.sum(sums * w1.to(tl.float32), axis=1), mask=r < CR)
    for r0 in range(BLOCK_R, CR, BLOCK_R):  # hidden layers wider than one slice
        r = r0 + tl.arange(0, BLOCK_R)
        w1 = tl.load(w1_cols + r[:, None] * C, mask=(r < CR)[:, None] & c_ok[None, :], other=0.0)
        tl.store(dest + r, tl.sum(sums * w1.to(tl.float32), axis=1), mask=r < CR)


@triton.jit
def _excite_kernel(
    # pointers: hidden partials [N, P, CR] fp32; W2^T [CR, C] (layer dtype); biases and PReLU
    # slopes fp32 (unused unless their flag says so); gate (N, C) view
    part_ptr, w2t_ptr, b1_ptr, b2_ptr, slope1_ptr, slope2_ptr, gate_ptr,
    # sizes; inv_hw = 1 / (H * W) turns the sums into means
    N, P, C, CR, inv_hw,
    # gate strides
    sgn, sgc,
    # meta-parameters
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    ACT1: tl.constexpr, ACT1_ALPHA: tl.constexpr, ACT1_BETA: tl.constexpr,
    ACT2: tl.constexpr, ACT2_ALPHA: tl.constexpr, ACT2_BETA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    img = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    img_ok = img < N
    c_ok = cols < C
    acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for r0 in range(0, CR, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < CR
        # W2's slice first: its load overlaps the partials'.
        w2 = tl.load(w2t_ptr + r[:, None] * C + cols[None, :], mask=r_ok[:, None] & c_ok[None, :],
                     other=0.0)
        h = _hidden_sums(part_ptr, img, img_ok, r, r_ok, P, CR, BLOCK_N, BLOCK_P, BLOCK_R) * inv_hw
        if HAS_B1:
            h += tl.load(b1_ptr + r, mask=r_ok, other=0.0)[None, :]
        h = activate_channels(h, tl.where(r_ok, r, 0), slope1_ptr, ACT1, ACT1_ALPHA, ACT1_BETA)
        # Hidden units past CR meet zero rows of W2^T; zero them too, so act1(0) never counts.
        h = tl.where(r_ok[None, :], h, 0.0)
        acc += tl.sum(h[:, :, None] * w2.to(tl.float32)[None, :, :], axis=1)
    if HAS_B2:
        acc += tl.load(b2_ptr + cols, mask=c_ok, other=0.0)[None, :]
    acc = activate_channels(acc, tl.where(c_ok, cols, 0), slope2_ptr, ACT2, ACT2_ALPHA, ACT2_BETA)
    gate_ptrs = gate_ptr + img.to(tl.int64)[:, None] * sgn + cols[None, :] * sgc
    tl.store(gate_ptrs, acc.to(gate_ptr.dtype.element_ty), mask=img_ok[:, None] & c_ok[None, :])


@triton.jit
def _hidden_sums(part_ptr, img, img_ok, r, r_ok, P, CR, BLOCK_N: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    """[BLOCK_N, BLOCK_R]: the P partial pre-activations of hidden units r, summed."""
    base = part_ptr + (img.to(tl.int64) * P * CR)[:, None, None] + r[None, None, :]
    mask = img_ok[:, None, None] & r_ok[None, None, :]
    h = tl.zeros([BLOCK_N, BLOCK_R], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        tile = tl.load(base + (p * CR)[None, :, None], mask=mask & (p < P)[None, :, None], other=0.0)
        h += tl.sum(tile, axis=1)
    return h


def _pow2(v: int) -> int:
    return triton.next_power_of_2(max(1, v))


def _config(c: int, cr: int, block_n: int, block_c: int, num_warps: int) -> dict:
    """A stage-2 tiling whose broadcast product fills the default register budget."""
    block_c = min(block_c, _pow2(c))
    block_r = min(_pow2(cr), max(1, _ELEMS_PER_WARP * num_warps // (block_n * block_c)))
    return {"BLOCK_N": block_n, "BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": num_warps}


def se_configs(c: int, cr: int) -> list[dict]:
    """Stage-2 tilings, best guess first. Default: 2 images per program (each W2 slice serves
    both), 64 output channels (C = 1152 at batch 32: 288 programs, each reading about 12 KB of
    W2), as many hidden units per step as fill 64 fp32 per thread at 8 warps (Cr <= 128: one
    step). Variants trade W2 reuse (more images) against programs in flight."""
    shapes = [(2, 64, 8), (1, 64, 8), (4, 64, 8), (2, 32, 8), (2, 128, 8), (2, 64, 4),
              (1, 32, 4), (4, 32, 8), (8, 32, 8)]
    configs = []
    for block_n, block_c, warps in shapes:
        config = _config(c, cr, block_n, block_c, warps)
        if config not in configs:
            configs.append(config)
    return configs


def check_config(config: dict) -> dict:
    """ValueError unless ``config`` has exactly the stage-2 keys with valid values and a
    broadcast product of at most 128 fp32 per thread."""
    if not isinstance(config, dict) or set(config) != set(_CONFIG_KEYS):
        raise ValueError(f"a SqueezeExcitation config has keys {_CONFIG_KEYS}, got {config!r}")
    for key, v in config.items():
        if not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"config {key} must be a power of two >= 1, got {v!r}")
    product = config["BLOCK_N"] * config["BLOCK_R"] * config["BLOCK_C"]
    if product > _MAX_ELEMS_PER_WARP * config["num_warps"]:
        raise ValueError(f"config {config} multiplies {product} elements at once, more than "
                         f"{_MAX_ELEMS_PER_WARP} per warp")
    return dict(config)


def _matrix(w: torch.Tensor, name: str, shape: tuple[int, int]) -> torch.Tensor:
    """A [rows, cols] weight from a Linear weight or a squeezed 1x1 conv weight [rows, cols, 1, 1]."""
    if w.dim() == 4 and w.shape[2:] == (1, 1):
        w = w[:, :, 0, 0]
    if tuple(w.shape) != shape:
        raise ValueError(f"{name} must be {shape} (or {shape + (1, 1)} from a 1x1 conv), "
                         f"got {tuple(w.shape)}")
    return w


def _vector(v: torch.Tensor | None, name: str, length: int, device: torch.device) -> torch.Tensor | None:
    if v is None:
        return None
    if tuple(v.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(v.shape)}")
    return v.detach().to(device, torch.float32).contiguous()


def squeeze_meta(x: torch.Tensor, hidden: int) -> dict:
    """Stage 1's launch: grid, sizes and meta-parameters for x (N, C, H, W) and Cr hidden units.
    W1 slices [BLOCK_R, BLOCK_C] hold up to 64 elements per thread (more, or more warps, cost
    programs per SM: ~200 registers at 8 warps for 7x7 maps with Cr = 240)."""
    n, c, h, w = x.shape
    sp = spatial_split(n, c, h * w, x.device)
    warps = sp.num_warps
    block_r = min(_pow2(hidden), max(1, _ELEMS_PER_WARP * warps // sp.block_c))
    blocks = triton.cdiv(c, sp.block_c)
    return {"grid": (n * sp.split, blocks), "P": sp.split * blocks, "CHUNK": sp.chunk,
            "S": sp.split, "DENSE_HW": dense_pixels(x), "BLOCK_HW": sp.block_hw,
            "BLOCK_C": sp.block_c, "BLOCK_R": block_r, "num_warps": warps}


def excite_block_p(p: int, config: dict) -> int:
    """Partials summed per load in stage 2: the partials tile fills the default budget."""
    budget = _ELEMS_PER_WARP * config["num_warps"] // (config["BLOCK_N"] * config["BLOCK_R"])
    return min(_pow2(p), max(1, budget))


class SqueezeExcitation:
    """``gate = act2(W2 @ act1(W1 @ mean_hw(x) + b1) + b2)`` bound at build time.

    w1: [Cr, C] (or [Cr, C, 1, 1]), w2: [C, Cr] (or [C, Cr, 1, 1]); b1 [Cr], b2 [C] optional;
    act1/act2 any activation (prelu: ``act1_slope`` [Cr], ``act2_slope`` [C]). ``layer(x, gate)``:
    x an (N, C, H, W) strided view in ``dtype``, gate an (N, C) or (N, C, 1, 1) view in ``dtype``.
    The partials workspace is allocated on the first call and kept. ``config`` tiles stage 2."""

    launches = 2  # the squeeze (pixel sums and W1), then the excitation

    def __init__(self, w1: torch.Tensor, b1: torch.Tensor | None, act1: ActLike,
                 w2: torch.Tensor, b2: torch.Tensor | None, act2: ActLike,
                 dtype: torch.dtype = torch.float16, *, act1_slope: torch.Tensor | None = None,
                 act2_slope: torch.Tensor | None = None, config: dict | None = None) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
        if w1.dim() not in (2, 4):
            raise ValueError(f"w1 must be [Cr, C] or [Cr, C, 1, 1], got {tuple(w1.shape)}")
        cr, c = w1.shape[:2]
        w1 = _matrix(w1, "w1", (cr, c))
        w2 = _matrix(w2, "w2", (c, cr))
        device = w1.device
        self.channels, self.hidden, self.dtype = c, cr, dtype
        # Both [Cr, C], rows contiguous along C: each program loads a column block of each.
        self.w1 = w1.detach().to(device, dtype).contiguous()
        self.w2t = w2.detach().t().to(device, dtype).contiguous()
        self.b1 = _vector(b1, "b1", cr, device)
        self.b2 = _vector(b2, "b2", c, device)
        self.act1, self.act2 = as_act(act1), as_act(act2)
        self.act1_slope = self._slope(self.act1, act1_slope, "act1_slope", cr, device)
        self.act2_slope = self._slope(self.act2, act2_slope, "act2_slope", c, device)
        # The codes are part of the tuner's layer signature.
        self._acts = {**act_constexprs(self.act1, "ACT1"), **act_constexprs(self.act2, "ACT2")}
        self.act1_code, self.act2_code = self._acts["ACT1"], self._acts["ACT2"]
        self.configs = se_configs(c, cr)
        self.config = config if config is not None else self.configs[0]
        self._partials: torch.Tensor | None = None

    @staticmethod
    def _slope(act, slope, name: str, length: int, device) -> torch.Tensor | None:
        if act is None or act.name != "prelu":
            if slope is not None:
                raise ValueError(f"{name} given, but that activation is {act}, not prelu")
            return None
        if slope is None:
            raise ValueError(f"prelu needs {name}, a tensor of shape ({length},)")
        return _vector(slope, name, length, device)

    @property
    def config(self) -> dict:
        return self._config

    @config.setter
    def config(self, config: dict) -> None:
        self._config = check_config(config)

    def _check(self, x: torch.Tensor, gate: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must be (N, {self.channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] * x.shape[3] == 0:
            raise ValueError(f"x must have pixels, got {tuple(x.shape)}")
        n = x.shape[0]
        if tuple(gate.shape) not in ((n, self.channels), (n, self.channels, 1, 1)):
            raise ValueError(f"gate must be (N, C) = {(n, self.channels)} or (N, C, 1, 1), "
                             f"got {tuple(gate.shape)}")
        for name, t in (("x", x), ("gate", gate)):
            if t.dtype != self.dtype or t.device != self.w1.device:
                raise ValueError(f"{name} must be {self.dtype} on {self.w1.device}, "
                                 f"got {t.dtype} on {t.device}")

    def workspace(self, numel: int) -> torch.Tensor:
        """``numel`` fp32 elements of the kept partials buffer (grown only on a larger shape)."""
        if self._partials is None or self._partials.numel() < numel:
            self._partials = torch.empty(numel, dtype=torch.float32, device=self.w1.device)
        return self._partials[:numel]

    def __call__(self, x: torch.Tensor, gate: torch.Tensor) -> None:
        self._check(x, gate)
        n, c, h, w = x.shape
        if n == 0:
            return
        sq = squeeze_meta(x, self.hidden)
        partials = self.workspace(n * sq["P"] * self.hidden)
        _squeeze_kernel[sq["grid"]](
            x, self.w1, partials, c, self.hidden, h, w, sq["S"], sq["CHUNK"], sq["P"], *x.stride(),
            DENSE_HW=sq["DENSE_HW"], BLOCK_HW=sq["BLOCK_HW"], BLOCK_C=sq["BLOCK_C"],
            BLOCK_R=sq["BLOCK_R"], num_warps=sq["num_warps"],
        )
        gate2 = gate[:, :, 0, 0] if gate.dim() == 4 else gate
        cfg = self._config
        dummy = self.w1
        _excite_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(c, cfg["BLOCK_C"]))](
            partials, self.w2t, dummy if self.b1 is None else self.b1,
            dummy if self.b2 is None else self.b2,
            dummy if self.act1_slope is None else self.act1_slope,
            dummy if self.act2_slope is None else self.act2_slope, gate2,
            n, sq["P"], c, self.hidden, 1.0 / (h * w), *gate2.stride(),
            HAS_B1=self.b1 is not None, HAS_B2=self.b2 is not None, **self._acts,
            BLOCK_N=cfg["BLOCK_N"], BLOCK_P=excite_block_p(sq["P"], cfg), BLOCK_R=cfg["BLOCK_R"],
            BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
        )
