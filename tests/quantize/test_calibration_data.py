"""iter_calibration_batches: the accepted forms of calibration data, labels dropped, every check
naming the batch and input, and the user's tensors left untouched."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from torch_gie.quantize import calibration_data
from torch_gie.quantize.calibration_data import iter_calibration_batches

EXAMPLE = torch.zeros(2, 3, 4, 4)


def batches(data, example=EXAMPLE, **kwargs):
    return list(iter_calibration_batches(data, example, **kwargs))


def test_one_tensor_is_one_batch():
    x = torch.randn(5, 3, 4, 4)
    (got,) = batches(x)
    assert len(got) == 1 and got[0] is x  # nothing to move or cast: no copy


def test_list_of_batches_any_batch_size():
    data = [torch.randn(n, 3, 4, 4) for n in (1, 7, 3)]
    got = batches(data)
    assert [b[0].shape[0] for b in got] == [1, 7, 3]
    assert all(torch.equal(b[0], d) for b, d in zip(got, data))


def test_dataloader_with_labels_drops_labels():
    x, y = torch.randn(25, 3, 4, 4), torch.arange(25)
    got = batches(DataLoader(TensorDataset(x, y), batch_size=10))
    assert [len(b) for b in got] == [1, 1, 1]
    assert torch.equal(torch.cat([b[0] for b in got]), x)


def test_generator_without_len():
    got = batches(torch.randn(2, 3, 4, 4) for _ in range(3))
    assert len(got) == 3


def test_multi_input():
    example = (torch.zeros(1, 8), torch.zeros(1, 2, 3))
    a, b = torch.randn(4, 8), torch.randn(4, 2, 3)
    assert [len(t) for t in batches((a, b), example)] == [2]  # a tuple of k tensors is one batch
    assert len(batches([(a, b), [a, b]], example)) == 2
    ((ga, gb),) = batches([((a, b), torch.zeros(4))], example)  # ((inputs), label)
    assert ga is a and gb is b
    with pytest.raises(ValueError, match="batch 1: the model takes 2 inputs.*got 3 items"):
        batches([(a, b), (a, b, a)], example)


def test_float64_batch_is_cast_and_users_tensor_untouched():
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    before = x.clone()
    (got,) = batches([x])
    assert got[0].dtype == torch.float32 and got[0].data_ptr() != x.data_ptr()
    assert torch.equal(got[0], before.float())
    assert x.dtype == torch.float64 and torch.equal(x, before)


@pytest.mark.parametrize("bad, message", [
    (torch.randn(2, 3, 4), "batch 1, input 0: expected rank 4"),
    (torch.randn(2, 3, 4, 5), r"batch 1, input 0: expected shape \(N, 3, 4, 4\)"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.int64), "batch 1, input 0: expected a floating dtype.*got torch.int64"),
    (torch.zeros(0, 3, 4, 4), "batch 1, input 0: the batch is empty"),
])
def test_mismatched_batch(bad, message):
    with pytest.raises(ValueError, match=message):
        batches([torch.randn(2, 3, 4, 4), bad])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_names_batch_and_input(value):
    example = (torch.zeros(1, 4), torch.zeros(1, 4))
    b = torch.randn(3, 4)
    b[1, 2] = value
    before = b.clone()
    with pytest.raises(ValueError, match="batch 2, input 1: holds 1 NaN/Inf"):
        batches([(torch.randn(3, 4), torch.randn(3, 4))] * 2 + [(torch.randn(3, 4), b)], example)
    assert torch.equal(b.isnan(), before.isnan()) and torch.equal(b.nan_to_num(), before.nan_to_num())


def test_no_data():
    with pytest.raises(ValueError, match="calibration_data=.*calibration_cache"):
        batches(None)
    with pytest.raises(ValueError, match="no batches"):
        batches([])
    with pytest.raises(ValueError, match="no batches"):
        batches(DataLoader(TensorDataset(torch.zeros(0, 3, 4, 4)), batch_size=4))
    with pytest.raises(TypeError, match="calibration_data must be"):
        batches(3)


def test_progress_bar_only_with_len_and_when_asked(monkeypatch):
    seen = []
    real = calibration_data.tqdm

    def spy(iterable, **kwargs):
        seen.append((kwargs["total"], kwargs["disable"]))
        return real(iterable, **kwargs)

    monkeypatch.setattr(calibration_data, "tqdm", spy)
    data = [torch.randn(2, 3, 4, 4)] * 3
    batches(data)
    batches(data, progress=False)
    batches(iter(data))
    # None lets tqdm decide: shown on a terminal, off when stderr goes to a log file.
    assert seen == [(3, None), (3, True), (None, True)]


@pytest.mark.gpu
def test_batches_move_to_the_examples_device():
    example = torch.zeros(1, 3, 4, 4, device="cuda")
    x = torch.randn(2, 3, 4, 4)
    (got,) = batches([x], example)
    assert got[0].device.type == "cuda" and torch.equal(got[0].cpu(), x)
