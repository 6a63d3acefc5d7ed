"""The int8 accuracy benchmark's metrics (benchmarks/accuracy.py) on hand-made logits."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import accuracy  # noqa: E402

REF = torch.tensor([[4.0, 1.0, 0.0, 0.0, 0.0, 0.0],    # confident (p ~ 0.87), class 0
                    [1.0, 1.1, 0.0, 0.0, 0.0, 0.0],    # not confident, class 1
                    [0.0, 0.0, 0.0, 0.0, 0.0, 5.0]])   # confident, class 5


def test_identical_logits_agree_everywhere():
    m = accuracy.compare_logits(REF, REF.clone())
    assert m["top1_agreement"] == m["confident_agreement"] == m["top5_contains_fp32"] == 1.0
    assert m["confident_crops"] == 2 and m["crops"] == 3
    assert m["sqnr_db"] == accuracy.SQNR_CAP_DB


def test_agreement_counts_top1_and_confident_rows():
    out = REF.clone()
    out[1] = torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0, 0.0])   # flips the unconfident row
    out[2] = torch.tensor([6.0, 0.0, 0.0, 0.0, 0.0, 5.0])   # flips a confident row
    m = accuracy.compare_logits(REF, out)
    assert m["top1_agreement"] == pytest.approx(1 / 3)
    assert m["confident_agreement"] == pytest.approx(1 / 2)
    assert m["top5_contains_fp32"] == 1.0


def test_top5_misses_when_reference_class_ranks_sixth():
    out = torch.tensor([[0.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    ref = torch.tensor([[9.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert accuracy.top5_contains_reference(ref, out) == 0.0
    assert accuracy.top5_contains_reference(ref, out.roll(1, dims=1)) == 1.0  # class 0 now ranks second


def test_sqnr_is_per_row_then_mean():
    ref = torch.tensor([[3.0, 4.0], [1.0, 0.0]])   # |ref|^2 = 25, 1
    out = ref + torch.tensor([[0.5, 0.0], [0.0, 0.1]])   # |noise|^2 = 0.25, 0.01
    per_row = accuracy.logit_sqnr_db(ref, out)
    assert per_row.tolist() == pytest.approx([20.0, 20.0])
    out[0] = ref[0] + torch.tensor([5.0, 0.0])   # 0 dB on the first row
    assert accuracy.compare_logits(ref, out)["sqnr_db"] == pytest.approx((10 * math.log10(25 / 25) + 20.0) / 2)


def test_no_confident_rows_gives_none():
    flat = torch.zeros(4, 10)
    m = accuracy.compare_logits(flat, flat)
    assert m["confident_crops"] == 0 and m["confident_agreement"] is None


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        accuracy.compare_logits(REF, REF[:2])
