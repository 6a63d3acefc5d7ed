"""Triton helpers of the int8 dtype path, shared by every kernel family: codes to real values
and back, with exactly the arithmetic of ``torch_gie.quantize.arith`` (see its docstring).

Rounding is half to even, as ``torch.round``: after clamping to the code range, adding and
subtracting 1.5 * 2**23 rounds an fp32 to the nearest integer, ties to even, under the default
rounding mode; unlike libdevice's ``rint`` it also runs in Triton's CPU interpreter.
"""
import triton
import triton.language as tl

_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23; a constexpr: compiled kernels read no plain globals


@triton.jit
def round_half_even(y):
    """fp32 -> nearest integer (ties to even), as fp32; |y| must be < 2**22."""
    return (y + _ROUND_MAGIC) - _ROUND_MAGIC


@triton.jit
def requantize(y, inv_scale, zero_point):
    """fp32 values -> int8 codes: clamp(rint(y * inv_scale) + zero_point, -128, 127).
    Clamped before rounding, to the integer bounds [-128 - z, 127 - z]: rounding is monotonic
    and keeps integers, so this equals clamping after, with one clamp instead of two (the
    bounds also keep the rounding trick exact; a NaN lands on the lower bound either way, as
    PTX max returns the other operand)."""
    q = y.to(tl.float32) * inv_scale
    q = tl.minimum(tl.maximum(q, -128.0 - zero_point), 127.0 - zero_point)
    # round_half_even(q) + zero_point in two adds: q + M is M + rint(q) exactly, and M - z is an
    # exact fp32 integer, so the difference is rint(q) + z exactly.
    return ((q + _ROUND_MAGIC) - (_ROUND_MAGIC - zero_point)).to(tl.int8)


@triton.jit
def dequantize(codes, scale, zero_point):
    """int8 codes -> fp32 real values: (code - zero_point) * scale."""
    return (codes.to(tl.float32) - zero_point) * scale


@triton.jit
def load_codes(ptrs, mask, FILL: tl.constexpr):
    """A masked load of int8 codes whose masked-out lanes read ``FILL`` (a zero point, or -128
    so a max never picks them). Loaded with 0 then selected: Triton 3.6 packs a negative int8
    ``other`` sign-extended into the registers of a vectorized load, so the masked lanes of a
    4-byte vector read (-128, -1, -1, -1) instead of -128 four times (seen in sm_90 PTX:
    ``mov.u32 %r, 0xffffffffffffff80``). With FILL 0 this is a plain load."""
    v = tl.load(ptrs, mask=mask, other=0)
    if FILL != 0:
        v = tl.where(mask, v, FILL)
    return v
