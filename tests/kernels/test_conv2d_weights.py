"""``kernels/conv2d_weights.py``'s tables of the int8 zero-point padding term: the per-tap
weight-code sums as base-128 int8 digits, and the per-pixel outside-tap matrix."""
import pytest
import torch

from torch_gie.kernels.conv2d_weights import padded_taps, padding_taps, zero_point_digits


@pytest.mark.parametrize("c_in,k", [(1, 3), (3, 3), (64, 3), (128, 3), (129, 3), (512, 3), (2048, 3), (48, 5), (8, 7)])
def test_digits_rebuild_the_tap_sums(c_in, k):
    codes = torch.randint(-127, 128, (6, c_in, k, k), dtype=torch.int8)
    codes[0], codes[1] = 127, -127  # the extreme sums
    table = zero_point_digits(codes)
    assert table.dtype == torch.int8 and table.shape[1:] == (padded_taps(k, k), 6)
    rebuilt = sum(table[d].long() * 128 ** d for d in range(table.shape[0]))
    wsum = codes.long().sum(1).reshape(6, k * k).t()
    assert torch.equal(rebuilt[:k * k], wsum) and not rebuilt[k * k:].any()
    assert (table[:-1] >= -64).all() and (table[:-1] <= 63).all()  # the lower digits, balanced


def test_padded_taps():
    assert [padded_taps(k, k) for k in (1, 3, 5, 7)] == [32, 32, 32, 64]


@pytest.mark.parametrize("hw,k,stride,pads,dil", [
    ((5, 6), 3, (1, 1), (1, 1, 1, 1), (1, 1)), ((7, 7), 3, (2, 2), (1, 1, 1, 1), (1, 1)),
    ((6, 5), 5, (1, 2), (2, 1, 0, 2), (1, 1)), ((9, 9), 3, (1, 1), (2, 2, 2, 2), (2, 2)),
])
def test_padding_taps_mark_exactly_the_taps_outside(hw, k, stride, pads, dil):
    (h, w), (top, bottom, left, right) = hw, pads
    oh = (h + top + bottom - dil[0] * (k - 1) - 1) // stride[0] + 1
    ow = (w + left + right - dil[1] * (k - 1) - 1) // stride[1] + 1
    table = padding_taps(hw, (oh, ow), (k, k), stride, pads, dil, padded_taps(k, k), -128, torch.device("cpu"))
    assert table.shape == (oh * ow, padded_taps(k, k)) and not table[:, k * k:].any()
    for p in range(oh * ow):
        for t in range(k * k):
            ih = p // ow * stride[0] - top + t // k * dil[0]
            iw = p % ow * stride[1] - left + t % k * dil[1]
            inside = 0 <= ih < h and 0 <= iw < w
            assert table[p, t].item() == (0 if inside else -128)
