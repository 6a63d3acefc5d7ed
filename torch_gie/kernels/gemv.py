"""Matrix-vector kernel for Linear layers called with a few rows (batch 1 classifiers).

At batch 1 a Linear layer reads its whole weight to produce one row: it is bound by memory
bandwidth, and the GEMM kernel's tl.dot tiles (16 rows minimum, 15 of them padding) give only
N / BLOCK_N programs, too few to keep the memory system busy (ResNet-50's 2048 -> 1000 fc: 63
programs, 12.6 us where reading 4 MB needs 1.4 us). Here the weight is packed as [N, K] (each
output's weights one contiguous run), every program reduces BLOCK_N whole rows of it against
one input row with fp32 FMAs (exact for fp32: no TF32), so N = 1000 gives 125-250 programs
streaming long contiguous rows; the epilogue is the GEMM's (``linear_epilogue``). int8 layers
(codes, ``quantize.arith``) use the same [N, K] packing and sum code products in int32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch_gie.kernels.epilogue import linear_epilogue
from torch_gie.kernels.quant import load_codes

GEMV_MAX_ROWS = 4  # up to this many rows the weight is read once per row from L2: still cheaper
_CONFIG_KEYS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
# The int8 arguments of the Linear kernels when the layer is not quantized.
NO_QUANT = dict(res_scale=1.0, out_inv_scale=1.0, QUANT=False, X_ZP=0, RES_QUANT=False, RES_ZP=0,
                OUT_QUANT=False, OUT_ZP=0)


def gemv_configs() -> list[dict]:
    """Candidate tilings for the tuner, best guess first: BLOCK_N output rows of BLOCK_K weights
    per loop step (a [BLOCK_N, BLOCK_K] register tile: 2K..4K elements over the warps)."""
    tiles = ((8, 256, 4, 3), (4, 512, 4, 3), (16, 256, 8, 3), (8, 512, 8, 3), (4, 256, 2, 4),
             (16, 128, 4, 4), (2, 512, 2, 4), (32, 128, 8, 3))
    return [{**dict(zip(_CONFIG_KEYS, t, strict=True)), "GEMV": True} for t in tiles]


def check_gemv_config(config: dict) -> dict:
    """Validate a GEMV tiling (power-of-two blocks: tl.arange spans powers of two) and return a copy."""
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing or not config.get("GEMV"):
        raise ValueError(f"a GEMV config needs keys {_CONFIG_KEYS} and GEMV=True, got {config}")
    for key in ("BLOCK_N", "BLOCK_K"):
        v = config[key]
        if v < 1 or v & (v - 1):
            raise ValueError(f"config {key} must be a power of two, got {v}")
    return {key: config[key] for key in (*_CONFIG_KEYS, "GEMV")}


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, slope_ptr, scale_ptr,
    M, N, K, ROWS_INNER,
    stride_xo, stride_xi, stride_xk, stride_wn,
    stride_ro, stride_ri, stride_rn, stride_oo, stride_oi, stride_on,
    res_scale, out_inv_scale,  # int8 residual's scale, output's 1 / scale (quant.arith)
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ACT_ALPHA: tl.constexpr, ACT_BETA: tl.constexpr,
    HAS_RES: tl.constexpr, POST_ACT: tl.constexpr, POST_ACT_ALPHA: tl.constexpr,
    POST_ACT_BETA: tl.constexpr,
    # int8: x and w are codes summed in int32; x's zero point fills masked loads
    QUANT: tl.constexpr, X_ZP: tl.constexpr, RES_QUANT: tl.constexpr, RES_ZP: tl.constexpr,
    OUT_QUANT: tl.constexpr, OUT_ZP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Columns past N wrap onto valid rows of the weight: no load mask along N (the store masks).
    w_rows = w_ptr + (rn % N).to(tl.int64)[:, None] * stride_wn + rk[None, :]
    m64 = m.to(tl.int64)
    x_row = x_ptr + (m64 // ROWS_INNER) * stride_xo + (m64 % ROWS_INNER) * stride_xi
    if QUANT:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)  # exact: |acc| < 2**31 for K < 2**17
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        xk = load_codes(x_row + (k0 + rk) * stride_xk, k_ok, X_ZP).to(acc.dtype)
        w = tl.load(w_rows + k0, mask=k_ok[None, :], other=0).to(acc.dtype)
        acc += w * xk[None, :]
    y = tl.sum(acc, axis=1)[None, :]  # [1, BLOCK_N]: one output row
    linear_epilogue(y, m + tl.arange(0, 1), rn, M, N, ROWS_INNER, bias_ptr, res_ptr, out_ptr,
                    slope_ptr, scale_ptr, stride_ro, stride_ri, stride_rn, stride_oo, stride_oi,
                    stride_on, res_scale, out_inv_scale,
                    HAS_BIAS, ACT, ACT_ALPHA, ACT_BETA, HAS_RES, POST_ACT, POST_ACT_ALPHA,
                    POST_ACT_BETA, QUANT, RES_QUANT, RES_ZP, OUT_QUANT, OUT_ZP)


def pack_gemv_weight(weight: torch.Tensor, dtype: torch.dtype, align: int) -> torch.Tensor:
    """[N, K] in ``dtype`` with rows padded to a multiple of ``align`` elements (aligned row
    starts let the row loads vectorize); the padding is never read (masked by K)."""
    n, k = weight.shape
    packed = torch.zeros((n, triton.cdiv(k, align) * align), dtype=dtype, device=weight.device)
    packed[:, :k] = weight.detach().to(dtype)
    return packed


def launch_gemv(x3, weight, bias, r3, o3, slope, m: int, activations: dict, has_res: bool,
                cfg: dict, scale=None, quant: dict | None = None) -> None:
    """out rows (3D views, see gemm._as_rows) = epilogue(x rows @ weight[N, K]^T); activations
    holds the ACT*/POST_ACT* constexprs (``act_constexprs``), slope PReLU's fp32 [N] (or None).
    int8: x and weight hold codes, ``scale`` is the combined fp32 scale [N] and ``quant`` the
    int8 arguments of ``gemm.quant_args``."""
    n, k = o3.shape[2], x3.shape[2]
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), m)
    _gemv_kernel[grid](
        x3, weight, bias if bias is not None else weight, r3, o3, slope,
        weight if scale is None else scale,
        m, n, k, x3.shape[1],
        x3.stride(0), x3.stride(1), x3.stride(2), weight.stride(0),
        r3.stride(0), r3.stride(1), r3.stride(2), o3.stride(0), o3.stride(1), o3.stride(2),
        **(quant or NO_QUANT),
        HAS_BIAS=bias is not None, HAS_RES=has_res, **activations,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
