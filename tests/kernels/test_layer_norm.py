"""LayerNorm kernel against F.layer_norm (and permute -> F.layer_norm -> permute for channels) on
fp32 references, outputs poisoned first."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rest_poisoned, channel_slice, rel_err

import torch_gie.kernels.layer_norm as ln
from torch_gie.kernels.layer_norm import LayerNorm, layer_norm_tiles

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def params(c, device, weight, bias):
    g = torch.Generator().manual_seed(c)
    w = (torch.rand(c, generator=g) + 0.5).to(device) if weight else None
    b = torch.randn(c, generator=g).to(device) if bias else None
    return w, b


def reference_last(x, w, b, eps):
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


def reference_channels(x, w, b, eps):
    """ConvNeXt's LayerNorm2d: normalize each pixel's channels."""
    return F.layer_norm(x.float().permute(0, 2, 3, 1), (x.shape[1],), w, b, eps).permute(0, 3, 1, 2)


def token_slice(n, length, d, dtype, device, fill=None, extra=5):
    """Features [2, 2 + d) of wider tokens (N, L, d + extra): (buffer, view)."""
    if fill is None:
        buf = (torch.randn(n, length, d + extra, device=device) * 2 + 1).to(dtype)
    else:
        buf = torch.full((n, length, d + extra), fill, dtype=dtype, device=device)
    return buf, buf[..., 2:2 + d]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("c", [7, 96, 384, 1000])
@pytest.mark.parametrize("weight,bias", [(True, True), (True, False), (False, True), (False, False)])
def test_last_dim_tokens(device, dtype, c, weight, bias):
    # ViT/Swin tokens: feature slices of wider rows (row stride > C), poisoned outside.
    torch.manual_seed(0)
    _, x = token_slice(2, 5, c, dtype, device)
    buf, out = token_slice(2, 5, c, dtype, device, fill=float("nan"))
    w, b = params(c, device, weight, bias)
    LayerNorm(w, b, 1e-6, -1, dtype)(x, out)
    assert rel_err(out, reference_last(x, w, b, 1e-6)) < TOL[dtype]
    assert torch.isnan(buf[..., :2]).all() and torch.isnan(buf[..., 2 + c:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(9, 100), (3, 4, 2, 33), (1, 1, 1, 7)])
def test_last_dim_ranks(device, dtype, shape):
    torch.manual_seed(1)
    x = (torch.randn(shape, device=device) + 3).to(dtype)  # far from zero: centered variance
    w, b = params(shape[-1], device, True, True)
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    LayerNorm(w, b, 1e-5, -1, dtype)(x, out)
    assert rel_err(out, reference_last(x, w, b, 1e-5)) < TOL[dtype]


def test_last_dim_transposed_view(device):
    # Rows and features both strided (a permuted view), and out in another layout.
    torch.manual_seed(2)
    x = torch.randn(3, 40, 6, device=device).transpose(1, 2)  # (3, 6, 40), feature stride 6
    w, b = params(40, device, True, True)
    out = torch.full((3, 6, 40), float("nan"), device=device)
    LayerNorm(w, b, 1e-5, -1, torch.float32)(x, out)
    assert rel_err(out, reference_last(x, w, b, 1e-5)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("c,hw", [(96, (5, 7)), (7, (3, 3)), (384, (2, 3))])
@pytest.mark.parametrize("weight,bias", [(True, True), (False, False)])
def test_channels_of_4d(device, dtype, c, hw, weight, bias):
    # ConvNeXt: dim 1 of a channels_last (N, C, H, W) view, here a channel slice of a wider buffer.
    torch.manual_seed(3)
    _, x = channel_slice((2, c, *hw), dtype, device)
    buf, out = channel_slice((2, c, *hw), dtype, device, fill=float("nan"))
    w, b = params(c, device, weight, bias)
    LayerNorm(w, b, 1e-6, 1, dtype)(x, out)
    assert rel_err(out, reference_channels(x, w, b, 1e-6)) < TOL[dtype]
    assert_rest_poisoned(buf, c)


@pytest.mark.parametrize("shape,dim", [((6, 10), 1), ((3, 10, 7), 1), ((2, 3, 10, 4), 2)])
def test_other_dims(device, shape, dim):
    # dim 1 of (N, C) is its last dim; (N, C, L) and other ranks normalize their dim the same way.
    torch.manual_seed(8)
    x = torch.randn(shape, device=device) + 2
    c = shape[dim]
    w, b = params(c, device, True, True)
    out = torch.full_like(x, float("nan"))
    LayerNorm(w, b, 1e-5, dim, torch.float32)(x, out)
    ref = F.layer_norm(x.movedim(dim, -1), (c,), w, b, 1e-5).movedim(-1, dim)
    assert rel_err(out, ref) < 1e-5


def test_channels_of_nchw(device):
    # Plain NCHW (channels strided by H*W) works too, only slower.
    torch.manual_seed(4)
    x = torch.randn(2, 10, 4, 5, device=device)
    w, b = params(10, device, True, True)
    out = torch.full_like(x, float("nan"))
    LayerNorm(w, b, 1e-5, 1, torch.float32)(x, out)
    assert rel_err(out, reference_channels(x, w, b, 1e-5)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("c", [4096, 5000])
def test_long_rows(device, dtype, c):
    torch.manual_seed(5)
    x = (torch.randn(3, c, device=device) * 3 + 10).to(dtype)
    w, b = params(c, device, True, True)
    out = torch.full_like(x, float("nan"))
    LayerNorm(w, b, 1e-5, -1, dtype)(x, out)
    assert rel_err(out, reference_last(x, w, b, 1e-5)) < TOL[dtype]


@pytest.mark.parametrize("c", [300, 64, 1000])
def test_chunked_passes(device, monkeypatch, c):
    # The three-pass path for rows longer than one tile, exercised with a small threshold.
    monkeypatch.setattr(ln, "_MAX_SINGLE_PASS_C", 32)
    monkeypatch.setattr(ln, "_CHUNK_C", 64)
    assert not layer_norm_tiles(c)[0]
    torch.manual_seed(6)
    _, x = token_slice(2, 3, c, torch.float32, device)
    x = x + 100  # a large mean: a one-pass sum of squares would lose the variance
    buf, out = token_slice(2, 3, c, torch.float32, device, fill=float("nan"))
    w, b = params(c, device, True, True)
    LayerNorm(w, b, 1e-5, -1, torch.float32)(x, out)
    assert rel_err(out, reference_last(x, w, b, 1e-5)) < 1e-5
    assert torch.isnan(buf[..., :2]).all() and torch.isnan(buf[..., 2 + c:]).all()


def test_tile_rule():
    assert layer_norm_tiles(96) == (True, 32, 128, 4)  # ConvNeXt-T stage 1: 32 pixels a program
    assert layer_norm_tiles(768) == (True, 4, 1024, 4)  # ViT-B
    assert layer_norm_tiles(8192) == (True, 1, 8192, 8)
    assert not layer_norm_tiles(8193)[0]


def test_errors(device):
    w = torch.ones(8, device=device)
    with pytest.raises(ValueError, match="dim must be"):
        LayerNorm(w, None, 1e-5, "last")
    with pytest.raises(ValueError, match="one length"):
        LayerNorm(w, torch.zeros(7, device=device))
    with pytest.raises(ValueError, match="dtype"):
        LayerNorm(w, None, dtype=torch.float64)
    with pytest.raises(ValueError, match="eps"):
        LayerNorm(w, None, 0.0)
    layer = LayerNorm(w, None, 1e-5, 1, torch.float32)
    x = torch.randn(2, 8, 3, 3, device=device)
    with pytest.raises(ValueError, match="with a dim 1 to normalize"):
        layer(x[0, 0, 0], x[0, 0, 0])
    with pytest.raises(ValueError, match="8 channels"):
        layer(x[:, :4], x[:, :4])
    with pytest.raises(ValueError, match="out must have"):
        layer(x, x[:, :, :2])
    with pytest.raises(ValueError, match="x must be torch.float32"):
        layer(x.half(), x)
    with pytest.raises(ValueError, match="x must be 2D to 4D"):
        LayerNorm(None, None, dtype=torch.float32)(x[None], x[None])


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dim", [
    ((32, 96, 56, 56), 1), ((32, 192, 28, 28), 1), ((32, 384, 14, 14), 1), ((32, 768, 7, 7), 1),
    ((32, 197, 768), -1), ((1, 197, 768), -1), ((32, 768), -1),
])
def test_real_shapes_gpu(shape, dim):
    # convnext_tiny (dim 1, channels_last) and vit_b_16 (tokens) at batch 32 (and 1), fp16.
    torch.manual_seed(7)
    x = torch.randn(shape, device="cuda").half()
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[dim]
    w, b = params(c, "cuda", True, True)
    out = torch.full_like(x, float("nan"))
    LayerNorm(w, b, 1e-6, dim, torch.float16)(x, out)
    ref = reference_channels(x, w, b, 1e-6) if dim == 1 else reference_last(x, w, b, 1e-6)
    assert rel_err(out, ref) < 1e-2
