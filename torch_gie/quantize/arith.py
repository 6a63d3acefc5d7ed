"""The int8 arithmetic contract: how a real tensor maps to codes, how weights are quantized, and
the exact integer semantics of a quantized conv/Linear that the Triton kernels and the
reference backend both implement (kernels are checked against ``conv2d_int8`` here).

Codes are always stored as ``torch.int8``. A code c in [-128, 127] stands for
``scale * (c - zero_point)``:
- signed tensors: symmetric, ``zero_point = 0``, range [-127 s, 127 s] (code -128 unused);
- non-negative tensors (after ReLU, ReLU6, sigmoid, ...): ``zero_point = -128``, so all 256 codes
  cover [0, 255 s] (an unsigned code u = c + 128 stored as int8).
Padding and masked loads read the zero point (real 0). Weights: symmetric int8 per output
channel, codes in [-127, 127]. A quantized dot sums raw codes in int32:
    acc[m, n] = sum_k c_x[m, k] * w_q[k, n]
    y = acc * (s_x * s_w[n]) + bias_q[n],   bias_q[n] = bias[n] - s_x * s_w[n] * z_x * sum_k w_q[k, n]
in fp32 (the zero point's contribution folded into the bias at build time, ``fold_zero_point``),
then the usual epilogue in fp32 (activation, + residual dequantized, post-activation), then
either an fp16/fp32 store or ``requantize``: ``clamp(rint(y * (1 / s_out)) + z_out, -128, 127)``
with rint rounding half to even. Kernels may contract ``acc * s + b`` into one FMA, so a kernel
and the reference agree to at most one code on a small fraction of elements (stated per test).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

QMIN, QMAX = -128, 127
WEIGHT_QMAX = 127


@dataclass(frozen=True)
class QParams:
    """Per-tensor quantization of an activation: real = scale * (code - zero_point)."""

    scale: float
    zero_point: int = 0  # 0 (symmetric) or -128 (non-negative tensor, all 256 codes)

    def __post_init__(self) -> None:
        if not self.scale > 0 or self.scale != self.scale or self.scale == float("inf"):
            raise ValueError(f"a quantization scale must be finite and > 0, got {self.scale}")
        if self.zero_point not in (0, QMIN):
            raise ValueError(f"zero_point must be 0 (signed) or {QMIN} (non-negative), got {self.zero_point}")

    @property
    def unsigned(self) -> bool:
        return self.zero_point == QMIN

    @property
    def inv_scale(self) -> float:
        """1 / scale rounded to fp32 once, so every implementation multiplies by the same number."""
        return float(torch.tensor(1.0 / self.scale, dtype=torch.float32))

    @property
    def real_range(self) -> tuple[float, float]:
        return (0.0, 255 * self.scale) if self.unsigned else (-127 * self.scale, 127 * self.scale)

    def to_json(self) -> dict:
        return {"scale": self.scale, "zero_point": self.zero_point}


def qparams_for_range(lo: float, hi: float, *, non_negative: bool | None = None) -> QParams:
    """The QParams covering [lo, hi]: unsigned codes when the tensor is never negative
    (``non_negative``, by default ``lo >= 0``), symmetric ones otherwise."""
    if non_negative is None:
        non_negative = lo >= 0
    amax = max(abs(lo), abs(hi), 1e-8)
    if non_negative:
        return QParams(float(max(hi, 1e-8)) / 255.0, QMIN)
    return QParams(float(amax) / 127.0, 0)


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)  # torch.round rounds halves to even, as rint does


def requantize(y: torch.Tensor, qp: QParams) -> torch.Tensor:
    """fp32 values -> int8 codes: clamp(rint(y * inv_scale) + zero_point, -128, 127)."""
    y = y.to(torch.float32) * qp.inv_scale
    return (round_half_even(y) + qp.zero_point).clamp_(QMIN, QMAX).to(torch.int8)


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Real tensor -> int8 codes (the same rounding as a kernel's requantizing store)."""
    return requantize(x, qp)


def dequantize(codes: torch.Tensor, qp: QParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return ((codes.to(torch.float32) - qp.zero_point) * qp.scale).to(dtype)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (codes in [-127, 127], fp32 scale [C_out]).
    An all-zero channel gets scale 1 (its codes are 0 either way)."""
    w = weight.detach().to(torch.float32)
    amax = w.reshape(w.shape[0], -1).abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / WEIGHT_QMAX, torch.ones_like(amax))
    shape = (-1,) + (1,) * (w.dim() - 1)
    codes = torch.round(w / scale.reshape(shape)).clamp_(-WEIGHT_QMAX, WEIGHT_QMAX).to(torch.int8)
    return codes, scale


def fold_zero_point(bias: torch.Tensor | None, w_codes: torch.Tensor, w_scale: torch.Tensor,
                    x_qp: QParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(combined scale s_x * s_w [C_out], folded bias [C_out]) in fp32: see the module docstring.
    ``w_codes`` is [C_out, ...] (any layout whose first dim is the output channel)."""
    combined = (w_scale.to(torch.float64) * x_qp.scale).to(torch.float32)
    wsum = w_codes.reshape(w_codes.shape[0], -1).to(torch.float64).sum(dim=1)
    b = torch.zeros_like(wsum) if bias is None else bias.detach().to(torch.float64)
    folded = b - combined.to(torch.float64) * x_qp.zero_point * wsum
    return combined, folded.to(torch.float32)


def _exact_float(k: int, device: torch.device) -> torch.dtype:
    """A float dtype in which a sum of ``k`` products of int8 codes is exact: fp32 while
    k * 128 * 127 < 2**24 on the CPU (several times faster), else fp64. On a GPU fp32 convs may
    run in TF32, so fp64 there."""
    return torch.float32 if device.type == "cpu" and k * 128 * 127 < 2 ** 24 else torch.float64


def conv2d_accumulate(x_codes: torch.Tensor, x_qp: QParams, w_codes: torch.Tensor, stride, padding4,
                      dilation, groups: int) -> torch.Tensor:
    """The exact int32 accumulator of a quantized conv over raw codes, padding reading the zero
    point, as an int64 tensor (computed in a float dtype in which every partial sum is exact)."""
    top, bottom, left, right = padding4
    dtype = _exact_float(w_codes[0].numel(), x_codes.device)
    x = F.pad(x_codes.to(dtype), (left, right, top, bottom), value=float(x_qp.zero_point))
    acc = F.conv2d(x, w_codes.to(dtype), None, stride, 0, dilation, groups)
    return acc.round().to(torch.int64)


def conv2d_int8(x_codes: torch.Tensor, x_qp: QParams, w_codes: torch.Tensor, combined: torch.Tensor,
                folded_bias: torch.Tensor, stride, padding4, dilation, groups: int) -> torch.Tensor:
    """The fp32 pre-activation output ``acc * combined + folded_bias`` of a quantized conv."""
    acc = conv2d_accumulate(x_codes, x_qp, w_codes, stride, padding4, dilation, groups)
    shape = (1, -1, 1, 1)
    return acc.to(torch.float32) * combined.reshape(shape) + folded_bias.reshape(shape)


def linear_int8(x_codes: torch.Tensor, x_qp: QParams, w_codes: torch.Tensor, combined: torch.Tensor,
                folded_bias: torch.Tensor) -> torch.Tensor:
    """The fp32 pre-activation output of a quantized Linear (x: [..., K], w: [N, K])."""
    dtype = _exact_float(w_codes.shape[1], x_codes.device)
    acc = (x_codes.to(dtype) @ w_codes.to(dtype).t()).round()
    return acc.to(torch.float32) * combined + folded_bias


@dataclass(frozen=True)
class LayerQuant:
    """How one int8 layer reads and writes: its input codes' QParams; its output's QParams, or
    None to store real values in ``out_dtype`` (a consumer that runs in fp16); the residual's
    QParams when the residual arrives as int8 codes (None: it arrives as real values)."""

    input: QParams
    output: QParams | None = None
    residual: QParams | None = None
    out_dtype: torch.dtype = torch.float16

    @property
    def store_dtype(self) -> torch.dtype:
        return torch.int8 if self.output is not None else self.out_dtype
