"""Linear (GEMM) kernel against F.linear on fp32 references, outputs poisoned first."""
import pytest
import torch
import torch.nn.functional as F
from test_conv2d import ACT_CASES, act_id, slope_for

from torch_gie.activations import Act, apply_activation
from torch_gie.kernels.gemm import (
    Linear,
    check_config,
    default_config,
    linear,
    linear_configs,
)

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def reference(x, weight, bias, activation, dtype, slope=None):
    """fp32 reference on the inputs as the kernel sees them (rounded to dtype)."""
    b = None if bias is None else bias.float()
    return apply_activation(F.linear(x.float(), weight.to(dtype).float(), b), activation, slope)


def poisoned_slice(shape, dtype, device, pad=3):
    """A NaN buffer wider than ``shape`` in its last dim and the view of it to write into."""
    buf = torch.full((*shape[:-1], shape[-1] + 2 * pad), float("nan"), dtype=dtype, device=device)
    return buf, buf[..., pad:pad + shape[-1]]


def assert_rest_poisoned(buf, view):
    mask = torch.ones_like(buf, dtype=torch.bool)
    mask[..., 3:3 + view.shape[-1]] = False
    assert torch.isnan(buf[mask]).all()
    assert not torch.isnan(view).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("k", [5, 33])
@pytest.mark.parametrize("n", [10, 1000])
@pytest.mark.parametrize("has_bias", [True, False])
def test_linear_shapes(device, dtype, m, k, n, has_bias):
    torch.manual_seed(0)
    x = torch.randn(m, k, device=device).to(dtype)
    weight = torch.randn(n, k, device=device)
    bias = torch.randn(n, device=device) if has_bias else None
    buf, out = poisoned_slice((m, n), dtype, device)
    Linear(weight, bias, activation="relu", dtype=dtype)(x, out)
    assert rel_err(out, reference(x, weight, bias, "relu", dtype)) < TOL[dtype]
    assert_rest_poisoned(buf, out)


# exp overflows to inf for large |x| in the interpreter's numpy; the activations still saturate.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ACT_CASES, ids=act_id)
def test_linear_activations(device, activation, dtype):
    """Every activation code with its parameters; PReLU's slope per output feature, N = 24
    (the second 16-wide tile overhangs: its slope loads stay in range)."""
    torch.manual_seed(1)
    x, weight = torch.randn(3, 20, device=device).to(dtype), torch.randn(24, 20, device=device) / 2
    bias = torch.randn(24, device=device)
    slope = slope_for(24, device, activation)
    buf, out = poisoned_slice((3, 24), dtype, device)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
    Linear(weight, bias, activation=activation, act_slope=slope, dtype=dtype, config=cfg)(x, out)
    assert rel_err(out, reference(x, weight, bias, activation, dtype, slope)) < TOL[dtype]
    assert_rest_poisoned(buf, out)


@pytest.mark.parametrize("act,post", [("prelu", Act("clamp", -1, 1)), (Act("elu", 0.7), "prelu")], ids=str)
def test_linear_prelu_with_residual(device, act, post):
    torch.manual_seed(8)
    x, weight = torch.randn(5, 33, device=device), torch.randn(19, 33, device=device) / 4
    bias, residual = torch.randn(19, device=device), torch.randn(5, 19, device=device)
    slope = slope_for(19, device, "prelu")
    buf, out = poisoned_slice((5, 19), torch.float32, device)
    Linear(weight, bias, activation=act, post_activation=post, act_slope=slope,
           dtype=torch.float32)(x, out, residual)
    ref = apply_activation(reference(x, weight, bias, act, torch.float32, slope) + residual, post, slope)
    assert rel_err(out, ref) < 1e-5
    assert_rest_poisoned(buf, out)
    with pytest.raises(ValueError, match="act_slope"):
        Linear(weight, activation="prelu")
    with pytest.raises(ValueError, match=r"shape \(19,\)"):
        Linear(weight, activation="prelu", act_slope=torch.rand(33))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_3d_noncontiguous(device, dtype):
    # ViT-like (batch, tokens, dim) taken as a token slice: the leading dims do not collapse,
    # and features are strided (every other column of a wider buffer).
    torch.manual_seed(2)
    base = torch.randn(2, 7, 66, device=device).to(dtype)
    x = base[:, 1:6, ::2]
    assert not x.is_contiguous()
    weight, bias = torch.randn(10, 33, device=device), torch.randn(10, device=device)
    buf, out = poisoned_slice((2, 5, 10), dtype, device)
    Linear(weight, bias, activation="gelu", dtype=dtype)(x, out)
    assert rel_err(out, reference(x, weight, bias, "gelu", dtype)) < TOL[dtype]
    assert_rest_poisoned(buf, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_residual_epilogue(device, dtype):
    # ViT's projections: out = post_act(act(x W^T + b) + residual), residual a strided view.
    torch.manual_seed(7)
    x = torch.randn(2, 5, 33, device=device).to(dtype)
    weight, bias = torch.randn(24, 33, device=device), torch.randn(24, device=device)
    residual = torch.randn(2, 5, 48, device=device).to(dtype)[..., ::2]
    buf, out = poisoned_slice((2, 5, 24), dtype, device)
    Linear(weight, bias, activation="relu", post_activation="silu", dtype=dtype)(x, out, residual)
    ref = F.silu(reference(x, weight, bias, "relu", dtype) + residual.float())
    assert rel_err(out, ref) < TOL[dtype]
    assert_rest_poisoned(buf, out)
    with pytest.raises(ValueError, match="residual must have"):
        linear(x, weight, residual=residual[..., :5])


def test_linear_4d_and_1d(device):
    torch.manual_seed(3)
    weight = torch.randn(12, 16, device=device)
    x4 = torch.randn(2, 3, 4, 16, device=device)
    assert rel_err(linear(x4, weight), reference(x4, weight, None, None, torch.float32)) < 1e-5
    x1 = torch.randn(16, device=device)
    assert rel_err(linear(x1, weight), reference(x1, weight, None, None, torch.float32)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_config(device, dtype):
    torch.manual_seed(4)
    x, weight, bias = torch.randn(19, 40, device=device).to(dtype), torch.randn(35, 40), None
    weight = weight.to(device)
    layer = Linear(weight, bias, dtype=dtype)
    assert layer.configs == linear_configs(dtype) and layer.configs
    ref = reference(x, weight, bias, None, dtype)
    for cfg in layer.configs:
        layer.config = cfg
        out = torch.full((19, 35), float("nan"), dtype=dtype, device=device)
        layer(x, out)
        assert rel_err(out, ref) < TOL[dtype], cfg


def test_configs_respect_dot_limits():
    for dtype in (torch.float16, torch.float32):
        for cfg in linear_configs(dtype):
            assert check_config(cfg) == cfg  # powers of two >= 16, all keys present
        assert default_config(1, 1000, dtype)["BLOCK_M"] == 16
        assert default_config(128, 1000, dtype) in linear_configs(dtype)
    layer = Linear(torch.randn(8, 8))
    with pytest.raises(ValueError, match="power of two"):
        layer.config = {"BLOCK_M": 8, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
    with pytest.raises(ValueError, match="missing"):
        layer.config = {"BLOCK_M": 16}


def test_fp32_precision_options(device):
    x, weight = torch.randn(2, 16, device=device), torch.randn(16, 16, device=device)
    out = torch.empty(2, 16, device=device)
    Linear(weight, dtype=torch.float32, fp32_precision="tf32")(x, out)  # interpreter: exact anyway
    assert rel_err(out, x @ weight.T) < 1e-2
    with pytest.raises(ValueError, match="fp32_precision"):
        Linear(weight, dtype=torch.float32, fp32_precision="fast")


def test_errors(device):
    weight = torch.randn(10, 8, device=device)
    layer = Linear(weight, dtype=torch.float32)
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="weight must be 2D"):
        Linear(torch.randn(8, device=device))
    with pytest.raises(ValueError, match="bias must have shape"):
        Linear(weight, torch.randn(8, device=device))
    with pytest.raises(ValueError, match="dtype"):
        Linear(weight, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown activation"):
        Linear(weight, activation="swish")
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 8\)"):
        layer(torch.randn(4, 9, device=device), torch.empty(4, 10, device=device))
    with pytest.raises(ValueError, match="out must have shape"):
        layer(x, torch.empty(4, 11, device=device))
    with pytest.raises(ValueError, match="x must be torch.float32"):
        layer(x.half(), torch.empty(4, 10, device=device))
    with pytest.raises(ValueError, match="cannot be merged"):
        x4 = torch.randn(3, 4, 5, 8, device=device)[:, :2]
        layer(x4, torch.empty(3, 2, 5, 10, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 128])
def test_resnet50_fc_fp16(batch):
    torch.manual_seed(5)
    x = torch.randn(batch, 2048, device="cuda").half()
    weight, bias = torch.randn(1000, 2048, device="cuda") / 45, torch.randn(1000, device="cuda")
    buf, out = poisoned_slice((batch, 1000), torch.float16, "cuda")
    Linear(weight, bias, dtype=torch.float16)(x, out)
    assert rel_err(out, reference(x, weight, bias, None, torch.float16)) < 1e-2
    assert_rest_poisoned(buf, out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_vit_mlp_gpu(dtype):
    torch.manual_seed(6)
    x = torch.randn(8, 197, 768, device="cuda").to(dtype)
    weight, bias = torch.randn(3072, 768, device="cuda") / 28, torch.randn(3072, device="cuda")
    out = torch.full((8, 197, 3072), float("nan"), dtype=dtype, device="cuda")
    layer = Linear(weight, bias, activation="gelu", dtype=dtype)
    ref = reference(x, weight, bias, "gelu", dtype)
    for cfg in [None, *layer.configs]:
        layer.config = cfg
        out.fill_(float("nan"))
        layer(x, out)
        assert rel_err(out, ref) < TOL[dtype], cfg
