"""GEMM for Linear layers: ``out = act(x @ W^T + bias)`` on strided views, in one launch.

With x viewed as rows ``[M, K]`` (M = product of the leading dims) and W packed once as
``W^T [K, N]``, each program computes one ``BLOCK_M x BLOCK_N`` tile of the output, accumulating
in fp32 over K; bias and activation are applied to the fp32 accumulator before the single store.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from torch_gie.activations import activation_code
from torch_gie.kernels.epilogue import activate

_DTYPES = (torch.float16, torch.float32)
_FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")
# Packed weight rows are padded to this many elements so every row starts 16-element aligned,
# which lets Triton prove vectorized weight loads are legal whatever N is (1000 for ImageNet).
_ROW_ALIGN = 16
# Roughly the SM count of an H100: below this many tiles the GPU is mostly idle, so the default
# config shrinks the tile instead (no split-K: it would need a zeroed output or a workspace).
_TARGET_PROGRAMS = 128
_SMEM_BUDGET = 160 * 1024


class GemmConfig(NamedTuple):
    """One launch configuration; every block dim is >= 16 because tl.dot requires it."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def linear_configs(dtype: torch.dtype = torch.float16) -> list[GemmConfig]:
    """Candidate configs for a tuner, from skinny (batch 1) to large tiles, fitting shared memory."""
    candidates = [
        # M <= 16 (batch 1..16): weight-bandwidth bound, so many narrow programs and long K steps.
        GemmConfig(16, 16, 256, 2, 4),
        GemmConfig(16, 32, 128, 4, 4),
        GemmConfig(16, 64, 128, 4, 4),
        GemmConfig(32, 32, 128, 4, 4),
        GemmConfig(32, 64, 64, 4, 4),
        GemmConfig(64, 64, 64, 4, 4),
        GemmConfig(64, 128, 64, 4, 3),
        GemmConfig(128, 64, 64, 4, 3),
        GemmConfig(128, 128, 32, 8, 4),
        GemmConfig(128, 128, 64, 8, 3),
        GemmConfig(128, 256, 64, 8, 3),
    ]
    size = torch.finfo(dtype).bits // 8
    return [c for c in candidates
            if (c.block_m + c.block_n) * c.block_k * size * c.num_stages <= _SMEM_BUDGET]


def default_config(m: int, n: int, dtype: torch.dtype = torch.float16) -> GemmConfig:
    """The largest tile that still yields enough programs to fill the GPU; the smallest otherwise."""
    configs = linear_configs(dtype)
    skinny = [c for c in configs if c.block_m == 16]
    pool = skinny if m <= 16 else [c for c in configs if c.block_m > 16]
    by_size = sorted(pool, key=lambda c: (c.block_m * c.block_n, c.block_k), reverse=True)
    for c in by_size:
        if triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n) >= _TARGET_PROGRAMS:
            return c
    return by_size[-1]


@triton.jit
def _linear_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, out_ptr,
    # sizes; row m of x/out lives at (m // ROWS_INNER, m % ROWS_INNER) of its 3D view
    M, N, K, ROWS_INNER,
    # strides (the packed weight has unit stride along N)
    stride_xo, stride_xi, stride_xk,
    stride_wk,
    stride_oo, stride_oi, stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # N varies fastest across programs so consecutive programs share the same x rows in L2.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    # int64 rows: batch x tokens x features can pass 2**31 elements at large batch.
    rm64 = rm.to(tl.int64)
    x_rows = (rm64 // ROWS_INNER) * stride_xo + (rm64 % ROWS_INNER) * stride_xi
    x_ptrs = x_ptr + x_rows[:, None] + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rk[:, None] * stride_wk + rn[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        # Rows past M (batch 1 pads to a 16-row tile) and the K tail load zeros.
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    acc = activate(acc, ACT)
    out_rows = (rm64 // ROWS_INNER) * stride_oo + (rm64 % ROWS_INNER) * stride_oi
    out_ptrs = out_ptr + out_rows[:, None] + rn[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _as_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """View ``(..., F)`` as ``(outer, inner, F)`` without copying, so rows need only two strides."""
    if t.dim() == 1:
        return t.view(1, 1, -1)
    if t.dim() == 2:
        return t.unsqueeze(0)
    try:
        return t.view(-1, t.shape[-2], t.shape[-1])
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} and strides {t.stride()}: its leading dims "
            f"{tuple(t.shape[:-2])} cannot be merged without a copy; pass a view whose dims before "
            f"the last two are collapsible (e.g. make it contiguous)"
        ) from None


class Linear:
    """A Linear layer bound at compile time: weight packed once, then ``layer(x, out)`` per forward."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        *,
        activation: Optional[str] = None,
        dtype: torch.dtype = torch.float16,
        config: Optional[GemmConfig] = None,
        fp32_precision: str = "ieee",
    ) -> None:
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2D [out_features, in_features], got shape {tuple(weight.shape)}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
        if fp32_precision not in _FP32_PRECISIONS:
            raise ValueError(f"fp32_precision must be one of {_FP32_PRECISIONS}, got {fp32_precision!r}")
        n, k = weight.shape
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},) to match weight {tuple(weight.shape)}, "
                             f"got {tuple(bias.shape)}")
        self.out_features, self.in_features = n, k
        self.activation = activation
        self._act = activation_code(activation)
        self.dtype = dtype
        self.fp32_precision = fp32_precision
        # W^T as [K, N_pad] in the compute dtype: tiles of it load N-contiguous, matching tl.dot's
        # [BLOCK_K, BLOCK_N] operand; the padding columns are never read (masked by N).
        n_pad = triton.cdiv(n, _ROW_ALIGN) * _ROW_ALIGN
        packed = torch.zeros((k, n_pad), dtype=dtype, device=weight.device)
        packed[:, :n] = weight.detach().t().to(dtype)
        self.weight_t = packed
        # Bias stays fp32: it is added to the fp32 accumulator.
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self.configs = linear_configs(dtype)
        self.config = config  # None: default_config() picks one per call from the row count

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Write ``act(x @ W^T + bias)`` into ``out``; x is (..., K), out is (..., N)."""
        k, n = self.in_features, self.out_features
        if x.dim() < 1 or x.shape[-1] != k:
            raise ValueError(f"x must have shape (..., {k}), got {tuple(x.shape)}")
        if tuple(out.shape) != (*x.shape[:-1], n):
            raise ValueError(f"out must have shape {(*x.shape[:-1], n)} for x of shape "
                             f"{tuple(x.shape)}, got {tuple(out.shape)}")
        for name, t in (("x", x), ("out", out)):
            if t.dtype != self.dtype:
                raise ValueError(f"{name} must be {self.dtype} (the layer's dtype), got {t.dtype}")
            if t.device != self.weight_t.device:
                raise ValueError(f"{name} is on {t.device} but the weight is on {self.weight_t.device}")
        x3, o3 = _as_rows(x, "x"), _as_rows(out, "out")
        m = x3.shape[0] * x3.shape[1]
        if m == 0:
            return
        cfg = self.config or default_config(m, n, self.dtype)
        # The precision option only concerns fp32 operands; None keeps Triton's default for fp16.
        precision = self.fp32_precision if self.dtype == torch.float32 else None
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m))
        _linear_kernel[grid](
            x3, self.weight_t, self.bias if self.bias is not None else self.weight_t, o3,
            m, n, k, x3.shape[1],
            x3.stride(0), x3.stride(1), x3.stride(2),
            self.weight_t.stride(0),
            o3.stride(0), o3.stride(1), o3.stride(2),
            HAS_BIAS=self.bias is not None, ACT=self._act, PRECISION=precision,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    out: Optional[torch.Tensor] = None,
    config: Optional[GemmConfig] = None,
) -> torch.Tensor:
    """``act(x @ weight^T + bias)`` in x's dtype, allocating ``out`` when not given."""
    layer = Linear(weight, bias, activation=activation, dtype=x.dtype, config=config)
    if out is None:
        out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)
    layer(x, out)
    return out
