"""Global pooling (mean / max over H*W) against torch on fp32 references, outputs poisoned first:
whole-map tiles (small maps, one launch) and split maps (partials, then their reduction)."""
import helpers
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rest_poisoned, rel_err

from torch_gie.kernels.global_pool import GlobalPool2d, SpatialSplit, spatial_split
from torch_gie.kernels.pool2d import AdaptiveAvgPool2d, AdaptivePool2d

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}
CPU = torch.device("cpu")  # the split rule assumes an H100's 132 SMs without a GPU


def check(out, ref, kind, dtype):
    if kind == "max":  # a max selects one input value: exact in any dtype
        assert torch.equal(out.float(), ref)
    else:
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("n,c,hw", [
    (2, 5, (40, 41)),  # split, ragged last chunk
    (3, 130, (9, 7)),  # whole-map tile, two channel blocks of C > 128
    (1, 3, (64, 64)),
    (2, 200, (14, 14)),  # whole-map tile of 256 pixels, 32-channel blocks
    (2, 72, (28, 28)),  # split into one tile per program
    (1, 1, (1, 1)),
])
def test_global_pool_2d_out(device, dtype, kind, n, c, hw):
    # x.mean((2, 3)) / x.amax((2, 3)): a (N, C) result, here a channel slice of a wider buffer.
    torch.manual_seed(7)
    _, x = helpers.channel_slice((n, c, *hw), dtype, device)
    buf, out = helpers.channel_slice((n, c), dtype, device, fill=float("nan"))
    GlobalPool2d(kind)(x, out)
    ref = x.float().mean((2, 3)) if kind == "avg" else x.float().amax((2, 3))
    check(out, ref, kind, dtype)
    assert_rest_poisoned(buf, c)
    out4 = torch.full((n, c, 1, 1), float("nan"), dtype=dtype, device=device)
    layer = AdaptivePool2d(kind, 1)
    layer(x, out4)
    check(out4, ref[:, :, None, None], kind, dtype)
    assert layer.launches == (1 if spatial_split(n, c, hw[0] * hw[1], x.device).split == 1 else 2)


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_global_pool_strided_pixels(device, kind):
    # Plain NCHW input, and a spatial crop whose rows are not consecutive in memory.
    torch.manual_seed(8)
    x = torch.randn(2, 6, 30, 31, device=device)
    for view in (x, x.contiguous(memory_format=torch.channels_last)[:, :, 1:, 2:]):
        out = torch.full((2, 6), float("nan"), device=device)
        GlobalPool2d(kind)(view, out)
        ref = view.mean((2, 3)) if kind == "avg" else view.amax((2, 3))
        check(out, ref, kind, torch.float32)


def test_spatial_split_rule():
    sp = spatial_split(32, 96, 112 * 112, CPU)
    assert sp.split > 1 and sp.chunk % sp.block_hw == 0 and sp.split * sp.chunk >= 112 * 112
    assert 32 * sp.split >= 4 * 132  # enough programs for the SMs
    assert spatial_split(1, 16, 512 * 512, CPU).split == SpatialSplit.MAX_SPLIT


@pytest.mark.parametrize("n,c,hw", [(32, 1280, 49), (32, 2048, 49), (32, 672, 196), (32, 240, 196),
                                    (1, 1152, 49), (32, 72, 49), (128, 2048, 49)])
def test_small_maps_one_tile(n, c, hw):
    # 7x7 / 14x14: each program loads its whole map at once; no split, no second launch.
    sp = spatial_split(n, c, hw, CPU)
    assert sp.split == 1 and sp.block_hw >= hw and sp.chunk >= hw
    assert sp.block_hw * sp.block_c <= SpatialSplit.TILE
    assert sp.block_c >= min(c, SpatialSplit.MIN_BLOCK_C)


@pytest.mark.parametrize("n,c,hw", [(32, 144, 784), (32, 72, 784), (32, 240, 784), (32, 104, 784)])
def test_medium_maps_split_to_fill(n, c, hw):
    # 28x28 at batch 32: few (image, channel block) programs, so split until each reads one tile.
    sp = spatial_split(n, c, hw, CPU)
    assert sp.split > 1 and sp.chunk == sp.block_hw
    assert n * sp.split * -(-c // sp.block_c) >= 2 * 132


def test_global_pool_workspace_kept(device):
    # Calls after the first must not allocate: they are captured into CUDA graphs.
    layer = GlobalPool2d("avg")
    x = torch.randn(1, 4, 96, 96, device=device)
    out = torch.empty(1, 4, device=device)
    layer(x, out)
    ws = layer._partials
    assert ws is not None
    layer(x, out)
    layer(x[:, :, :80], out)
    assert layer._partials is ws
    assert layer.launches == 2  # split: partials, then their reduction
    assert rel_err(out, x[:, :, :80].mean((2, 3))) < 1e-5


def test_global_pool_errors(device):
    x = torch.randn(1, 3, 8, 8, device=device)
    with pytest.raises(ValueError, match="kind"):
        GlobalPool2d("min")
    with pytest.raises(ValueError, match=r"\(N, C\) or \(N, C, 1, 1\)"):
        GlobalPool2d("avg")(x, torch.empty(1, 3, 2, 2, device=device))
    with pytest.raises(ValueError, match="keep x's"):
        GlobalPool2d("max")(x, torch.empty(1, 4, device=device))
    with pytest.raises(ValueError, match="dtype"):
        GlobalPool2d("max")(x, torch.empty(1, 3, device=device, dtype=torch.float16))


@pytest.mark.gpu
def test_resnet_global_pool_gpu():
    torch.manual_seed(4)
    x = torch.randn(128, 2048, 7, 7, device="cuda").half()
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.full((128, 2048, 1, 1), float("nan"), dtype=torch.float16, device="cuda")
    AdaptiveAvgPool2d(1)(x, out)
    assert rel_err(out, F.adaptive_avg_pool2d(x.float(), 1)) < 1e-2


# Global pools at batch 32 (and 1): efficientnet_b0 / mobilenet_v3_large / regnet_y_400mf
# squeeze-and-excitation inputs (large H*W: split over programs) and classifier heads.
GLOBAL_SHAPES = [(32, 96, 112, 112), (32, 144, 56, 56), (32, 144, 28, 28), (32, 72, 28, 28),
                 (32, 672, 14, 14), (32, 208, 14, 14), (32, 1280, 7, 7), (32, 960, 7, 7),
                 (1, 96, 112, 112), (1, 1280, 7, 7)]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("shape", GLOBAL_SHAPES)
def test_global_pool_real_shapes_gpu(kind, shape):
    torch.manual_seed(9)
    x = torch.randn(shape, device="cuda").half().contiguous(memory_format=torch.channels_last)
    out = torch.full(shape[:2], float("nan"), dtype=torch.float16, device="cuda")
    layer = GlobalPool2d(kind)
    for _ in range(2):  # the second call reuses the workspace
        layer(x, out)
        ref = x.float().mean((2, 3)) if kind == "avg" else x.float().amax((2, 3))
        check(out, ref, kind, torch.float16)
        out.fill_(float("nan"))
