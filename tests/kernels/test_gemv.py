"""The matrix-vector path of Linear (few rows, e.g. batch-1 classifiers) against F.linear on fp32
references, outputs poisoned first."""
import pytest
import torch
from test_conv2d import ACT_CASES, act_id, slope_for
from test_gemm import TOL, assert_rest_poisoned, poisoned_slice, reference, rel_err

from torch_gie.kernels.gemm import Linear
from torch_gie.kernels.gemv import GEMV_MAX_ROWS, check_gemv_config, gemv_configs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("k,n", [(5, 10), (300, 37), (33, 1000)])
@pytest.mark.parametrize("has_bias", [True, False])
def test_gemv_shapes(device, dtype, m, k, n, has_bias):
    torch.manual_seed(0)
    x = torch.randn(m, k, device=device).to(dtype)
    weight = torch.randn(n, k, device=device)
    bias = torch.randn(n, device=device) if has_bias else None
    layer = Linear(weight, bias, activation="relu", dtype=dtype, rows=m)
    assert layer.gemv
    buf, out = poisoned_slice((m, n), dtype, device)
    layer(x, out)
    assert rel_err(out, reference(x, weight, bias, "relu", dtype)) < TOL[dtype]
    assert_rest_poisoned(buf, out)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ACT_CASES, ids=act_id)
def test_gemv_activations(device, activation, dtype):
    """Every activation code through the GEMV path; N = 37 leaves a ragged last block of rows
    (BLOCK_N 8), whose PReLU slope loads must stay in range."""
    torch.manual_seed(2)
    x, weight = torch.randn(2, 40, device=device).to(dtype), torch.randn(37, 40, device=device) / 3
    bias = torch.randn(37, device=device)
    slope = slope_for(37, device, activation)
    layer = Linear(weight, bias, activation=activation, act_slope=slope, dtype=dtype, rows=2)
    assert layer.gemv
    buf, out = poisoned_slice((2, 37), dtype, device)
    layer(x, out)
    assert rel_err(out, reference(x, weight, bias, activation, dtype, slope)) < TOL[dtype]
    assert_rest_poisoned(buf, out)


def test_gemv_every_config_residual_and_strided_rows(device):
    """Each candidate tiling, with a residual epilogue, on a 3D input whose rows are strided."""
    torch.manual_seed(1)
    x = torch.randn(2, 5, 70, device=device)[:, 1:3]  # 4 rows of 2 outer x 2 inner, stride 5 rows
    weight, bias = torch.randn(19, 70, device=device), torch.randn(19, device=device)
    residual = torch.randn(2, 2, 19, device=device)
    layer = Linear(weight, bias, activation="relu", post_activation="silu", dtype=torch.float32,
                   rows=GEMV_MAX_ROWS)
    ref = reference(x, weight, bias, "relu", torch.float32) + residual
    ref = ref * torch.sigmoid(ref)
    for cfg in layer.configs:
        layer.config = cfg
        buf, out = poisoned_slice((2, 2, 19), torch.float32, device)
        layer(x, out, residual)
        assert rel_err(out, ref) < 1e-5, cfg
        assert_rest_poisoned(buf, out)


def test_gemv_layer_takes_more_rows_and_only_gemv_configs(device):
    weight = torch.randn(10, 8, device=device)
    layer = Linear(weight, dtype=torch.float32, rows=1)
    x = torch.randn(7, 8, device=device)  # more rows than it was built for: still right
    out = torch.full((7, 10), float("nan"), device=device)
    layer(x, out)
    assert rel_err(out, reference(x, weight, None, None, torch.float32)) < 1e-5
    assert not Linear(weight, dtype=torch.float32, rows=GEMV_MAX_ROWS + 1).gemv
    with pytest.raises(ValueError, match="GEMV"):
        layer.config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
    with pytest.raises(ValueError, match="power of two"):
        check_gemv_config({**gemv_configs()[0], "BLOCK_N": 6})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_resnet50_fc_batch1_gpu(dtype):
    torch.manual_seed(5)
    x = torch.randn(1, 2048, device="cuda").to(dtype)
    weight, bias = torch.randn(1000, 2048, device="cuda") / 45, torch.randn(1000, device="cuda")
    layer = Linear(weight, bias, dtype=dtype, rows=1)
    ref = reference(x, weight, bias, None, dtype)
    for cfg in layer.configs:
        layer.config = cfg
        buf, out = poisoned_slice((1, 1000), dtype, "cuda")
        layer(x, out)
        assert rel_err(out, ref) < TOL[dtype], cfg
        assert_rest_poisoned(buf, out)
