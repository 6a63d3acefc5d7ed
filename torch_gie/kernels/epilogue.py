"""Triton helpers shared by every kernel's epilogue: the fused activations.

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
