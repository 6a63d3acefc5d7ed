"""Squeeze-and-excitation excitation kernel against the PyTorch block (adaptive_avg_pool2d ->
conv1x1 -> act -> conv1x1 -> act) on fp32 references, gates poisoned first."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rest_poisoned, channel_slice, rel_err

from torch_gie.activations import Act, apply_activation
from torch_gie.kernels.pool2d import spatial_split
from torch_gie.kernels.squeeze_excitation import SqueezeExcitation, se_configs

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def se_weights(c, cr, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(cr, c, 1, 1, generator=g) / c ** 0.5
    w2 = torch.randn(c, cr, 1, 1, generator=g) / cr ** 0.5
    b1 = torch.randn(cr, generator=g) * 0.1 if bias else None
    b2 = torch.randn(c, generator=g) * 0.1 if bias else None
    return [None if t is None else t.to(device) for t in (w1, b1, w2, b2)]


def se_reference(x, w1, b1, act1, w2, b2, act2, slope1=None, slope2=None):
    """The torchvision block in fp32: pool, 1x1 conv, act, 1x1 conv, act -> (N, C, 1, 1)."""
    s = F.adaptive_avg_pool2d(x.float(), 1)
    h = apply_activation(F.conv2d(s, w1.float(), None if b1 is None else b1.float()), act1, slope1)
    return apply_activation(F.conv2d(h, w2.float(), None if b2 is None else b2.float()), act2, slope2)


def run_se(device, dtype, n, c, cr, hw, act1, act2, bias=True, gate_4d=False, config=None):
    torch.manual_seed(1)
    w1, b1, w2, b2 = se_weights(c, cr, device, bias)
    slope1 = torch.rand(cr, device=device) if act1 == "prelu" else None
    slope2 = torch.rand(c, device=device) if act2 == "prelu" else None
    layer = SqueezeExcitation(w1, b1, act1, w2, b2, act2, dtype, act1_slope=slope1,
                              act2_slope=slope2, config=config)
    _, x = channel_slice((n, c, *hw), dtype, device)
    buf, gate = channel_slice((n, c), dtype, device, fill=float("nan"))
    view = gate[:, :, None, None] if gate_4d else gate
    layer(x, view)
    ref = se_reference(x, w1, b1, act1, w2, b2, act2, slope1, slope2)
    assert rel_err(gate, ref[:, :, 0, 0]) < TOL[dtype]
    assert_rest_poisoned(buf, c)
    return layer, x, view, ref.reshape(view.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("c,cr,hw", [
    (24, 6, (5, 7)),  # efficientnet_b0's second block, odd pixels
    (100, 25, (3, 3)),
    (1152, 48, (2, 3)),  # efficientnet_b0's last blocks: many channels, several blocks of each
    (300, 130, (4, 4)),  # several hidden-unit blocks
])
def test_squeeze_excitation(device, dtype, n, c, cr, hw):
    run_se(device, dtype, n, c, cr, hw, "silu", "sigmoid")


@pytest.mark.parametrize("act1,act2", [("relu", "hardsigmoid"), ("hardswish", "sigmoid"),
                                       (None, None), ("prelu", "prelu"),
                                       (Act("leaky_relu", 0.2), Act("clamp", 0.1, 0.8))],
                         ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_activations_and_biases(device, act1, act2, bias):
    run_se(device, torch.float32, 2, 20, 5, (3, 4), act1, act2, bias=bias, gate_4d=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_reduction_and_many_images(device, dtype):
    # 17 images (two image blocks) with enough pixels that stage 1 splits H*W over programs.
    assert spatial_split(17, 24, 30 * 29, torch.device("cpu")).split > 1
    run_se(device, dtype, 17, 24, 8, (30, 29), "relu", "sigmoid")


def test_every_config(device):
    # Partials summed one split at a time (BLOCK_S 1) or in 3D tiles, every tiling.
    layer, x, gate, ref = run_se(device, torch.float32, 3, 40, 20, (24, 24), "relu", "sigmoid")
    assert len(layer.configs) > 1
    configs = layer.configs + [{"BLOCK_N": 32, "BLOCK_K": 256, "BLOCK_R": 16, "BLOCK_C": 16,
                                "num_warps": 4}]
    for config in configs:
        layer.config = config
        gate.fill_(float("nan"))
        layer(x, gate)
        assert rel_err(gate, ref) < 1e-5, config


def test_workspace_kept(device):
    # Calls after the first must not allocate: they are captured into CUDA graphs.
    layer, x, gate, _ = run_se(device, torch.float32, 2, 16, 4, (20, 20), "relu", "sigmoid")
    ws = layer._partials
    layer(x, gate)
    layer(x[:1, :, :10], gate[:1])
    assert layer._partials is ws


def test_linear_weights(device):
    # Linear weights [Cr, C] / [C, Cr] (an SE block written with nn.Linear) work the same.
    w1, b1, w2, b2 = se_weights(12, 4, device)
    x = torch.randn(2, 12, 3, 3, device=device)
    gate = torch.full((2, 12), float("nan"), device=device)
    SqueezeExcitation(w1[:, :, 0, 0], b1, "relu", w2[:, :, 0, 0], b2, "sigmoid", torch.float32)(x, gate)
    assert rel_err(gate, se_reference(x, w1, b1, "relu", w2, b2, "sigmoid")[:, :, 0, 0]) < 1e-5


def test_configs_valid():
    for c, cr in [(24, 6), (1152, 48), (8000, 2000), (16, 4)]:
        for config in se_configs(c, cr):
            assert all(config[k] >= 16 for k in ("BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK_C"))


def test_errors(device):
    w1, b1, w2, b2 = se_weights(8, 2, device)
    with pytest.raises(ValueError, match=r"w2 must be \(8, 2\)"):
        SqueezeExcitation(w1, b1, "relu", w2[:4], b2, "sigmoid")
    with pytest.raises(ValueError, match=r"b1 must have shape \(2,\)"):
        SqueezeExcitation(w1, b2, "relu", w2, b2, "sigmoid")
    with pytest.raises(ValueError, match="prelu needs act2_slope"):
        SqueezeExcitation(w1, b1, "relu", w2, b2, "prelu")
    with pytest.raises(ValueError, match="act1_slope given"):
        SqueezeExcitation(w1, b1, "relu", w2, b2, "sigmoid", act1_slope=torch.ones(2))
    with pytest.raises(ValueError, match="dtype"):
        SqueezeExcitation(w1, b1, "relu", w2, b2, "sigmoid", torch.float64)
    layer = SqueezeExcitation(w1, b1, "relu", w2, b2, "sigmoid", torch.float32)
    x = torch.randn(2, 8, 3, 3, device=device)
    with pytest.raises(ValueError, match=r"x must be \(N, 8, H, W\)"):
        layer(x[:, :4], torch.empty(2, 4, device=device))
    with pytest.raises(ValueError, match="gate must be"):
        layer(x, torch.empty(2, 8, 2, device=device))
    with pytest.raises(ValueError, match="gate must be torch.float32"):
        layer(x, torch.empty(2, 8, device=device, dtype=torch.float16))
    with pytest.raises(ValueError, match="power of two >= 16"):
        layer.config = {**layer.config, "BLOCK_N": 8}
    with pytest.raises(ValueError, match="keys"):
        layer.config = {"BLOCK_N": 16}


# (N, C, H, W, Cr, act1, act2): efficientnet_b0, mobilenet_v3_large and regnet_y_400mf SE blocks.
REAL = [
    (32, 96, 112, 112, 4, "silu", "sigmoid"),
    (32, 144, 56, 56, 6, "silu", "sigmoid"),
    (32, 1152, 7, 7, 48, "silu", "sigmoid"),
    (32, 72, 28, 28, 24, "relu", "hardsigmoid"),
    (32, 960, 7, 7, 240, "relu", "hardsigmoid"),
    (32, 440, 7, 7, 52, "relu", "sigmoid"),
    (1, 96, 112, 112, 4, "silu", "sigmoid"),
    (1, 1152, 7, 7, 48, "silu", "sigmoid"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", REAL, ids=lambda s: "x".join(map(str, s[:5])))
def test_real_shapes_gpu(shape):
    n, c, h, w, cr, act1, act2 = shape
    torch.manual_seed(2)
    w1, b1, w2, b2 = se_weights(c, cr, "cuda")
    x = torch.randn(n, c, h, w, device="cuda").half().contiguous(memory_format=torch.channels_last)
    layer = SqueezeExcitation(w1, b1, act1, w2, b2, act2, torch.float16)
    ref = se_reference(x, w1, b1, act1, w2, b2, act2)
    gate = torch.empty(n, c, 1, 1, dtype=torch.float16, device="cuda")
    for config in layer.configs:
        layer.config = config
        gate.fill_(float("nan"))
        layer(x, gate)
        torch.cuda.synchronize()
        assert rel_err(gate, ref) < 1e-2, config
