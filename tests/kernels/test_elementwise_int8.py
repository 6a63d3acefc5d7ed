"""int8 paths of the binary elementwise kernels (Add: a residual join of two int8 tensors with
their own QParams; Mul) against ``quantize.arith``: dequantize, fp32 op, activation, requantize."""
import helpers
import pytest
import torch
from quant_checks import (
    SIGNED,
    UNSIGNED,
    assert_rest_untouched,
    check_output,
    codes_slice,
    compile_sm90,
    int8_slice,
    output_qparams,
    random_codes,
)

from torch_gie.activations import apply_activation
from torch_gie.kernels.elementwise import Add, Mul
from torch_gie.quantize.arith import LayerQuant, QParams, dequantize


@pytest.mark.parametrize("b_kind", ["int8", "fp16"])
@pytest.mark.parametrize("out_kind", ["unsigned", "signed", "fp16"])
def test_add_int8_nhwc(device, b_kind, out_kind):
    """ResNet's join relu(a + b): a, b channel slices of NHWC buffers with their own QParams (or
    b real fp16), out int8 (unsigned after the ReLU, or signed without it) or fp16."""
    torch.manual_seed(0)
    shape = (2, 19, 5, 3)
    a = codes_slice(shape, SIGNED, device)
    b_qp = QParams(0.07, -128) if b_kind == "int8" else None
    b = codes_slice(shape, b_qp, device) if b_qp else helpers.channel_slice(shape, torch.float16, device)[1]
    act = None if out_kind == "signed" else "relu"
    ref = dequantize(a.cpu(), SIGNED) + (dequantize(b.cpu(), b_qp) if b_qp else b.cpu().float())
    ref = apply_activation(ref, act)
    if out_kind == "fp16":
        q = LayerQuant(SIGNED, None, b_qp, torch.float16)
        buf, out = helpers.channel_slice(shape, torch.float16, device, fill=float("nan"))
    else:
        q = LayerQuant(SIGNED, output_qparams(ref, out_kind == "unsigned"), b_qp)
        buf, out = int8_slice(shape, device)
    Add(act, dtype=torch.int8, quant=q)(a, b, out)
    check_output(out.cpu(), ref, q.output)
    if out_kind == "fp16":
        helpers.assert_rest_poisoned(buf, 19)
    else:
        assert_rest_untouched(buf, 19)


def test_mul_int8_broadcast_gate(device):
    """x * gate with x int8 NHWC and an fp32 (N, C, 1, 1) gate broadcast, to int8."""
    torch.manual_seed(1)
    x = codes_slice((2, 11, 4, 4), UNSIGNED, device)
    gate = torch.rand(2, 11, 1, 1, device=device)
    ref = dequantize(x.cpu(), UNSIGNED) * gate.cpu()
    q = LayerQuant(UNSIGNED, output_qparams(ref, True))
    out = torch.full((2, 11, 4, 4), 93, dtype=torch.int8, device=device)
    Mul(dtype=torch.int8, quant=q)(x, gate, out)
    check_output(out.cpu(), ref, q.output)


def test_add_int8_errors(device):
    a = random_codes((2, 3), SIGNED, device)
    with pytest.raises(ValueError, match="needs quant"):
        Add(dtype=torch.int8)
    with pytest.raises(ValueError, match="needs quant"):
        Add(quant=LayerQuant(SIGNED))
    add = Add(dtype=torch.int8, quant=LayerQuant(SIGNED, SIGNED, SIGNED))
    with pytest.raises(ValueError, match="b must be one of"):
        add(a, a.half(), torch.empty(2, 3, dtype=torch.int8, device=device))
    with pytest.raises(ValueError, match="out must be one of"):
        add(a, a, torch.empty(2, 3, device=device))
    with pytest.raises(ValueError, match="a must be one of"):
        add(a.float(), a, torch.empty(2, 3, dtype=torch.int8, device=device))


def test_int8_pointwise_compiles_for_sm90():
    """An int8 Add (codes in, requantizing store) compiles for Hopper (Quantize and Dequantize
    are its halves)."""
    base = dict(AFFINE=False, ACT=1, ACT_ALPHA=0.0, ACT_BETA=0.0, BLOCK_P=32, BLOCK_C=128)
    specs = []
    for a, b, out, b_op in (("i8", "i8", "i8", 1),):
        meta = dict(base, B_OP=b_op, A_QUANT=a == "i8", A_ZP=0, B_QUANT=b_op and b == "i8",
                    B_ZP=-128, OUT_QUANT=out == "i8", OUT_ZP=-128)
        ptrs = dict(a_ptr=f"*{a}", b_ptr=f"*{b}", scale_ptr="*fp32", shift_ptr="*fp32",
                    slope_ptr="*fp32", out_ptr=f"*{out}")
        specs.append(["torch_gie.kernels.elementwise", "_channel_pointwise_kernel", ptrs,
                      ["a_scale", "b_scale", "out_inv_scale"], meta, 4, 3])
    assert len(compile_sm90(specs)) == 1
