"""GEMM for Linear layers: ``out = post_act(act(x @ W^T + bias) + residual)`` in one launch.

With x viewed as rows ``[M, K]`` (M = product of the leading dims) and W packed once as
``W^T [K, N]``, each program computes one ``BLOCK_M x BLOCK_N`` tile of the output, accumulating
in fp32 over K; the epilogue (bias, activation, optional residual and post-activation, as in
``ops.Epilogue``) runs on the fp32 accumulator before the single store.

int8 (``dtype=torch.int8``, see ``quantize.arith``): x holds codes, W is quantized per output
feature and packed K-major (``[N, K]``: Hopper's int8 tensor cores want K-contiguous B tiles),
tl.dot sums code products in int32 and the epilogue starts from ``acc * combined[n] +
folded_bias[n]``; the output is requantized to codes or stored as fp16/fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch_gie.activations import ActLike
from torch_gie.kernels.epilogue import linear_epilogue
from torch_gie.kernels.gemv import (
    GEMV_MAX_ROWS,
    NO_QUANT,
    check_gemv_config,
    gemv_configs,
    launch_gemv,
    pack_gemv_weight,
)
from torch_gie.kernels.layer_args import bind_activations
from torch_gie.kernels.quant import load_codes
from torch_gie.quantize.arith import LayerQuant, fold_zero_point, quantize_weight

_DTYPES = (torch.float16, torch.float32, torch.int8)
_REAL_DTYPES = (torch.float16, torch.float32)
_FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")
# Packed weight rows are padded to this many elements so every row starts 16-element aligned,
# which lets Triton prove vectorized weight loads are legal whatever N is (1000 for ImageNet).
_ROW_ALIGN = 16
# Roughly the SM count of an H100: below this many tiles the GPU is mostly idle, so the default
# config shrinks the tile instead (no split-K: it would need a zeroed output or a workspace).
_TARGET_PROGRAMS = 128
_SMEM_BUDGET = 160 * 1024  # bytes of shared memory a config's pipeline stages may take
_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> dict:
    return dict(zip(_CONFIG_KEYS, (bm, bn, bk, warps, stages), strict=True))


def _min_block_k(dtype: torch.dtype) -> int:
    # int8 tensor-core dots need K >= 32 on the GPU (the interpreter accepts any).
    return 32 if dtype == torch.int8 else 16


def linear_configs(dtype: torch.dtype = torch.float16) -> list[dict]:
    """Candidate tilings for the tuner, skinny (batch 1) to large, that fit shared memory.

    Each is a dict with keys BLOCK_M, BLOCK_N, BLOCK_K (powers of two >= 16, as tl.dot requires;
    int8: BLOCK_K >= 32), num_warps and num_stages, the same form the conv kernels use.
    """
    candidates = [
        # M <= 16 (batch 1..16): weight-bandwidth bound, so many narrow programs, long K steps.
        _cfg(16, 16, 256, 2, 4),
        _cfg(16, 32, 128, 4, 4),
        _cfg(16, 64, 128, 4, 4),
        _cfg(32, 32, 128, 4, 4),
        _cfg(32, 64, 64, 4, 4),
        _cfg(64, 64, 64, 4, 4),
        _cfg(64, 128, 64, 4, 3),
        _cfg(128, 64, 64, 4, 3),
        _cfg(128, 128, 32, 8, 4),
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 256, 64, 8, 3),
    ]
    if dtype == torch.int8:  # one byte per element: twice the K depth for the same shared memory
        candidates = [{**c, "BLOCK_K": 2 * c["BLOCK_K"]} for c in candidates]
    size = dtype.itemsize
    return [c for c in candidates if (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * size
            * c["num_stages"] <= _SMEM_BUDGET]


def default_config(m: int, n: int, dtype: torch.dtype = torch.float16) -> dict:
    """The largest tile that still yields enough programs to fill the GPU, else the smallest."""
    configs = linear_configs(dtype)
    pool = [c for c in configs if (c["BLOCK_M"] == 16) == (m <= 16)]
    by_size = sorted(pool, key=lambda c: (c["BLOCK_M"] * c["BLOCK_N"], c["BLOCK_K"]), reverse=True)
    for c in by_size:
        if triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]) >= _TARGET_PROGRAMS:
            return c
    return by_size[-1]


def check_config(config: dict, dtype: torch.dtype = torch.float16) -> dict:
    """Validate a tiling (GPU limits the interpreter does not check) and return a copy."""
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"config is missing {missing}; expected keys {_CONFIG_KEYS}")
    for key in _CONFIG_KEYS[:3]:
        v = config[key]
        if v < 16 or v & (v - 1):
            raise ValueError(f"config {key} must be a power of two >= 16 (tl.dot), got {v}")
    if config["BLOCK_K"] < _min_block_k(dtype):
        raise ValueError(f"config BLOCK_K must be >= {_min_block_k(dtype)} for {dtype} "
                         f"(tensor-core dot), got {config['BLOCK_K']}")
    return {key: config[key] for key in _CONFIG_KEYS}  # extra keys would reach the launch


@triton.jit
def _linear_kernel(
    # pointers; slope_ptr: PReLU's fp32 slope per output feature; scale_ptr: int8's combined
    # fp32 scale per output feature (bias_ptr then holds the folded bias)
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, slope_ptr, scale_ptr,
    # sizes; row m of x/res/out lives at (m // ROWS_INNER, m % ROWS_INNER) of its 3D view
    M, N, K, ROWS_INNER,
    # strides (fp: W^T [K, N], stride_wn 1; int8: W [N, K], stride_wk 1)
    stride_xo, stride_xi, stride_xk,
    stride_wk, stride_wn,
    stride_ro, stride_ri, stride_rn,
    stride_oo, stride_oi, stride_on,
    res_scale, out_inv_scale,  # int8 residual's scale, output's 1 / scale (quant.arith)
    # meta-parameters; activations as (code, alpha, beta), see act_constexprs
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ACT_ALPHA: tl.constexpr, ACT_BETA: tl.constexpr,
    HAS_RES: tl.constexpr, POST_ACT: tl.constexpr, POST_ACT_ALPHA: tl.constexpr,
    POST_ACT_BETA: tl.constexpr, PRECISION: tl.constexpr,
    # int8: x and w are codes, dotted into int32; x's zero point fills masked loads
    QUANT: tl.constexpr, X_ZP: tl.constexpr, RES_QUANT: tl.constexpr, RES_ZP: tl.constexpr,
    OUT_QUANT: tl.constexpr, OUT_ZP: tl.constexpr,
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
    # Triton specializes the unit stride, so either packing loads contiguous vectors.
    w_ptrs = w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn

    if QUANT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        # Rows past M (batch 1 pads to a 16-row tile) and the K tail load zeros (int8: the zero
        # point, real 0; the weight's K tail is 0 either way).
        a = load_codes(x_ptrs, m_ok[:, None] & k_ok[None, :], X_ZP)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        if QUANT:
            acc = tl.dot(a, b, acc, out_dtype=acc.dtype)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    linear_epilogue(acc, rm, rn, M, N, ROWS_INNER, bias_ptr, res_ptr, out_ptr, slope_ptr, scale_ptr,
                    stride_ro, stride_ri, stride_rn, stride_oo, stride_oi, stride_on,
                    res_scale, out_inv_scale,
                    HAS_BIAS, ACT, ACT_ALPHA, ACT_BETA, HAS_RES, POST_ACT, POST_ACT_ALPHA,
                    POST_ACT_BETA, QUANT, RES_QUANT, RES_ZP, OUT_QUANT, OUT_ZP)


def quant_args(quant: LayerQuant) -> dict:
    """The int8 arguments of the Linear kernels (``gemv.NO_QUANT`` when not quantized)."""
    res, out = quant.residual, quant.output
    return dict(res_scale=1.0 if res is None else res.scale,
                out_inv_scale=1.0 if out is None else out.inv_scale,
                QUANT=True, X_ZP=quant.input.zero_point,
                RES_QUANT=res is not None, RES_ZP=0 if res is None else res.zero_point,
                OUT_QUANT=out is not None, OUT_ZP=0 if out is None else out.zero_point)


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
    """A Linear layer bound at build time: the weight is packed once, then
    ``layer(x, out[, residual])`` writes ``post_act(act(x @ W^T + bias) + residual)`` every
    forward and allocates nothing. ``configs`` lists candidate tilings for the tuner; ``config``
    (settable) is the one used. Given ``rows`` <= GEMV_MAX_ROWS (the row count it will be
    called with, e.g. batch 1), it runs the matrix-vector kernel of ``gemv.py`` instead of the
    GEMM; other row counts still work, at GEMV speed. ``activation`` and ``post_activation`` are
    an ``Act``, a name or None; ``act_slope`` (fp32 [out_features]) is PReLU's slope per output
    feature, for whichever of the two is prelu (it matches ``nn.PReLU`` on 2D (rows, features)
    outputs, where dim 1 is the feature).

    int8: ``dtype=torch.int8, quant=LayerQuant(...)`` with the float weight; the layer quantizes
    it per output feature and folds the input's zero point into the bias (``quantize.arith``).
    x holds codes of ``quant.input``; out holds codes of ``quant.output`` (int8), or real values
    in ``quant.out_dtype`` when that is None; the residual holds codes of ``quant.residual``, or
    real fp16/fp32 values when that is None."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        activation: ActLike = None,
        post_activation: ActLike = None,
        act_slope: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float16,
        config: dict | None = None,
        fp32_precision: str = "ieee",
        rows: int | None = None,
        quant: LayerQuant | None = None,
    ) -> None:
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2D [out_features, in_features], "
                             f"got shape {tuple(weight.shape)}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
        if (dtype == torch.int8) != (quant is not None):
            raise ValueError(f"an int8 Linear needs quant=LayerQuant(...) and only an int8 one takes "
                             f"it, got dtype {dtype} and quant {quant}")
        if quant is not None and quant.output is None and quant.out_dtype not in _REAL_DTYPES:
            raise ValueError(f"quant.out_dtype must be one of {_REAL_DTYPES}, got {quant.out_dtype}")
        if fp32_precision not in _FP32_PRECISIONS:
            raise ValueError(f"fp32_precision must be one of {_FP32_PRECISIONS}, "
                             f"got {fp32_precision!r}")
        n, k = weight.shape
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},) to match weight {tuple(weight.shape)}, "
                             f"got {tuple(bias.shape)}")
        self.out_features, self.in_features = n, k
        # post_activation follows the residual, so it applies only to calls given one.
        self.activation, self.post_activation, self.act_slope, self._act_constexprs = \
            bind_activations(activation, post_activation, act_slope, n, weight.device)
        # The integer codes are part of the tuner's layer signature (timing-cache keys).
        self._act, self._post_act = self._act_constexprs["ACT"], self._act_constexprs["POST_ACT"]
        self.dtype = dtype
        self.quant = quant
        self.fp32_precision = fp32_precision
        # Built for at most GEMV_MAX_ROWS rows (batch 1 classifiers): matrix-vector kernel on W
        # [N, K] (gemv.py); otherwise the GEMM on W^T. The layer holds only the layout it uses.
        self.gemv = rows is not None and rows <= GEMV_MAX_ROWS
        self.scale = None  # int8: the combined scale s_x * s_w[n] (fp32 [N])
        if quant is not None:
            w_codes, w_scale = quantize_weight(weight)
            self.scale, folded = fold_zero_point(bias, w_codes, w_scale, quant.input)
            self.scale = self.scale.to(weight.device)
            bias = folded.to(weight.device)
        if self.gemv:
            self.weight = pack_gemv_weight(weight if quant is None else w_codes, dtype, _ROW_ALIGN)
            self.configs = gemv_configs()
        elif quant is not None:
            # int8 GEMM: K-major W [N, K_pad], the GEMV packing; tiles of it are tl.dot's
            # [BLOCK_K, BLOCK_N] operand with K contiguous.
            self.weight = pack_gemv_weight(w_codes, dtype, _ROW_ALIGN)
            self.configs = linear_configs(dtype)
        else:
            # W^T as [K, N_pad] in the compute dtype: tiles of it load N-contiguous, matching tl.dot's
            # [BLOCK_K, BLOCK_N] operand; the padding columns are never read (masked by N).
            n_pad = triton.cdiv(n, _ROW_ALIGN) * _ROW_ALIGN
            packed = torch.zeros((k, n_pad), dtype=dtype, device=weight.device)
            packed[:, :n] = weight.detach().t().to(dtype)
            self.weight_t = packed
            self.configs = linear_configs(dtype)
        # Bias stays fp32: it is added to the fp32 accumulator (int8: the folded bias).
        self.bias = (None if bias is None
                     else bias.detach().to(weight.device, torch.float32).contiguous())
        self._quant_args = NO_QUANT if quant is None else quant_args(quant)
        self.config = config

    @property
    def config(self) -> dict | None:
        """The tiling used; None (the default) picks one per call from the row count."""
        return self._config

    @config.setter
    def config(self, config: dict | None) -> None:
        if config is None:
            self._config = None
        else:
            self._config = check_gemv_config(config) if self.gemv else check_config(config, self.dtype)

    def config_for(self, m: int) -> dict:
        """The tiling a call with ``m`` rows uses: ``config``, else the default for ``m``."""
        if self.gemv:
            return self.config or self.configs[0]
        return self.config or default_config(m, self.out_features, self.dtype)

    @property
    def packed_weight(self) -> torch.Tensor:
        """fp GEMM: W^T [K, N_pad]; GEMV and int8: W [N, K_pad]."""
        return self.weight_t if hasattr(self, "weight_t") else self.weight

    def _check_io(self, x: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None) -> None:
        k, n = self.in_features, self.out_features
        if x.dim() < 1 or x.shape[-1] != k:
            raise ValueError(f"x must have shape (..., {k}), got {tuple(x.shape)}")
        if tuple(out.shape) != (*x.shape[:-1], n):
            raise ValueError(f"out must have shape {(*x.shape[:-1], n)} for x of shape "
                             f"{tuple(x.shape)}, got {tuple(out.shape)}")
        if residual is not None and residual.shape != out.shape:
            raise ValueError(f"residual must have out's shape {tuple(out.shape)}, "
                             f"got {tuple(residual.shape)}")
        q = self.quant
        dtypes = {"x": (self.dtype,), "out": (self.dtype,), "residual": (self.dtype,)}
        if q is not None:
            dtypes["out"] = (q.store_dtype,)
            dtypes["residual"] = (torch.int8,) if q.residual is not None else _REAL_DTYPES
        for name, t in (("x", x), ("out", out), ("residual", residual)):
            if t is None:
                continue
            if t.dtype not in dtypes[name]:
                want = " or ".join(str(d) for d in dtypes[name])
                raise ValueError(f"{name} must be {want} (the layer's dtype/quant), got {t.dtype}")
            if t.device != self.packed_weight.device:
                raise ValueError(f"{name} is on {t.device} but the weight is on "
                                 f"{self.packed_weight.device}")

    def __call__(self, x: torch.Tensor, out: torch.Tensor,
                 residual: torch.Tensor | None = None) -> None:
        """Write the layer's output into ``out``; x is (..., K), out and residual (..., N)."""
        self._check_io(x, out, residual)
        k, n = self.in_features, self.out_features
        x3, o3 = _as_rows(x, "x"), _as_rows(out, "out")
        r3 = o3 if residual is None else _as_rows(residual, "residual")
        m = x3.shape[0] * x3.shape[1]
        if m == 0:
            return
        cfg = self.config_for(m)
        if self.gemv:
            launch_gemv(x3, self.weight, self.bias, r3, o3, self.act_slope, m,
                        self._act_constexprs, residual is not None, cfg, self.scale,
                        self._quant_args)
            return
        # The precision only matters for fp32 operands; "tf32" is Triton's own default, so fp16
        # compiles exactly as if none were given (as in conv2d).
        precision = self.fp32_precision if self.dtype == torch.float32 else "tf32"
        w = self.packed_weight
        # fp: W^T [K, N_pad] (unit stride along N); int8: W [N, K_pad] (unit stride along K)
        stride_wk, stride_wn = (w.stride(0), 1) if self.quant is None else (1, w.stride(0))
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]))
        _linear_kernel[grid](
            x3, w, self.bias if self.bias is not None else w, r3, o3,
            self.act_slope, w if self.scale is None else self.scale,
            m, n, k, x3.shape[1],
            x3.stride(0), x3.stride(1), x3.stride(2),
            stride_wk, stride_wn,
            r3.stride(0), r3.stride(1), r3.stride(2),
            o3.stride(0), o3.stride(1), o3.stride(2),
            **self._quant_args,
            HAS_BIAS=self.bias is not None, HAS_RES=residual is not None, **self._act_constexprs,
            PRECISION=precision,
            **cfg,
        )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: ActLike = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    *,
    residual: torch.Tensor | None = None,
    post_activation: ActLike = None,
    act_slope: torch.Tensor | None = None,
    quant: LayerQuant | None = None,
) -> torch.Tensor:
    """``post_act(act(x @ weight^T + bias) + residual)`` in x's dtype (no residual: just
    ``act(x @ weight^T + bias)``), allocating ``out`` when not given (int8 x: codes of
    ``quant.input``, out in ``quant.store_dtype``)."""
    layer = Linear(weight, bias, activation=activation, post_activation=post_activation,
                   act_slope=act_slope, dtype=x.dtype, config=config, quant=quant)
    if out is None:
        store = x.dtype if quant is None else quant.store_dtype
        out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=store, device=x.device)
    layer(x, out, residual)
    return out
