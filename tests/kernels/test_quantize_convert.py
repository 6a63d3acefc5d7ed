"""Quantize (real -> int8 codes) and Dequantize (codes -> real) kernels against
``quantize.arith``: bit-exact, layout kept, on strided NHWC channel slices, tokens and 2D."""
import helpers
import pytest
import torch
from quant_checks import SIGNED, UNSIGNED, assert_rest_untouched, int8_slice, random_codes

from torch_gie.kernels.elementwise import Dequantize, Quantize
from torch_gie.quantize.arith import QParams, dequantize, quantize


@pytest.mark.parametrize("qp", [SIGNED, UNSIGNED, QParams(0.25, 0)], ids=["signed", "unsigned", "ties"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_quantize_nhwc_channel_slice(device, qp, dtype):
    """Channels [2, 2 + 37) of wider NHWC buffers on both sides; values reach past the code range
    (saturation) and, with scale 1/4, sit exactly on half codes (ties round to even)."""
    torch.manual_seed(0)
    _, x = helpers.channel_slice((2, 37, 5, 3), dtype, device)
    lo, hi = qp.real_range
    x.copy_(torch.rand_like(x, dtype=torch.float32) * (hi - lo) * 1.2 + lo * 1.2 - 0.1 * hi)
    if qp.scale == 0.25:
        x.copy_((torch.randint(-600, 600, x.shape) + 0.5).to(device) * 0.25)
    buf, out = int8_slice((2, 37, 5, 3), device)
    Quantize(qp)(x, out)
    assert torch.equal(out.cpu(), quantize(x.cpu().float(), qp))
    assert_rest_untouched(buf, 37)
    assert out.stride() == buf[:, 2:39].stride()


@pytest.mark.parametrize("qp", [SIGNED, UNSIGNED], ids=["signed", "unsigned"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dequantize_nhwc_channel_slice(device, qp, dtype):
    torch.manual_seed(1)
    buf_in, x = int8_slice((3, 21, 4, 5), device)
    x.copy_(random_codes(x.shape, qp, device))
    buf, out = helpers.channel_slice((3, 21, 4, 5), dtype, device, fill=float("nan"))
    Dequantize(qp, dtype)(x, out)
    assert torch.equal(out.cpu(), dequantize(x.cpu(), qp, dtype))
    helpers.assert_rest_poisoned(buf, 21)


@pytest.mark.parametrize("shape", [(3, 70), (2, 5, 19)], ids=["2d", "tokens"])
def test_quantize_round_trip_2d_and_tokens(device, shape):
    """(N, C) rows (e.g. a pooled feature feeding an fp16 classifier) and (N, L, D) tokens, strided."""
    torch.manual_seed(2)
    x = torch.randn(*shape[:-1], shape[-1] * 2, device=device)[..., ::2]
    codes = torch.full(shape, 93, dtype=torch.int8, device=device)
    Quantize(SIGNED)(x, codes)
    assert torch.equal(codes.cpu(), quantize(x.cpu(), SIGNED))
    back = torch.full(shape, float("nan"), device=device)
    Dequantize(SIGNED, torch.float32)(codes, back)
    assert torch.equal(back.cpu(), dequantize(codes.cpu(), SIGNED))


def test_convert_errors(device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(ValueError, match="out must be one of"):
        Quantize(SIGNED)(x, torch.empty(2, 3, device=device))
    with pytest.raises(ValueError, match="x must be one of"):
        Quantize(SIGNED)(x.to(torch.int8), torch.empty(2, 3, dtype=torch.int8, device=device))
    with pytest.raises(ValueError, match="out must be one of"):
        Dequantize(SIGNED)(x.to(torch.int8), torch.empty(2, 3, device=device))
    with pytest.raises(ValueError, match="out_dtype"):
        Dequantize(SIGNED, torch.int8)


@pytest.mark.gpu
@pytest.mark.parametrize("qp", [SIGNED, UNSIGNED], ids=["signed", "unsigned"])
def test_convert_56x56x256_gpu(qp):
    torch.manual_seed(3)
    x = (torch.randn(32, 256, 56, 56, device="cuda") * 4).half()
    x = x.contiguous(memory_format=torch.channels_last)
    codes = torch.full_like(x, 93, dtype=torch.int8)
    Quantize(qp)(x, codes)
    assert torch.equal(codes, quantize(x.float(), qp))
    back = torch.full_like(x, float("nan"))
    Dequantize(qp)(codes, back)
    assert torch.equal(back, dequantize(codes, qp, torch.float16))
