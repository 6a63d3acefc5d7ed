"""The excitation of a squeeze-and-excitation block for all images in two launches:
``gate[n] = act2(W2 @ act1(W1 @ mean_hw(x[n]) + b1) + b2)`` (EfficientNet, MobileNetV3, RegNetY).

Stage 1 is the split spatial reduction of ``pool2d`` (fp32 partial sums ``[N, S, C]`` in a
workspace the layer keeps). Stage 2 is one kernel: program (image block, output-channel block)
sums the partials into means and runs both small matmuls with ``tl.dot`` (images as the M dim,
padded to 16): for each block of the Cr hidden units it computes ``h = act1(m @ W1^T + b1)`` over
all C, then accumulates ``h @ W2^T`` for its own channels. The hidden vector therefore never
leaves registers and no program waits for another; the price is that every output-channel block
recomputes ``h`` (C * Cr multiply-adds per image, small next to the parallelism it buys).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch_gie.activations import ActLike, act_constexprs, as_act
from torch_gie.kernels.epilogue import activate_channels
from torch_gie.kernels.pool2d import spatial_reduce, spatial_split

_DTYPES = (torch.float16, torch.float32)
_CONFIG_KEYS = ("BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK_C", "num_warps")
# Elements of one partial-sums tile [BLOCK_N, BLOCK_S, BLOCK_K]: bounds BLOCK_S (registers).
_PARTIAL_TILE = 4096


@triton.jit
def _excite_kernel(
    # pointers: partial sums [N, S, C] fp32; W1^T [C, CR]; W2^T [CR, C]; biases and PReLU slopes
    # fp32 (unused unless their flag says so); gate (N, C) view
    part_ptr, w1t_ptr, b1_ptr, w2t_ptr, b2_ptr, slope1_ptr, slope2_ptr, gate_ptr,
    # sizes; inv_hw = 1 / (H * W) turns the sums into means
    N, S, C, CR, inv_hw,
    # gate strides
    sgn, sgc,
    # meta-parameters
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    ACT1: tl.constexpr, ACT1_ALPHA: tl.constexpr, ACT1_BETA: tl.constexpr,
    ACT2: tl.constexpr, ACT2_ALPHA: tl.constexpr, ACT2_BETA: tl.constexpr,
    FP32_DOT: tl.constexpr,  # fp32 weights, exact (ieee) products; else fp16 operands
    S_CHUNKS: tl.constexpr,  # cdiv(S, BLOCK_S): partial-sum loads per channel block
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    img = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    img_ok = img < N
    c_ok = cols < C
    img_base = img.to(tl.int64) * S * C
    acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for r0 in range(0, CR, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < CR
        h = tl.zeros([BLOCK_N, BLOCK_R], tl.float32)
        for k0 in range(0, C, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < C
            m = _channel_means(part_ptr, img_base, img_ok, k, k_ok, S, C, inv_hw, S_CHUNKS, BLOCK_N,
                               BLOCK_S, BLOCK_K)
            w1 = tl.load(w1t_ptr + k[:, None] * CR + r[None, :], mask=k_ok[:, None] & r_ok[None, :],
                         other=0.0)
            h = _dot(m, w1, h, FP32_DOT)
        if HAS_B1:
            h += tl.load(b1_ptr + r, mask=r_ok, other=0.0)[None, :]
        h = activate_channels(h, tl.where(r_ok, r, 0), slope1_ptr, ACT1, ACT1_ALPHA, ACT1_BETA)
        w2 = tl.load(w2t_ptr + r[:, None] * C + cols[None, :], mask=r_ok[:, None] & c_ok[None, :],
                     other=0.0)
        # Hidden units past CR meet zero rows of W2^T; zero them too, so act1(0) never counts.
        acc = _dot(tl.where(r_ok[None, :], h, 0.0), w2, acc, FP32_DOT)
    if HAS_B2:
        acc += tl.load(b2_ptr + cols, mask=c_ok, other=0.0)[None, :]
    acc = activate_channels(acc, tl.where(c_ok, cols, 0), slope2_ptr, ACT2, ACT2_ALPHA, ACT2_BETA)
    gate_ptrs = gate_ptr + img.to(tl.int64)[:, None] * sgn + cols[None, :] * sgc
    tl.store(gate_ptrs, acc.to(gate_ptr.dtype.element_ty), mask=img_ok[:, None] & c_ok[None, :])


@triton.jit
def _channel_means(part_ptr, img_base, img_ok, k, k_ok, S, C, inv_hw, S_CHUNKS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """Means [BLOCK_N, BLOCK_K] of channels k from their S partial sums, read BLOCK_S at a time in
    S_CHUNKS loads. The loads are unrolled: independent, they are all in flight at once instead
    of one memory latency each."""
    mask = img_ok[:, None] & k_ok[None, :]
    base = part_ptr + img_base[:, None] + k[None, :]
    if BLOCK_S == 1:
        m = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for s in tl.static_range(S_CHUNKS):
            m += tl.load(base + s * C, mask=mask, other=0.0)
    else:
        m3 = tl.zeros([BLOCK_N, BLOCK_S, BLOCK_K], tl.float32)
        for i in tl.static_range(S_CHUNKS):
            s = i * BLOCK_S + tl.arange(0, BLOCK_S)
            m3 += tl.load(base[:, None, :] + (s * C)[None, :, None],
                          mask=mask[:, None, :] & (s < S)[None, :, None], other=0.0)
        m = tl.sum(m3, axis=1)
    return m * inv_hw


@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr):
    if FP32_DOT:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(tl.float16), b, acc)
    return acc


def _pow2_at_least_16(v: int) -> int:
    return max(16, triton.next_power_of_2(v))


def se_configs(c: int, cr: int) -> list[dict]:
    """Stage-2 tilings, best guess first. Default: 16 images per program (tl.dot's least M),
    hidden units in blocks of up to 64, C in blocks of up to 128 for the first matmul, output
    channel blocks of 64 (C = 1152 gives 18 programs per image block), and 8 warps: the grid is
    small, so each program needs many loads in flight (and the registers for the unrolled
    partial-sum loads of a split H*W: 4 warps spill there)."""
    block_r = min(64, _pow2_at_least_16(cr))
    block_k = min(128, _pow2_at_least_16(c))
    block_c = min(64, _pow2_at_least_16(c))
    default = {"BLOCK_N": 16, "BLOCK_K": block_k, "BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": 8}
    variants = [
        {"BLOCK_C": min(128, _pow2_at_least_16(c))},
        {"BLOCK_C": min(32, block_c)},
        {"BLOCK_K": min(32, block_k)},  # more split partials per load
        {"num_warps": 4},
        {"BLOCK_K": min(64, block_k), "BLOCK_C": min(32, block_c)},
        {"BLOCK_N": 32},
        {"BLOCK_R": min(32, block_r), "BLOCK_K": min(256, _pow2_at_least_16(c))},
    ]
    configs = [default]
    for v in variants:
        config = {**default, **v}
        if config not in configs:
            configs.append(config)
    return configs


def check_config(config: dict) -> dict:
    """ValueError unless ``config`` has exactly the stage-2 keys with valid values."""
    if not isinstance(config, dict) or set(config) != set(_CONFIG_KEYS):
        raise ValueError(f"a SqueezeExcitation config has keys {_CONFIG_KEYS}, got {config!r}")
    for key, v in config.items():
        least = 1 if key == "num_warps" else 16  # tl.dot needs every dim >= 16
        if not isinstance(v, int) or v < least or v & (v - 1):
            raise ValueError(f"config {key} must be a power of two >= {least}, got {v!r}")
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


class SqueezeExcitation:
    """``gate = act2(W2 @ act1(W1 @ mean_hw(x) + b1) + b2)`` bound at build time.

    w1: [Cr, C] (or [Cr, C, 1, 1]), w2: [C, Cr] (or [C, Cr, 1, 1]); b1 [Cr], b2 [C] optional;
    act1/act2 any activation (prelu: ``act1_slope`` [Cr], ``act2_slope`` [C]). ``layer(x, gate)``:
    x an (N, C, H, W) strided view in ``dtype``, gate an (N, C) or (N, C, 1, 1) view in ``dtype``.
    The partial-sums workspace is allocated on the first call and kept."""

    launches = 2  # the spatial reduction, then the excitation

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
        wdtype = torch.float32 if dtype == torch.float32 else torch.float16
        # Transposed so that dot operands load along contiguous rows: [C, Cr] and [Cr, C].
        self.w1t = w1.detach().t().to(device, wdtype).contiguous()
        self.w2t = w2.detach().t().to(device, wdtype).contiguous()
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
            if t.dtype != self.dtype or t.device != self.w1t.device:
                raise ValueError(f"{name} must be {self.dtype} on {self.w1t.device}, "
                                 f"got {t.dtype} on {t.device}")

    def workspace(self, numel: int) -> torch.Tensor:
        """``numel`` fp32 elements of the kept partial-sums buffer (grown only on a larger shape)."""
        if self._partials is None or self._partials.numel() < numel:
            self._partials = torch.empty(numel, dtype=torch.float32, device=self.w1t.device)
        return self._partials[:numel]

    def __call__(self, x: torch.Tensor, gate: torch.Tensor) -> None:
        self._check(x, gate)
        n, c, h, w = x.shape
        if n == 0:
            return
        sp = spatial_split(n, c, h * w, x.device)
        partials = self.workspace(n * sp.split * c).view(n, sp.split, c)
        spatial_reduce(x, partials, sp, "avg")
        gate2 = gate[:, :, 0, 0] if gate.dim() == 4 else gate
        cfg = self._config
        block_s = min(triton.next_power_of_2(sp.split),
                      max(1, _PARTIAL_TILE // (cfg["BLOCK_N"] * cfg["BLOCK_K"])))
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(c, cfg["BLOCK_C"]))
        dummy = self.w1t
        _excite_kernel[grid](
            partials, self.w1t, dummy if self.b1 is None else self.b1, self.w2t,
            dummy if self.b2 is None else self.b2,
            dummy if self.act1_slope is None else self.act1_slope,
            dummy if self.act2_slope is None else self.act2_slope, gate2,
            n, sp.split, c, self.hidden, 1.0 / (h * w), *gate2.stride(),
            HAS_B1=self.b1 is not None, HAS_B2=self.b2 is not None, **self._acts,
            FP32_DOT=self.dtype == torch.float32, S_CHUNKS=triton.cdiv(sp.split, block_s),
            BLOCK_S=block_s,
            BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=cfg["BLOCK_R"],
            BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
        )
