"""int8 windowed and adaptive pooling against ``quantize.arith``: a max of codes is exact (same
QParams in and out, or dequantized); an average is PyTorch's on the dequantized input,
requantized to the output's QParams or stored fp16."""
import helpers
import pytest
import torch
import torch.nn.functional as F
from quant_checks import (
    SIGNED,
    UNSIGNED,
    assert_rest_untouched,
    check_output,
    int8_slice,
    output_qparams,
    random_codes,
)

from torch_gie.kernels.pool2d import AdaptiveAvgPool2d, AdaptiveMaxPool2d, Pool2d
from torch_gie.quantize.arith import LayerQuant, QParams, dequantize

# (kind, kernel, stride, padding, dilation, ceil_mode, count_include_pad, divisor, pad_is_zeros)
POOLS = [
    ("max", 3, 2, 1, 1, False, True, None, False),  # ResNet stem
    ("max", 3, 2, 0, 1, True, True, None, False),  # GoogLeNet stem: windows overhang
    ("max", 3, 2, (3, 1, 0, 2), 1, True, True, None, True),  # windows wholly in the zero padding
    ("avg", 3, 2, 1, 1, False, True, None, False),
    ("avg", 3, 2, 1, 1, True, False, None, False),
    ("avg", 3, 1, 1, 1, False, True, 5, False),
    ("avg", 3, 2, (0, 1, 0, 1), 1, False, False, None, True),  # TF "SAME": the zeros count
]


def codes_input(shape, qp, device):
    _, x = int8_slice(shape, device)
    x.copy_(random_codes(x.shape, qp, device))
    return x


def reference(x, qp, params):
    """(fp32 real reference, its exact codes for a max)."""
    kind, k, s, p, d, ceil_mode, cip, div, zeros = params
    codes = x.cpu().float()
    if zeros:
        t, b, left, r = p
        real = F.pad(dequantize(x.cpu(), qp), (left, r, t, b))
        codes = F.pad(codes, (left, r, t, b), value=float(qp.zero_point))
        p = 0
    else:
        real = dequantize(x.cpu(), qp)
    if kind == "max":
        top = F.max_pool2d(codes, k, s, p, d, ceil_mode)
        return dequantize(top.to(torch.int8), qp), top.to(torch.int8)
    return F.avg_pool2d(real, k, s, p, ceil_mode, cip, div), None


def out_slice(shape, store_dtype, device):
    if store_dtype == torch.int8:
        return int8_slice(shape, device)
    return helpers.channel_slice(shape, store_dtype, device, fill=float("nan"))


@pytest.mark.parametrize("x_qp", [SIGNED, UNSIGNED], ids=["signed", "unsigned"])
@pytest.mark.parametrize("out_kind", ["int8", "fp16"])
@pytest.mark.parametrize("params", POOLS, ids=lambda p: "-".join(map(str, p)))
def test_pool2d_int8(device, x_qp, out_kind, params):
    """Channel slices of NHWC buffers in and out, a 9x11 map (odd, ragged tiles)."""
    torch.manual_seed(0)
    kind, k, s, p, d, ceil_mode, cip, div, zeros = params
    x = codes_input((2, 5, 9, 11), x_qp, device)
    ref, ref_codes = reference(x, x_qp, params)
    if out_kind == "fp16":
        q = LayerQuant(x_qp, None)
    else:
        q = LayerQuant(x_qp, x_qp if kind == "max" else output_qparams(ref, x_qp.unsigned))
    layer = Pool2d(kind, k, s, p, d, ceil_mode, cip, div, zeros, dtype=torch.int8, quant=q)
    oh, ow = layer.output_size(9, 11)
    assert (oh, ow) == tuple(ref.shape[2:])
    buf, out = out_slice((2, 5, oh, ow), q.store_dtype, device)
    layer(x, out)
    if kind == "max":  # exact
        expected = ref_codes if out_kind == "int8" else ref.half()
        assert torch.equal(out.cpu(), expected)
    else:
        check_output(out.cpu(), ref, q.output)
    if out_kind == "int8":
        assert_rest_untouched(buf, 5)
    else:
        helpers.assert_rest_poisoned(buf, 5)


@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("in_hw,out_hw", [((13, 11), (7, 7)), ((5, 7), (2, 3))])
def test_adaptive_pool2d_int8(device, kind, in_hw, out_hw):
    torch.manual_seed(1)
    x = codes_input((2, 6, *in_hw), UNSIGNED, device)
    real = dequantize(x.cpu(), UNSIGNED)
    if kind == "max":
        ref = F.adaptive_max_pool2d(real, out_hw)
        q = LayerQuant(UNSIGNED, UNSIGNED)
        layer = AdaptiveMaxPool2d(out_hw, dtype=torch.int8, quant=q)
    else:
        ref = F.adaptive_avg_pool2d(real, out_hw)
        q = LayerQuant(UNSIGNED, output_qparams(ref, True))
        layer = AdaptiveAvgPool2d(out_hw, dtype=torch.int8, quant=q)
    buf, out = int8_slice((2, 6, *out_hw), device)
    layer(x, out)
    if kind == "max":
        assert torch.equal(out.cpu(), F.adaptive_max_pool2d(x.cpu().float(), out_hw).to(torch.int8))
    else:
        check_output(out.cpu(), ref, q.output)
    assert_rest_untouched(buf, 6)


def test_pool2d_int8_errors(device):
    with pytest.raises(ValueError, match="must equal its input"):
        Pool2d("max", 3, 2, 1, dtype=torch.int8, quant=LayerQuant(SIGNED, QParams(0.1, 0)))
    with pytest.raises(ValueError, match="needs quant"):
        Pool2d("avg", 3, dtype=torch.int8)
    with pytest.raises(ValueError, match="needs quant"):
        AdaptiveAvgPool2d(2, quant=LayerQuant(SIGNED))
    layer = Pool2d("avg", 3, 2, 1, dtype=torch.int8, quant=LayerQuant(SIGNED, SIGNED))
    x = random_codes((1, 3, 8, 8), SIGNED, device)
    with pytest.raises(ValueError, match="int8 x and torch.int8 out"):
        layer(x, torch.empty(1, 3, 4, 4, device=device))
    with pytest.raises(ValueError, match="share a dtype"):
        Pool2d("avg", 3, 2, 1)(x, torch.empty(1, 3, 4, 4, dtype=torch.int8, device=device))


@pytest.mark.gpu
def test_resnet_maxpool_int8_gpu():
    torch.manual_seed(3)
    x = random_codes((8, 64, 112, 112), UNSIGNED, "cuda").contiguous(memory_format=torch.channels_last)
    buf, out = int8_slice((8, 64, 56, 56), "cuda")
    Pool2d("max", 3, 2, 1, dtype=torch.int8, quant=LayerQuant(UNSIGNED, UNSIGNED))(x, out)
    torch.cuda.synchronize()
    assert torch.equal(out, F.max_pool2d(x.float(), 3, 2, 1).to(torch.int8))
    assert_rest_untouched(buf, 64)
