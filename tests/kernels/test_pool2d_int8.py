"""int8 windowed and adaptive pooling against ``quantize.arith``: a max of codes is exact (same
QParams in and out, or dequantized); an average is PyTorch's on the dequantized input,
requantized to the output's QParams or stored fp16."""
import helpers
import pytest
import torch
import torch.nn.functional as F
from quant_checks import (
    POISON,
    SIGNED,
    UNSIGNED,
    assert_rest_untouched,
    check_output,
    int8_slice,
    output_qparams,
    random_codes,
)

from torch_gie.kernels import pool2d
from torch_gie.kernels.pool2d import AdaptiveAvgPool2d, AdaptiveMaxPool2d, Pool2d
from torch_gie.quantize.arith import LayerQuant, QParams, dequantize

# (kind, kernel, stride, padding, dilation, ceil_mode, count_include_pad, divisor, pad_is_zeros)
POOLS = [
    ("max", 3, 2, 1, 1, False, True, None, False),  # ResNet stem
    ("max", 3, 2, 0, 1, True, True, None, False),  # GoogLeNet stem: windows overhang
    ("max", 3, 2, (3, 1, 0, 2), 1, True, True, None, True),  # windows wholly in the zero padding
    ("avg", 3, 2, 1, 1, False, True, None, False),
    ("avg", 3, 2, 1, 1, True, False, None, False),
    ("avg", 3, 1, 1, 1, False, True, 5, False),
    ("avg", 3, 2, (0, 1, 0, 1), 1, False, False, None, True),  # TF "SAME": the zeros count
]


def codes_input(shape, qp, device):
    _, x = int8_slice(shape, device)
    x.copy_(random_codes(x.shape, qp, device))
    return x


def reference(x, qp, params):
    """(fp32 real reference, its exact codes for a max)."""
    kind, k, s, p, d, ceil_mode, cip, div, zeros = params
    codes = x.cpu().float()
    if zeros:
        t, b, left, r = p
        real = F.pad(dequantize(x.cpu(), qp), (left, r, t, b))
        codes = F.pad(codes, (left, r, t, b), value=float(qp.zero_point))
        p = 0
    else:
        real = dequantize(x.cpu(), qp)
    if kind == "max":
        top = F.max_pool2d(codes, k, s, p, d, ceil_mode)
        return dequantize(top.to(torch.int8), qp), top.to(torch.int8)
    return F.avg_pool2d(real, k, s, p, ceil_mode, cip, div), None


def out_slice(shape, store_dtype, device):
    if store_dtype == torch.int8:
        return int8_slice(shape, device)
    return helpers.channel_slice(shape, store_dtype, device, fill=float("nan"))


@pytest.mark.parametrize("x_qp", [SIGNED, UNSIGNED], ids=["signed", "unsigned"])
@pytest.mark.parametrize("out_kind", ["int8", "fp16"])
@pytest.mark.parametrize("params", POOLS, ids=lambda p: "-".join(map(str, p)))
def test_pool2d_int8(device, x_qp, out_kind, params):
    """Channel slices of NHWC buffers in and out, a 9x11 map (odd, ragged tiles)."""
    torch.manual_seed(0)
    kind, k, s, p, d, ceil_mode, cip, div, zeros = params
    x = codes_input((2, 5, 9, 11), x_qp, device)
    ref, ref_codes = reference(x, x_qp, params)
    if out_kind == "fp16":
        q = LayerQuant(x_qp, None)
    else:
        q = LayerQuant(x_qp, x_qp if kind == "max" else output_qparams(ref, x_qp.unsigned))
    layer = Pool2d(kind, k, s, p, d, ceil_mode, cip, div, zeros, dtype=torch.int8, quant=q)
    oh, ow = layer.output_size(9, 11)
    assert (oh, ow) == tuple(ref.shape[2:])
    buf, out = out_slice((2, 5, oh, ow), q.store_dtype, device)
    layer(x, out)
    if kind == "max":  # exact
        expected = ref_codes if out_kind == "int8" else ref.half()
        assert torch.equal(out.cpu(), expected)
    else:
        check_output(out.cpu(), ref, q.output)
    if out_kind == "int8":
        assert_rest_untouched(buf, 5)
    else:
        helpers.assert_rest_poisoned(buf, 5)


MAX_POOLS = [p for p in POOLS if p[0] == "max"] + [("max", 2, 2, 0, 2, True, True, None, False)]


@pytest.mark.parametrize("x_qp", [SIGNED, UNSIGNED], ids=["signed", "unsigned"])
@pytest.mark.parametrize("channels, lead", [(8, 0), (12, 4), (4, 8)])
@pytest.mark.parametrize("params", MAX_POOLS, ids=lambda p: "-".join(map(str, p)))
def test_max_pool2d_int8_words(device, monkeypatch, x_qp, channels, lead, params):
    """Channel rows of whole 4-byte words (channels and channel offsets multiples of 4) take the
    word kernel, which compares four codes per word: exact against PyTorch's max of the codes,
    the buffer around the slices untouched; the word path is checked to run."""
    words = []
    monkeypatch.setattr(pool2d, "_launch_max_words", lambda *a: (words.append(a[3]), launch_words(*a)))
    torch.manual_seed(0)
    kind, k, s, p, d, ceil_mode, cip, div, zeros = params
    _, x = word_slice((2, channels, 9, 11), device, lead)
    x.copy_(random_codes(x.shape, x_qp, device))
    _, ref_codes = reference(x, x_qp, params)
    layer = Pool2d(kind, k, s, p, d, ceil_mode, cip, div, zeros, dtype=torch.int8,
                   quant=LayerQuant(x_qp, x_qp))
    buf, out = word_slice(tuple(ref_codes.shape), device, lead)
    layer(x, out)
    assert torch.equal(out.cpu(), ref_codes)
    assert (buf[:, :lead] == POISON).all() and (buf[:, lead + channels:] == POISON).all()
    assert words and words[0] in (1, 2, 4)


launch_words = pool2d._launch_max_words


@pytest.mark.parametrize("n, channels, hw", [(1, 192, 28), (128, 64, 56), (4, 832, 7), (2, 8, 5)])
def test_max_pool2d_int8_word_tiles(monkeypatch, n, channels, hw):
    """The word kernel's tile: BLOCK_W words of a pixel's row (at most its words, rounded up to
    a power of two, and 32), BLOCK_P pixels, MIN..MAX_TILE_WORDS per program, smaller where a
    small map would leave SMs idle. Checked on the launch itself (shapes only: nothing runs)."""
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append((grid, meta))
    monkeypatch.setattr(pool2d, "_max_pool_words_kernel", Recorder())
    x = torch.zeros(n, channels, hw, hw, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    Pool2d("max", 3, 1, 1, dtype=torch.int8, quant=LayerQuant(SIGNED, SIGNED))(x, torch.empty_like(x))
    (grid, meta), = launched
    words = channels // 4
    assert meta["BLOCK_W"] == min(32, 1 << (words - 1).bit_length())
    tile = meta["BLOCK_P"] * meta["BLOCK_W"]
    assert pool2d.MIN_TILE_WORDS <= tile <= pool2d.MAX_TILE_WORDS or meta["BLOCK_P"] == 1
    assert grid[0] * meta["BLOCK_P"] >= n * hw * hw and grid[1] * meta["BLOCK_W"] >= words
    if n * hw * hw * words >= 64 * pool2d.MAX_TILE_WORDS * 132:  # big: whole tiles
        assert tile == pool2d.MAX_TILE_WORDS


def word_slice(shape, device, lead):
    """A poisoned int8 NHWC buffer 8 channels wider than ``shape`` and its channels
    [lead, lead + C): word-aligned when lead and C are multiples of 4."""
    buf, view = int8_slice(shape, device, extra=8)
    return buf, view.as_strided(view.shape, view.stride(), view.storage_offset() - 2 + lead)


@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("in_hw,out_hw", [((13, 11), (7, 7)), ((5, 7), (2, 3))])
def test_adaptive_pool2d_int8(device, kind, in_hw, out_hw):
    torch.manual_seed(1)
    x = codes_input((2, 6, *in_hw), UNSIGNED, device)
    real = dequantize(x.cpu(), UNSIGNED)
    if kind == "max":
        ref = F.adaptive_max_pool2d(real, out_hw)
        q = LayerQuant(UNSIGNED, UNSIGNED)
        layer = AdaptiveMaxPool2d(out_hw, dtype=torch.int8, quant=q)
    else:
        ref = F.adaptive_avg_pool2d(real, out_hw)
        q = LayerQuant(UNSIGNED, output_qparams(ref, True))
        layer = AdaptiveAvgPool2d(out_hw, dtype=torch.int8, quant=q)
    buf, out = int8_slice((2, 6, *out_hw), device)
    layer(x, out)
    if kind == "max":
        assert torch.equal(out.cpu(), F.adaptive_max_pool2d(x.cpu().float(), out_hw).to(torch.int8))
    else:
        check_output(out.cpu(), ref, q.output)
    assert_rest_untouched(buf, 6)


def test_pool2d_int8_errors(device):
    with pytest.raises(ValueError, match="must equal its input"):
        Pool2d("max", 3, 2, 1, dtype=torch.int8, quant=LayerQuant(SIGNED, QParams(0.1, 0)))
    with pytest.raises(ValueError, match="needs quant"):
        Pool2d("avg", 3, dtype=torch.int8)
    with pytest.raises(ValueError, match="needs quant"):
        AdaptiveAvgPool2d(2, quant=LayerQuant(SIGNED))
    layer = Pool2d("avg", 3, 2, 1, dtype=torch.int8, quant=LayerQuant(SIGNED, SIGNED))
    x = random_codes((1, 3, 8, 8), SIGNED, device)
    with pytest.raises(ValueError, match="int8 x and torch.int8 out"):
        layer(x, torch.empty(1, 3, 4, 4, device=device))
    with pytest.raises(ValueError, match="share a dtype"):
        Pool2d("avg", 3, 2, 1)(x, torch.empty(1, 3, 4, 4, dtype=torch.int8, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("shape, k, s, p, ceil_mode, qp", [
    ((8, 64, 112, 112), 3, 2, 1, False, UNSIGNED),  # ResNet stem
    ((4, 480, 28, 28), 3, 1, 1, True, UNSIGNED),  # an inception branch pool
    ((3, 67, 15, 13), 3, 1, 1, False, SIGNED),  # odd channels: codes packed across pixels
    ((2, 5, 9, 9), 2, 2, 0, True, SIGNED),
])
def test_maxpool_int8_gpu(shape, k, s, p, ceil_mode, qp):
    """At real sizes on the GPU, where a word-aligned max compares four codes per register with
    ``max.s16x2`` (max_code_words): exact, negative codes included; 67 channels take the
    one-code-at-a-time kernel."""
    torch.manual_seed(3)
    x = random_codes(shape, qp, "cuda").contiguous(memory_format=torch.channels_last)
    ref = F.max_pool2d(x.float(), k, s, p, ceil_mode=ceil_mode).to(torch.int8)
    buf, out = word_slice(tuple(ref.shape), "cuda", 4)
    Pool2d("max", k, s, p, ceil_mode=ceil_mode, dtype=torch.int8, quant=LayerQuant(qp, qp))(x, out)
    torch.cuda.synchronize()
    assert torch.equal(out, ref)
    assert (buf[:, :4] == POISON).all() and (buf[:, 4 + shape[1]:] == POISON).all()
