"""Triton helpers of the int8 dtype path, shared by every kernel family: codes to real values
and back, with exactly the arithmetic of ``torch_gie.quantize.arith`` (see its docstring).

Rounding is half to even, as ``torch.round``: after clamping to the code range, adding
M = 1.5 * 2**23 rounds an fp32 to the nearest integer, ties to even, under the default rounding
mode, and the code is then the sum's low mantissa byte; the way back adds a code to M's bit
pattern. Neither direction converts between int and float (I2F/F2I issue at an eighth of the FMA
rate on sm_90), and unlike libdevice's ``rint`` both run in Triton's CPU interpreter too.
"""
import functools
import os

import torch
import triton
import triton.language as tl

_ROUND_MAGIC = tl.constexpr(12582912.0)  # M = 1.5 * 2**23; a constexpr: compiled kernels read no plain globals
_MAGIC_BITS = tl.constexpr(0x4B400000)  # M's fp32 bit pattern


@triton.jit
def requantize(y, inv_scale, zero_point):
    """fp32 values -> int8 codes: clamp(rint(y * inv_scale) + zero_point, -128, 127)."""
    return round_to_codes(y.to(tl.float32) * inv_scale, zero_point)


@triton.jit
def round_to_codes(q, zero_point):
    """Values already in code units (y * inv_scale, fp32) -> int8 codes:
    clamp(rint(q) + zero_point, -128, 127). Clamped before rounding, to the integer bounds
    [-128 - z, 127 - z]: rounding is monotonic and keeps integers, so this equals clamping
    after, with one clamp instead of two (the bounds also keep the rounding trick exact; a NaN
    lands on the lower bound either way, as PTX max returns the other operand)."""
    q = tl.minimum(tl.maximum(q, -128.0 - zero_point), 127.0 - zero_point)
    # q + (M + z) is the integer M + z + rint(q) exactly (M + z is an even integer and the sum
    # stays in [2**23, 2**24), where fp32's spacing is 1), so the float's low mantissa byte is
    # z + rint(q) mod 256 (M is a multiple of 256): the code, read from the bits. No
    # float-to-integer conversion: F2I issues at an eighth of the FMA rate on sm_90, and an int8
    # epilogue is issue-bound (benchmarks/NOTES.md 54).
    return (q + (_ROUND_MAGIC + zero_point)).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def dequantize(codes, scale, zero_point):
    """int8 codes -> fp32 real values: (code - zero_point) * scale. Through the bits, exactly:
    M's bit pattern plus the sign-extended code is the float M + code (spacing 1 in
    [2**23, 2**24)), and subtracting M + z leaves code - z. Integer adds instead of an
    int-to-float conversion (I2F, an eighth of the FMA rate on sm_90)."""
    f = (codes.to(tl.int32) + _MAGIC_BITS).to(tl.float32, bitcast=True)
    return (f - (_ROUND_MAGIC + zero_point)) * scale


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


# A bytewise max of int8 codes held four to an int32 word (``pool2d``'s word kernel) in three
# steps: split_code_words once per loaded word, max_code_pairs per tap, merge_code_words once per
# output word. With ASM (NVIDIA sm_90 and later) a word splits into its even and odd bytes as
# sign-extended halfword pairs (``prmt``), which ``max.s16x2`` compares two at a time: 2 + 2
# instructions per four codes per tap, where codes loaded one by one take about four per code
# (extract, sign-extend, max). Without ASM (Triton's interpreter runs no PTX; older GPUs lack
# ``max.s16x2``) both halves are the word itself and the max is bytewise in plain integer ops,
# so the three compose to the same bytewise max.


@triton.jit
def split_code_words(w, ASM: tl.constexpr):
    """(even, odd): the word's bytes 0 and 2, and 1 and 3, as sign-extended halfword pairs."""
    if ASM:
        return tl.inline_asm_elementwise(
            asm="prmt.b32 $0, $2, 0, 0xA280;\n\tprmt.b32 $1, $2, 0, 0xB391;",
            constraints="=r,=r,r", args=[w], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        return w, w


@triton.jit
def max_code_pairs(a, b, ASM: tl.constexpr):
    """Elementwise max of split_code_words halves."""
    if ASM:
        return tl.inline_asm_elementwise(asm="max.s16x2 $0, $1, $2;", constraints="=r,r,r",
                                         args=[a, b], dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = tl.zeros_like(a)
        for i in tl.static_range(4):
            # byte i sign-extended: shifted to the top, then arithmetic-shifted down
            m = tl.maximum((a << (24 - 8 * i)) >> 24, (b << (24 - 8 * i)) >> 24)
            out = out | ((m & 0xFF) << (8 * i))
        return out


@triton.jit
def merge_code_words(even, odd, ASM: tl.constexpr):
    """split_code_words undone: the word of four codes."""
    if ASM:
        return tl.inline_asm_elementwise(asm="prmt.b32 $0, $1, $2, 0x6240;", constraints="=r,r,r",
                                         args=[even, odd], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return even


def packed_max_supported(device) -> bool:
    """Whether the code-word helpers' ASM path (``max.s16x2``) compiles for ``device``: an NVIDIA GPU of compute
    capability 9.0 or later (``max.s16x2``), outside Triton's CPU interpreter."""
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)
