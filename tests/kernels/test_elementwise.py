"""Elementwise kernels (channel affine, add, mul, channel scale, activation) against PyTorch on
fp32 references, outputs poisoned first."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rest_poisoned, channel_slice, rel_err

from torch_gie.activations import ACTIVATION_NAMES, Act, apply_activation
from torch_gie.kernels.elementwise import (
    Activation,
    Add,
    ChannelAffine,
    ChannelScale,
    Mul,
    add,
    channel_affine,
    mul,
)

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}
# exp overflows to inf for large |x| in the interpreter's numpy; the activations still saturate.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

# Every activation code, the parameterized ones with non-default parameters.
_PARAMS = {"leaky_relu": (0.1,), "elu": (0.7,), "clamp": (-0.5, 2.0)}
ACTS = [Act(name, *_PARAMS.get(name, ())) for name in ACTIVATION_NAMES]


def token_slice(shape, dtype, device, fill=None, extra=5):
    """Features [2, 2 + D) of a wider (N, L, D + extra) token buffer: (buffer, view)."""
    n, length, d = shape
    if fill is None:
        buf = torch.randn(n, length, d + extra, device=device).to(dtype)
    else:
        buf = torch.full((n, length, d + extra), fill, dtype=dtype, device=device)
    return buf, buf[..., 2:2 + d]


def strided(shape, dtype, device, fill=None):
    """A strided view of ``shape`` as the plan leaves them: a channel slice (channels_last for 4D),
    or a feature slice of tokens for 3D. Returns (buffer, view)."""
    if len(shape) == 3:
        return token_slice(shape, dtype, device, fill)
    return channel_slice(shape, dtype, device, fill)


def rest_poisoned(buf, view_shape):
    if len(view_shape) == 3:
        d = view_shape[-1]
        rest = torch.cat([buf[..., :2], buf[..., 2 + d:]], dim=-1)
        assert torch.isnan(rest).all()
        assert not torch.isnan(buf[..., 2:2 + d]).any()
    else:
        assert_rest_poisoned(buf, view_shape[1])


def per_channel(t, x):
    """[C] broadcast along x's channel dim (dim 1; the last dim of 3D tokens)."""
    return t if x.dim() == 3 else t.view((1, -1) + (1,) * (x.dim() - 2))


def ref_act(y, act, slope=None):
    if act is not None and act.name == "prelu":
        return torch.where(y > 0, y, y * per_channel(slope, y))
    return apply_activation(y, act)


def affine_reference(x, scale, shift, act, slope=None):
    return ref_act(x.float() * per_channel(scale, x) + per_channel(shift, x), act, slope)


SHAPES = [(2, 5, 3, 7), (1, 70, 4, 5), (3, 10), (1, 1000), (2, 7, 24), (1, 3, 150)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_channel_affine(device, dtype, shape):
    torch.manual_seed(0)
    _, x = strided(shape, dtype, device)
    c = shape[-1] if len(shape) == 3 else shape[1]
    scale, shift = torch.randn(c, device=device), torch.randn(c, device=device)
    buf, out = strided(shape, dtype, device, fill=float("nan"))
    ChannelAffine(scale, shift, "relu", dtype)(x, out)
    assert rel_err(out, affine_reference(x, scale, shift, Act("relu"))) < TOL[dtype]
    rest_poisoned(buf, shape)


def test_channel_affine_matches_batchnorm(device):
    # The op exists for an eval-mode BatchNorm that could not be folded into a conv.
    torch.manual_seed(1)
    x = torch.randn(2, 6, 5, 4, device=device)
    mean, var = torch.randn(6, device=device), torch.rand(6, device=device) + 0.5
    weight, bias = torch.randn(6, device=device), torch.randn(6, device=device)
    scale = weight / torch.sqrt(var + 1e-5)
    out = channel_affine(x, scale, bias - mean * scale, activation="relu6")
    ref = F.relu6(F.batch_norm(x, mean, var, weight, bias, training=False, eps=1e-5))
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 5, 6)], ids=["nchw", "tokens"])
def test_activations(device, act, shape):
    torch.manual_seed(2)
    x = torch.randn(shape, device=device) * 4
    c = shape[-1] if len(shape) == 3 else shape[1]
    slope = torch.randn(c, device=device) if act.name == "prelu" else None
    scale, shift = torch.randn(c, device=device), torch.randn(c, device=device)
    out = torch.full_like(x, float("nan"))
    channel_affine(x, scale, shift, out, act, slope)
    assert rel_err(out, affine_reference(x, scale, shift, act, slope)) < 1e-5
    b = torch.randn_like(x)
    out.fill_(float("nan"))
    add(x, b, out, act, slope)
    assert rel_err(out, ref_act(x + b, act, slope)) < 1e-5
    out.fill_(float("nan"))
    mul(x, b, out, act, slope)
    assert rel_err(out, ref_act(x * b, act, slope)) < 1e-5
    out.fill_(float("nan"))
    rows = (slice(None), slice(None), slice(1, None)) if len(shape) == 4 else (slice(None), slice(1, None))
    Activation(act, slope)(x[rows], out[rows])  # strided views of rows 1..: row 0 stays NaN
    assert rel_err(out[rows], ref_act(x[rows], act, slope)) < 1e-5
    assert torch.isnan(out[:, :, 0] if len(shape) == 4 else out[:, 0]).all()


@pytest.mark.parametrize("layer", [Add, Mul])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_binary(device, layer, dtype, shape):
    torch.manual_seed(3)
    _, a = strided(shape, dtype, device)
    # b in plain contiguous layout: the operands need not share strides.
    b = torch.randn(shape, device=device).to(dtype)
    buf, out = strided(shape, dtype, device, fill=float("nan"))
    layer("relu")(a, b, out)
    ref = a.float() + b.float() if layer is Add else a.float() * b.float()
    assert rel_err(out, F.relu(ref)) < TOL[dtype]
    rest_poisoned(buf, shape)


# (a shape, b shape): b expands with zero strides (per-channel constants, an SE gate, a row).
BROADCASTS = [
    ((2, 6, 5, 3), (6, 1, 1)),
    ((2, 6, 5, 3), (2, 6, 1, 1)),
    ((2, 6, 5, 3), (1, 6, 5, 3)),
    ((2, 6, 5, 3), ()),
    ((2, 7, 24), (24,)),
    ((2, 7, 24), (2, 1, 24)),
    ((3, 10), (10,)),
    ((3, 10), (3, 1)),
]


@pytest.mark.parametrize("layer", [Add, Mul])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b_fp32", [False, True])
@pytest.mark.parametrize("a_shape,b_shape", BROADCASTS)
def test_binary_broadcast(device, layer, dtype, b_fp32, a_shape, b_shape):
    torch.manual_seed(4)
    _, a = strided(a_shape, dtype, device)
    b = torch.randn(b_shape, device=device).to(torch.float32 if b_fp32 else dtype)
    buf, out = strided(a_shape, dtype, device, fill=float("nan"))
    layer(Act("leaky_relu", 0.2))(a, b, out)
    ref = a.float() + b.float() if layer is Add else a.float() * b.float()
    assert rel_err(out, F.leaky_relu(ref, 0.2)) < TOL[dtype]
    rest_poisoned(buf, a_shape)
    # Either operand may be the broadcast (or the fp32) one.
    out2 = torch.full(a_shape, float("nan"), dtype=dtype, device=device)
    layer(Act("leaky_relu", 0.2))(b, a, out2)
    assert rel_err(out2, F.leaky_relu(ref, 0.2)) < TOL[dtype]


def test_binary_in_place(device):
    # Residual joins may write over one operand.
    torch.manual_seed(5)
    a, b = torch.randn(2, 4, 3, 3, device=device), torch.randn(2, 4, 3, 3, device=device)
    ref = a + b
    add(a, b, a)
    assert rel_err(a, ref) < 1e-5
    ref = a * b
    mul(a, b, b)
    assert rel_err(b, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gate_fp32", [False, True])
@pytest.mark.parametrize("gate_4d", [False, True])
@pytest.mark.parametrize("shape", [(2, 24, 5, 7), (3, 70, 3, 3), (2, 9, 33), (4, 130)])
def test_channel_scale(device, dtype, gate_fp32, gate_4d, shape):
    torch.manual_seed(6)
    _, x = strided(shape, dtype, device)
    n, c = shape[0], (shape[-1] if len(shape) == 3 else shape[1])
    # The gate as the SE excitation leaves it: a channel slice of a wider (N, C + 3) buffer.
    gate_buf = torch.rand(n, c + 3, device=device).to(torch.float32 if gate_fp32 else dtype)
    gate = gate_buf[:, 1:1 + c]
    if gate_4d:
        gate = gate[:, :, None, None]
    buf, out = strided(shape, dtype, device, fill=float("nan"))
    ChannelScale()(x, gate, out)
    g = gate.float().reshape(n, c)
    g = g[:, None, :] if len(shape) == 3 else g.view((n, c) + (1,) * (len(shape) - 2))
    assert rel_err(out, x.float() * g) < TOL[dtype]
    rest_poisoned(buf, shape)


def test_errors(device):
    x = torch.randn(2, 3, 4, 4, device=device)
    scale, shift = torch.randn(3, device=device), torch.randn(3, device=device)
    with pytest.raises(ValueError, match="scale and shift"):
        ChannelAffine(scale, torch.randn(4, device=device))
    with pytest.raises(ValueError, match="dtype"):
        ChannelAffine(scale, shift, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown activation"):
        Add("tanhh")
    with pytest.raises(ValueError, match="prelu needs act_slope"):
        Activation("prelu")
    with pytest.raises(ValueError, match="act_slope must have 3 entries"):
        ChannelAffine(scale, shift, "prelu", torch.float32, torch.randn(4, device=device))
    with pytest.raises(ValueError, match="act_slope has 5 entries"):
        Mul("prelu", torch.randn(5, device=device))(x, x, torch.empty_like(x))
    layer = ChannelAffine(scale, shift, dtype=torch.float32)
    with pytest.raises(ValueError, match="3 channels"):
        layer(torch.randn(2, 4, 4, 4, device=device), torch.empty(2, 4, 4, 4, device=device))
    with pytest.raises(ValueError, match="out must have shape"):
        layer(x, torch.empty(2, 3, 4, 5, device=device))
    with pytest.raises(ValueError, match="x must be one of"):
        layer(x.half(), x.half())
    with pytest.raises(ValueError, match="2D"):
        layer(x[0, 0, 0], x[0, 0, 0])
    with pytest.raises(ValueError, match="do not broadcast"):
        add(x, x[:, :2])
    with pytest.raises(ValueError, match="a must be one of"):
        add(x.double(), x, x.half())
    with pytest.raises(ValueError, match="b must be one of"):
        add(x.half(), x.double())
    with pytest.raises(ValueError, match="gate must be"):
        ChannelScale()(x, torch.rand(2, 4, device=device), torch.empty_like(x))
    with pytest.raises(ValueError, match="gate must be torch.float16"):
        ChannelScale()(x.half(), torch.rand(2, 3, device=device).double(), torch.empty_like(x.half()))


@pytest.mark.gpu
def test_resnet_shapes_gpu():
    torch.manual_seed(7)
    shape = (32, 256, 56, 56)
    a = torch.randn(shape, device="cuda").half().contiguous(memory_format=torch.channels_last)
    b = torch.randn(shape, device="cuda").half().contiguous(memory_format=torch.channels_last)
    out = torch.full_like(a, float("nan"))
    Add("relu")(a, b, out)
    assert rel_err(out, F.relu(a.float() + b.float())) < 1e-2
    scale, shift = torch.randn(256, device="cuda"), torch.randn(256, device="cuda")
    out.fill_(float("nan"))
    ChannelAffine(scale, shift, "relu", torch.float16)(a, out)
    assert rel_err(out, affine_reference(a, scale, shift, Act("relu"))) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("c,hw", [(96, 112), (144, 56), (240, 28), (1152, 7)])
def test_efficientnet_se_multiply_gpu(c, hw):
    # efficientnet_b0's squeeze-and-excitation multiplies at batch 32, gate (N, C, 1, 1) fp16.
    torch.manual_seed(8)
    x = torch.randn(32, c, hw, hw, device="cuda").half().contiguous(memory_format=torch.channels_last)
    gate = torch.rand(32, c, 1, 1, device="cuda").half()
    out = torch.full_like(x, float("nan"))
    ChannelScale()(x, gate, out)
    assert rel_err(out, x.float() * gate.float()) < 1e-2
    out.fill_(float("nan"))
    Mul()(x, gate, out)
    assert rel_err(out, x.float() * gate.float()) < 1e-2
