"""Triton helpers shared by every kernel's epilogue: the fused activations, and the Linear
kernels' (GEMM and GEMV) bias/activation/residual epilogue with its store, fp or int8.

``activate(x, ACT, ALPHA, BETA)`` is specialized at compile time on ``ACT``, the code from
``torch_gie.activations.activation_code``, and on the activation's parameters; it is applied to
the fp32 accumulator. ``activate_channels`` adds PReLU's per-channel slope.
"""
import triton
import triton.language as tl

from torch_gie.kernels.quant import dequantize, requantize


@triton.jit
def activate(x, ACT: tl.constexpr, ALPHA: tl.constexpr, BETA: tl.constexpr):
    """x -> act(x) in fp32. Codes follow torch_gie.activations.ACTIVATION_NAMES; ALPHA and BETA
    are the activation's parameters (``act_constexprs``). ``prelu`` needs its per-channel slope:
    use ``activate_channels``."""
    tl.static_assert(ACT != 16, "prelu needs its slope vector: call activate_channels")
    if ACT == 1:  # relu
        x = tl.maximum(x, 0.0)
    elif ACT == 2:  # relu6
        x = tl.minimum(tl.maximum(x, 0.0), 6.0)
    elif ACT == 3:  # silu
        x = x / (1.0 + tl.exp(-x))
    elif ACT == 4:  # hardswish
        x = x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0
    elif ACT == 5:  # hardsigmoid
        x = tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0
    elif ACT == 6:  # gelu (erf)
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 7:  # gelu (tanh approximation)
        x = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACT == 8:  # sigmoid
        x = 1.0 / (1.0 + tl.exp(-x))
    elif ACT == 9:  # leaky_relu, ALPHA = negative slope
        x = tl.where(x >= 0.0, x, x * ALPHA)
    elif ACT == 10:  # elu
        x = tl.where(x > 0.0, x, ALPHA * (tl.exp(tl.minimum(x, 0.0)) - 1.0))
    elif ACT == 11:  # mish = x * tanh(softplus(x))
        x = x * _tanh(_softplus(x))
    elif ACT == 12:  # tanh
        x = _tanh(x)
    elif ACT == 13:  # clamp(ALPHA, BETA)
        x = tl.minimum(tl.maximum(x, ALPHA), BETA)
    elif ACT == 14:  # selu
        neg = 1.6732632423543772 * (tl.exp(tl.minimum(x, 0.0)) - 1.0)
        x = 1.0507009873554805 * tl.where(x > 0.0, x, neg)
    elif ACT == 15:  # softplus (beta 1, threshold 20, as PyTorch)
        x = _softplus(x)
    return x


@triton.jit
def _tanh(x):
    # Through exp for portability across Triton versions; saturates to +-1 without NaN.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def activate_channels(x, cols, slope_ptr, ACT: tl.constexpr, ALPHA: tl.constexpr,
                      BETA: tl.constexpr):
    """``activate`` on a [rows, channels] tile whose column j is channel cols[j]; ``prelu``
    (code 16) reads its per-channel slope from slope_ptr (cols must be in range)."""
    if ACT == 16:
        slope = tl.load(slope_ptr + cols).to(tl.float32)[None, :]
        x = tl.where(x > 0.0, x, x * slope)
    else:
        x = activate(x, ACT, ALPHA, BETA)
    return x


@triton.jit
def linear_epilogue(acc, rm, rn, M, N, ROWS_INNER, bias_ptr, res_ptr, out_ptr, slope_ptr, scale_ptr,
                    stride_ro, stride_ri, stride_rn, stride_oo, stride_oi, stride_on,
                    res_scale, out_inv_scale,
                    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ACT_ALPHA: tl.constexpr,
                    ACT_BETA: tl.constexpr, HAS_RES: tl.constexpr, POST_ACT: tl.constexpr,
                    POST_ACT_ALPHA: tl.constexpr, POST_ACT_BETA: tl.constexpr,
                    QUANT: tl.constexpr, RES_QUANT: tl.constexpr, RES_ZP: tl.constexpr,
                    OUT_QUANT: tl.constexpr, OUT_ZP: tl.constexpr):
    """The Linear kernels' epilogue and store: acc [rows rm, columns rn] in fp32 ->
    post_act(act(acc + bias) + residual) -> out. Row m lives at (m // ROWS_INNER, m % ROWS_INNER)
    of the 3D residual/output views; PReLU's slope (slope_ptr) is per output feature (column).

    int8 (``quant.arith``): with QUANT, acc is the int32 sum of codes and is first scaled by the
    combined scale ``scale_ptr[n]`` (bias_ptr then holds the folded bias); with RES_QUANT the
    residual holds codes (res_scale, RES_ZP); with OUT_QUANT the result is requantized
    (out_inv_scale, OUT_ZP) instead of cast to out's dtype."""
    n_ok = rn < N
    mask = (rm < M)[:, None] & n_ok[None, :]
    # Columns past N are clamped for the slope and scale loads (the store drops them).
    cols = tl.minimum(rn, N - 1)
    if QUANT:
        acc = acc.to(tl.float32) * tl.load(scale_ptr + cols)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    acc = activate_channels(acc, cols, slope_ptr, ACT, ACT_ALPHA, ACT_BETA)
    rm64 = rm.to(tl.int64)  # batch x tokens x features can pass 2**31 elements
    row_o = rm64 // ROWS_INNER
    row_i = rm64 % ROWS_INNER
    if HAS_RES:
        res_ptrs = res_ptr + (row_o * stride_ro + row_i * stride_ri)[:, None] + rn[None, :] * stride_rn
        res = tl.load(res_ptrs, mask=mask, other=0)
        if RES_QUANT:
            acc += dequantize(res, res_scale, RES_ZP)
        else:
            acc += res.to(tl.float32)
        acc = activate_channels(acc, cols, slope_ptr, POST_ACT, POST_ACT_ALPHA, POST_ACT_BETA)
    out_ptrs = out_ptr + (row_o * stride_oo + row_i * stride_oi)[:, None] + rn[None, :] * stride_on
    if OUT_QUANT:
        tl.store(out_ptrs, requantize(acc, out_inv_scale, OUT_ZP), mask=mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
