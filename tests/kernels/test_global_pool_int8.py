"""int8 global pooling against ``quantize.arith``: the mean of the dequantized input,
requantized or stored fp16 (e.g. for an fp16 classifier); the max of codes, exact. Whole-map
tiles and split maps (fp32 partials, then their reduction)."""
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

from torch_gie.kernels.global_pool import GlobalPool2d, spatial_split
from torch_gie.kernels.pool2d import AdaptiveAvgPool2d
from torch_gie.quantize.arith import LayerQuant, QParams, dequantize


@pytest.mark.parametrize("x_qp", [SIGNED, UNSIGNED], ids=["signed", "unsigned"])
@pytest.mark.parametrize("out_kind", ["int8", "fp16"])
@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("n,c,hw", [
    (2, 5, (40, 41)),  # split, ragged last chunk
    (3, 130, (9, 7)),  # whole-map tile, two channel blocks
])
def test_global_pool_int8(device, x_qp, out_kind, kind, n, c, hw):
    torch.manual_seed(7)
    x = codes_slice((n, c, *hw), x_qp, device)
    real = dequantize(x.cpu(), x_qp)
    ref = real.mean((2, 3)) if kind == "avg" else real.amax((2, 3))
    if out_kind == "fp16":
        q = LayerQuant(x_qp, None)
        buf, out = helpers.channel_slice((n, c), torch.float16, device, fill=float("nan"))
    else:
        q = LayerQuant(x_qp, x_qp if kind == "max" else output_qparams(ref, x_qp.unsigned))
        buf, out = int8_slice((n, c), device)
    layer = GlobalPool2d(kind, dtype=torch.int8, quant=q)
    layer(x, out)
    assert layer.launches == (1 if spatial_split(n, c, hw[0] * hw[1], x.device).split == 1 else 2)
    if kind == "max":  # exact
        codes = x.cpu().amax((2, 3))
        assert torch.equal(out.cpu(), codes if out_kind == "int8" else dequantize(codes, x_qp, torch.float16))
    else:
        check_output(out.cpu(), ref, q.output)
    if out_kind == "fp16":
        helpers.assert_rest_poisoned(buf, c)
    else:
        assert_rest_untouched(buf, c)


def test_adaptive_global_int8_4d_out(device):
    """AdaptiveAvgPool2d(1) on codes into an (N, C, 1, 1) int8 output (an SE block's squeeze)."""
    torch.manual_seed(8)
    x = random_codes((2, 24, 28, 28), UNSIGNED, device).contiguous(memory_format=torch.channels_last)
    ref = dequantize(x.cpu(), UNSIGNED).mean((2, 3), keepdim=True)
    q = LayerQuant(UNSIGNED, output_qparams(ref, True))
    out = torch.full((2, 24, 1, 1), 93, dtype=torch.int8, device=device)
    AdaptiveAvgPool2d(1, dtype=torch.int8, quant=q)(x, out)
    check_output(out.cpu(), ref, q.output)


def test_global_pool_int8_errors(device):
    with pytest.raises(ValueError, match="must equal its input"):
        GlobalPool2d("max", dtype=torch.int8, quant=LayerQuant(SIGNED, QParams(0.2, 0)))
    with pytest.raises(ValueError, match="needs quant"):
        GlobalPool2d("avg", dtype=torch.int8)
    layer = GlobalPool2d("avg", dtype=torch.int8, quant=LayerQuant(SIGNED, None, None, torch.float32))
    x = random_codes((1, 3, 4, 4), SIGNED, device)
    with pytest.raises(ValueError, match="torch.float32 out"):
        layer(x, torch.empty(1, 3, dtype=torch.float16, device=device))


def test_int8_pools_compile_for_sm90():
    """The windowed kernel (int8 max into codes over folded zero padding), the global pool's
    stage 1 (int8 max dequantized to fp16) and stage 2 (int8 mean requantized) compile for
    Hopper."""
    win = dict(KH=3, KW=3, SH=2, SW=2, PT=1, PB=1, PL=1, PR=1, DH=1, DW=1, COUNT_INCLUDE_PAD=True,
               DIVISOR=0, PAD_IS_ZEROS=True, BLOCK_P=32, BLOCK_C=64, MODE=0, IS_MAX=True,
               X_QUANT=True, X_ZP=-128, OUT_QUANT=True, OUT_ZP=-128)
    floats = ["x_scale", "out_inv_scale", "scale"]
    i8 = dict(x_ptr="*i8", out_ptr="*i8", part_ptr="*fp32")
    red = dict(ZP=-128, OUT_ZP=0, BLOCK_C=64)
    specs = [["torch_gie.kernels.pool2d", "_pool2d_kernel", i8, floats, win, 4, 3],
             ["torch_gie.kernels.global_pool", "_spatial_reduce_kernel", dict(i8, dest_ptr="*fp16"),
              floats, dict(red, IS_MAX=True, MAX_DEQUANT=True, CODES=False, OUT_QUANT=False,
                           DENSE_HW=True, BLOCK_HW=64), 4, 3],
             ["torch_gie.kernels.global_pool", "_partials_reduce_kernel", i8, floats,
              dict(red, IS_MAX=False, MAX_DEQUANT=False, CODES=False, OUT_QUANT=True, BLOCK_S=16),
              4, 3]]
    assert len(compile_sm90(specs)) == len(specs)


@pytest.mark.gpu
@pytest.mark.parametrize("out_kind", ["int8", "fp16"])
def test_global_avg_7x7x2048_int8_gpu(out_kind):
    torch.manual_seed(9)
    x = random_codes((32, 2048, 7, 7), UNSIGNED, "cuda").contiguous(memory_format=torch.channels_last)
    ref = dequantize(x, UNSIGNED).mean((2, 3))
    q = (LayerQuant(UNSIGNED, output_qparams(ref, True)) if out_kind == "int8"
         else LayerQuant(UNSIGNED, None))
    out = (torch.full((32, 2048), 93, dtype=torch.int8, device="cuda") if out_kind == "int8"
           else torch.full((32, 2048), float("nan"), dtype=torch.float16, device="cuda"))
    GlobalPool2d("avg", dtype=torch.int8, quant=q)(x, out)
    torch.cuda.synchronize()
    check_output(out.cpu(), ref.cpu(), q.output)
