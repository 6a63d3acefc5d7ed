"""Channel affine and add kernels against PyTorch on fp32 references, outputs poisoned first."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rest_poisoned, channel_slice, rel_err

from torch_gie.activations import ACTIVATION_NAMES, apply_activation
from torch_gie.kernels.elementwise import (
    Activation,
    Add,
    ChannelAffine,
    add,
    channel_affine,
)

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}
# exp overflows to inf for large |x| in the interpreter's numpy; the activations still saturate.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def affine_reference(x, scale, shift, activation):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return apply_activation(x.float() * scale.view(shape) + shift.view(shape), activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 70, 4, 5), (3, 10), (1, 1000)])
def test_channel_affine(device, dtype, shape):
    torch.manual_seed(0)
    _, x = channel_slice(shape, dtype, device)
    c = shape[1]
    scale, shift = torch.randn(c, device=device), torch.randn(c, device=device)
    buf, out = channel_slice(shape, dtype, device, fill=float("nan"))
    ChannelAffine(scale, shift, "relu", dtype)(x, out)
    assert rel_err(out, affine_reference(x, scale, shift, "relu")) < TOL[dtype]
    assert_rest_poisoned(buf, c)


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


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_activations(device, activation):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 4, 5, device=device) * 4
    scale, shift = torch.randn(3, device=device), torch.randn(3, device=device)
    out = torch.full_like(x, float("nan"))
    channel_affine(x, scale, shift, out, activation)
    assert rel_err(out, affine_reference(x, scale, shift, activation)) < 1e-5
    b = torch.randn_like(x)
    add(x, b, out, activation)
    assert rel_err(out, apply_activation(x + b, activation)) < 1e-5
    out.fill_(float("nan"))
    Activation(activation)(x[:, :, 1:], out[:, :, 1:])  # strided views; row 0 stays NaN
    assert rel_err(out[:, :, 1:], apply_activation(x[:, :, 1:], activation)) < 1e-5
    assert torch.isnan(out[:, :, 0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 70, 4, 5), (3, 10), (1, 1000)])
def test_add(device, dtype, shape):
    torch.manual_seed(3)
    _, a = channel_slice(shape, dtype, device)
    # b in plain contiguous (NCHW) layout: the operands need not share strides.
    b = torch.randn(shape, device=device).to(dtype)
    buf, out = channel_slice(shape, dtype, device, fill=float("nan"))
    Add("relu")(a, b, out)
    assert rel_err(out, F.relu(a.float() + b.float())) < TOL[dtype]
    assert_rest_poisoned(buf, shape[1])


def test_add_in_place(device):
    # Residual joins may write over one operand.
    torch.manual_seed(4)
    a, b = torch.randn(2, 4, 3, 3, device=device), torch.randn(2, 4, 3, 3, device=device)
    ref = a + b
    add(a, b, a)
    assert rel_err(a, ref) < 1e-5


def test_errors(device):
    x = torch.randn(2, 3, 4, 4, device=device)
    scale, shift = torch.randn(3, device=device), torch.randn(3, device=device)
    with pytest.raises(ValueError, match="scale and shift"):
        ChannelAffine(scale, torch.randn(4, device=device))
    with pytest.raises(ValueError, match="dtype"):
        ChannelAffine(scale, shift, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown activation"):
        Add("tanh")
    layer = ChannelAffine(scale, shift, dtype=torch.float32)
    with pytest.raises(ValueError, match="3 channels"):
        layer(torch.randn(2, 4, 4, 4, device=device), torch.empty(2, 4, 4, 4, device=device))
    with pytest.raises(ValueError, match="out must have shape"):
        layer(x, torch.empty(2, 3, 4, 5, device=device))
    with pytest.raises(ValueError, match="x must be torch.float32"):
        ChannelAffine(scale, shift, dtype=torch.float32)(x.half(), x.half())
    with pytest.raises(ValueError, match="4D"):
        layer(x[0], x[0])
    with pytest.raises(ValueError, match="b must have shape"):
        add(x, x[:, :2])
    with pytest.raises(ValueError, match="out must be torch.float32"):
        add(x, x, x.half())


@pytest.mark.gpu
def test_resnet_shapes_gpu():
    torch.manual_seed(5)
    shape = (32, 256, 56, 56)
    a = torch.randn(shape, device="cuda").half().contiguous(memory_format=torch.channels_last)
    b = torch.randn(shape, device="cuda").half().contiguous(memory_format=torch.channels_last)
    out = torch.full_like(a, float("nan"))
    Add("relu")(a, b, out)
    assert rel_err(out, F.relu(a.float() + b.float())) < 1e-2
    scale, shift = torch.randn(256, device="cuda"), torch.randn(256, device="cuda")
    ChannelAffine(scale, shift, "relu", torch.float16)(a, out)
    assert rel_err(out, affine_reference(a, scale, shift, "relu")) < 1e-2
