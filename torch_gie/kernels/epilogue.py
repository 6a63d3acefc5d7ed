"""Triton helpers shared by every kernel's epilogue: the fused activations, and the Linear
kernels' (GEMM and GEMV) bias/activation/residual epilogue with its store.

``activate(x, ACT)`` is specialized at compile time on ``ACT``, the code from
``torch_gie.activations.activation_code``; it is applied to the fp32 accumulator.
"""
import triton
import triton.language as tl


@triton.jit
def activate(x, ACT: tl.constexpr):
    # Codes follow torch_gie.activations.ACTIVATION_NAMES.
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
    elif ACT == 7:  # gelu (tanh approximation), tanh written through exp for portability
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
        x = 0.5 * x * (1.0 + t)
    elif ACT == 8:  # sigmoid
        x = 1.0 / (1.0 + tl.exp(-x))
    return x


@triton.jit
def linear_epilogue(acc, rm, rn, M, N, ROWS_INNER, bias_ptr, res_ptr, out_ptr, slope_ptr,
                    stride_ro, stride_ri, stride_rn, stride_oo, stride_oi, stride_on,
                    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ACT_ALPHA: tl.constexpr,
                    ACT_BETA: tl.constexpr, HAS_RES: tl.constexpr, POST_ACT: tl.constexpr,
                    POST_ACT_ALPHA: tl.constexpr, POST_ACT_BETA: tl.constexpr):
    """The Linear kernels' epilogue and store: acc [rows rm, columns rn] in fp32 ->
    post_act(act(acc + bias) + residual) -> out. Row m lives at (m // ROWS_INNER, m % ROWS_INNER)
    of the 3D residual/output views; PReLU's slope (slope_ptr) is per output feature (column)."""
    n_ok = rn < N
    mask = (rm < M)[:, None] & n_ok[None, :]
    # Columns past N are clamped for the slope loads (the store drops them).
    cols = tl.minimum(rn, N - 1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    acc = activate_channels(acc, cols, slope_ptr, ACT, ACT_ALPHA, ACT_BETA)
    rm64 = rm.to(tl.int64)  # batch x tokens x features can pass 2**31 elements
    row_o = rm64 // ROWS_INNER
    row_i = rm64 % ROWS_INNER
    if HAS_RES:
        res_ptrs = res_ptr + (row_o * stride_ro + row_i * stride_ri)[:, None] + rn[None, :] * stride_rn
        acc += tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc = activate_channels(acc, cols, slope_ptr, POST_ACT, POST_ACT_ALPHA, POST_ACT_BETA)
    out_ptrs = out_ptr + (row_o * stride_oo + row_i * stride_oi)[:, None] + rn[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
