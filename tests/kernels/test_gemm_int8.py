"""The int8 path of Linear (GEMM and GEMV) against the exact emulation of ``quantize.arith``:
codes in, codes or real values out, with bias, activations and int8 or real residuals."""
import pytest
import torch
from quant_checks import (
    POISON,
    SIGNED,
    UNSIGNED,
    check_output,
    compile_sm90,
    output_qparams,
    random_codes,
)

from torch_gie.activations import apply_activation
from torch_gie.kernels.gemm import Linear, check_config, default_config, linear, linear_configs
from torch_gie.quantize.arith import (
    LayerQuant,
    QParams,
    dequantize,
    fold_zero_point,
    linear_int8,
    quantize_weight,
)


def reference(x, weight, bias, q: LayerQuant, act=None, residual=None, post=None, slope=None):
    """fp32 real ``post(act(linear_int8) + residual)``, before any requantization; rows
    flattened to 2D (features on dim 1, as PReLU's slope wants), then reshaped back."""
    shape = (*x.shape[:-1], weight.shape[0])
    x = x.reshape(-1, x.shape[-1])
    residual = None if residual is None else residual.reshape(-1, weight.shape[0])
    w_codes, w_scale = quantize_weight(weight.cpu())
    combined, folded = fold_zero_point(None if bias is None else bias.cpu(), w_codes, w_scale, q.input)
    y = linear_int8(x.cpu(), q.input, w_codes, combined, folded)
    s = None if slope is None else slope.cpu()
    y = apply_activation(y, act, s)
    if residual is not None:
        r = dequantize(residual.cpu(), q.residual) if q.residual else residual.cpu().float()
        y = apply_activation(y + r, post, s)
    return y.reshape(shape)


def slope_for(n, device):
    """PReLU's slope per output feature, both signs (as test_conv2d's)."""
    return torch.linspace(-0.5, 1.5, n, device=device) + 0.1 * torch.rand(n, device=device)


def strided_codes(m, k, qp, device):
    """Codes as columns [3, 3 + k) of a wider buffer (a strided row view)."""
    return random_codes((m, k + 7), qp, device)[:, 3:3 + k]


def out_buffer(shape, store_dtype, device):
    if store_dtype == torch.int8:
        return torch.full(shape, POISON, dtype=torch.int8, device=device)
    return torch.full(shape, float("nan"), dtype=store_dtype, device=device)


def run_case(device, m, k, n, x_qp, out_kind, rows, act="relu", bias=True, seed=0):
    torch.manual_seed(seed)
    x = strided_codes(m, k, x_qp, device)
    weight = torch.randn(n, k, device=device) / k ** 0.5
    b = torch.randn(n, device=device) if bias else None
    probe = LayerQuant(x_qp, None, None, torch.float32)
    y = reference(x, weight, b, probe, act)
    if out_kind in ("signed", "unsigned"):
        q = LayerQuant(x_qp, output_qparams(y, out_kind == "unsigned"))
    else:
        q = LayerQuant(x_qp, None, None, out_kind)
    layer = Linear(weight, b, activation=act, dtype=torch.int8, quant=q, rows=rows)
    assert layer.gemv == (rows is not None)
    out = out_buffer((m, n), q.store_dtype, device)
    layer(x, out)
    check_output(out.cpu(), y, q.output)


@pytest.mark.parametrize("x_qp", [SIGNED, UNSIGNED], ids=["x_signed", "x_unsigned"])
@pytest.mark.parametrize("out_kind", ["signed", "unsigned", torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("path", ["gemm", "gemv"])
def test_linear_int8(device, x_qp, out_kind, path):
    """Odd sizes: M = 17 (two row tiles) or 3 (GEMV), K = 70 (a K tail: masked loads read the
    zero point), N = 37 (ragged column tile); unsigned outputs after a ReLU."""
    act = "relu" if out_kind == "unsigned" else "hardswish"
    m, rows = (17, None) if path == "gemm" else (3, 3)
    run_case(device, m, 70, 37, x_qp, out_kind, rows, act)


@pytest.mark.parametrize("res_qp", [QParams(0.04, 0), None], ids=["res_int8", "res_fp16"])
@pytest.mark.parametrize("path", ["gemm", "gemv"])
def test_linear_int8_residual(device, res_qp, path):
    """post(act(x W^T + b) + residual) with PReLU and ReLU6: the residual int8 codes with its own
    QParams (dequantized in the epilogue) or real fp16 values; the rows 3D and strided."""
    torch.manual_seed(3)
    x = random_codes((2, 5, 41), UNSIGNED, device)[:, 1:4]  # rows do not merge: 2 x 3 strided
    weight, bias = torch.randn(19, 41, device=device) / 6, torch.randn(19, device=device)
    slope = slope_for(19, device)
    if res_qp is None:
        residual = torch.randn(2, 3, 19, device=device).half()
    else:
        residual = random_codes((2, 3, 19), res_qp, device)
    probe = LayerQuant(UNSIGNED, None, res_qp)
    y = reference(x, weight, bias, probe, "prelu", residual, "relu6", slope)
    q = LayerQuant(UNSIGNED, output_qparams(y, True), res_qp)
    layer = Linear(weight, bias, activation="prelu", post_activation="relu6", act_slope=slope,
                   dtype=torch.int8, quant=q, rows=6 if path == "gemm" else 4)
    assert layer.gemv == (path == "gemv")
    out = out_buffer((2, 3, 19), torch.int8, device)
    layer(x, out, residual)
    check_output(out.cpu(), y, q.output)


def test_every_int8_config(device):
    torch.manual_seed(4)
    x = random_codes((19, 40), SIGNED, device)
    weight = torch.randn(35, 40, device=device)
    q = LayerQuant(SIGNED, None, None, torch.float32)
    layer = Linear(weight, None, dtype=torch.int8, quant=q)
    assert layer.configs == linear_configs(torch.int8) and len(layer.configs) > 4
    y = reference(x, weight, None, q)
    for cfg in layer.configs:
        layer.config = cfg
        out = out_buffer((19, 35), torch.float32, device)
        layer(x, out)
        check_output(out.cpu(), y, None)


def test_int8_configs_respect_dot_limits():
    """int8 tensor-core dots need BLOCK_K >= 32 and BLOCK_M/N >= 16: every offered config and the
    defaults obey it, and a config breaking it is refused."""
    configs = linear_configs(torch.int8)
    for cfg in configs:
        assert check_config(cfg, torch.int8) == cfg
        assert cfg["BLOCK_K"] >= 32 and min(cfg["BLOCK_M"], cfg["BLOCK_N"]) >= 16
        assert (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * cfg["num_stages"] <= 160 * 1024
    assert default_config(1, 1000, torch.int8)["BLOCK_M"] == 16
    assert default_config(128, 4096, torch.int8) in configs
    layer = Linear(torch.randn(8, 8), dtype=torch.int8, quant=LayerQuant(SIGNED))
    with pytest.raises(ValueError, match="BLOCK_K must be >= 32"):
        layer.config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
    Linear(torch.randn(8, 8)).config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16,
                                        "num_warps": 4, "num_stages": 2}  # fp16: fine


def test_int8_weight_packing_and_convenience(device):
    """K-major codes [N, K padded to 16] for both kernels; the fp path keeps W^T; ``linear``
    allocates out in quant.store_dtype."""
    weight = torch.randn(10, 21, device=device)
    q = LayerQuant(SIGNED, QParams(0.1, 0))
    layer = Linear(weight, torch.randn(10, device=device), dtype=torch.int8, quant=q)
    w = layer.packed_weight
    assert w.dtype == torch.int8 and tuple(w.shape) == (10, 32)
    assert torch.equal(w[:, :21].cpu(), quantize_weight(weight.cpu())[0])
    assert not w[:, 21:].any()
    assert tuple(Linear(weight).packed_weight.shape) == (21, 16)
    x = random_codes((2, 21), SIGNED, device)
    out = linear(x, weight, quant=LayerQuant(SIGNED, None, None, torch.float32))
    assert out.dtype == torch.float32
    check_output(out.cpu(), reference(x, weight, None, LayerQuant(SIGNED)), None)


def test_int8_errors(device):
    weight = torch.randn(10, 8, device=device)
    q = LayerQuant(SIGNED, QParams(0.1, 0))
    with pytest.raises(ValueError, match="needs quant"):
        Linear(weight, dtype=torch.int8)
    with pytest.raises(ValueError, match="needs quant"):
        Linear(weight, dtype=torch.float16, quant=q)
    with pytest.raises(ValueError, match="out_dtype"):
        Linear(weight, dtype=torch.int8, quant=LayerQuant(SIGNED, None, None, torch.bfloat16))
    layer = Linear(weight, dtype=torch.int8, quant=q)
    x = random_codes((4, 8), SIGNED, device)
    with pytest.raises(ValueError, match="x must be torch.int8"):
        layer(x.float(), torch.empty(4, 10, dtype=torch.int8, device=device))
    with pytest.raises(ValueError, match="out must be torch.int8"):
        layer(x, torch.empty(4, 10, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="residual must be torch.float16 or torch.float32"):
        layer(x, torch.empty(4, 10, dtype=torch.int8, device=device),
              torch.zeros(4, 10, dtype=torch.int8, device=device))


def _gpu_case(m, k, n, out_kind, rows=None):
    torch.manual_seed(5)
    x = random_codes((m, k), UNSIGNED, "cuda")
    weight, bias = torch.randn(n, k, device="cuda") / k ** 0.5, torch.randn(n, device="cuda")
    y = reference(x, weight, bias, LayerQuant(UNSIGNED))
    q = (LayerQuant(UNSIGNED, output_qparams(y, False)) if out_kind == "int8"
         else LayerQuant(UNSIGNED, None, None, torch.float16))
    layer = Linear(weight, bias, dtype=torch.int8, quant=q, rows=rows)
    for cfg in [None, *layer.configs]:
        layer.config = cfg
        out = out_buffer((m, n), q.store_dtype, "cuda")
        layer(x, out)
        torch.cuda.synchronize()
        check_output(out.cpu(), y, q.output)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 128])
@pytest.mark.parametrize("out_kind", ["int8", "fp16"])
def test_resnet50_fc_int8_gpu(batch, out_kind):
    _gpu_case(batch, 2048, 1000, out_kind)
    if batch == 1:
        _gpu_case(batch, 2048, 1000, out_kind, rows=1)  # the GEMV path


@pytest.mark.gpu
def test_vgg_fc_int8_gpu():
    _gpu_case(32, 25088, 4096, "int8")


_INT8_ARGS = dict(QUANT=True, X_ZP=-128, RES_QUANT=True, RES_ZP=0, OUT_QUANT=True, OUT_ZP=0,
                  HAS_BIAS=True, ACT=1, ACT_ALPHA=0.0, ACT_BETA=0.0, HAS_RES=True, POST_ACT=0,
                  POST_ACT_ALPHA=0.0, POST_ACT_BETA=0.0)
_INT8_PTRS = dict(x_ptr="*i8", w_ptr="*i8", bias_ptr="*fp32", res_ptr="*i8", out_ptr="*i8",
                  slope_ptr="*fp32", scale_ptr="*fp32")


def test_int8_kernels_compile_for_sm90():
    """The int8 GEMM (a wgmma tile) and GEMV compile for Hopper with int8 residual and output;
    the tensor cores are used."""
    specs = []
    for cfg in (default_config(128, 1000, torch.int8),):
        meta = dict(_INT8_ARGS, PRECISION="tf32",
                    **{k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")})
        specs.append(["torch_gie.kernels.gemm", "_linear_kernel", _INT8_PTRS,
                      ["res_scale", "out_inv_scale"], meta, cfg["num_warps"], cfg["num_stages"]])
    meta = dict(_INT8_ARGS, BLOCK_N=8, BLOCK_K=256)
    specs.append(["torch_gie.kernels.gemv", "_gemv_kernel", _INT8_PTRS,
                  ["res_scale", "out_inv_scale"], meta, 4, 3])
    rows = compile_sm90(specs)
    assert rows[0]["mma"]
