"""The accuracy-budget search (``compile(..., accuracy_budget=...)``) on a small CNN with the
reference backend: a budget all-int8 meets changes nothing, a strict one keeps layers in fp16 and
the compiled model meets it against eager fp32, an impossible one and bad keys raise, user pins
survive, and neither the model nor the calibration batches are touched."""
import pytest
import torch
from helpers import randomize_
from torch import nn

import torch_gie
from torch_gie.quantize.budget import compare, sample_chunks

BATCH = 4


def small_cnn():
    torch.manual_seed(0)
    return randomize_(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))).eval()


@pytest.fixture(scope="module")
def model():
    return small_cnn()


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, 3, 16, 16, generator=g) for _ in range(4)]


def build(model, batches, **kw):
    return torch_gie.compile(model, torch.zeros(BATCH, 3, 16, 16), precision="int8", backend="reference",
                             calibration_data=batches, **kw)


def measured(compiled, model, batches) -> dict:
    """The budget's metrics of the compiled model against eager fp32 on the calibration batches."""
    with torch.no_grad():
        ref = torch.cat([model(b) for b in batches])
        out = torch.cat([compiled(b) for b in batches])
    return compare(ref, out)


def int8_precisions(compiled) -> dict[str, str]:
    return {layer["name"]: layer["precision"] for layer in compiled.report()["layers"] if "macs" in layer}


@pytest.fixture(scope="module")
def all_int8(model, batches):
    """The all-int8 build, with a budget it meets (the search then measures it once)."""
    return build(model, batches, accuracy_budget={"sqnr_db": 0.0})


def test_budget_all_int8_meets_changes_nothing(model, batches, all_int8):
    plain = build(model, batches)
    assert int8_precisions(all_int8) == int8_precisions(plain)
    assert set(int8_precisions(plain).values()) == {"int8"}
    search = all_int8.report()["int8_search"]
    assert search["fp16_layers"] == [] and search["evaluations"] == 1
    assert [e["step"] for e in search["log"]] == ["all int8"] and search["log"][0]["meets"]
    assert plain.report()["int8_search"] is None
    assert torch.equal(all_int8(batches[1]), plain(batches[1]))


def test_strict_sqnr_budget_keeps_layers_in_fp16_and_holds(model, batches, all_int8):
    base_sqnr = all_int8.report()["int8_search"]["log"][0]["sqnr_db"]
    budget = {"sqnr_db": base_sqnr + 6.0}  # a quarter of the all-int8 noise power
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = [b.clone() for b in batches]
    compiled = build(model, iter(data), accuracy_budget=budget)  # an iterator: read once, kept for the search
    # the user's model and calibration batches are untouched
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and not model.training
    assert all(torch.equal(a, b) for a, b in zip(data, batches))
    search = compiled.report()["int8_search"]
    kept = [name for name, prec in int8_precisions(compiled).items() if prec != "int8"]
    assert 0 < len(kept) < search["candidates"] and len(search["fp16_layers"]) == len(kept)
    steps = [e["step"] for e in search["log"]]
    assert steps[0] == "all int8" and steps.count("rank") == search["candidates"]
    assert search["evaluations"] == len(steps)
    assert any(e["meets"] and e["fp16_layers"] == len(kept) for e in search["log"] if e["step"] in ("grow", "bisect"))
    assert measured(compiled, model, batches)["sqnr_db"] >= budget["sqnr_db"]
    assert "int8 accuracy budget" in torch_gie.format_report(compiled.report())


def test_impossible_budget_raises(model, batches):
    with pytest.raises(ValueError, match="cannot be met.*every int8-capable layer in fp16"):
        build(model, batches, accuracy_budget={"top1_agreement": 1.0, "sqnr_db": 299.0})


@pytest.mark.parametrize("budget, match", [
    ({"top5": 0.9}, "unknown key.*'top1_agreement'.*'sqnr_db'"),
    ({}, "non-empty dict"),
    (0.95, "non-empty dict"),
    ({"top1_agreement": 95}, r"fraction in \[0, 1\]"),
    ({"sqnr_db": "30"}, "finite number"),
])
def test_bad_budgets_raise_before_calibration(model, batches, budget, match):
    with pytest.raises(ValueError, match=match):
        build(model, batches, accuracy_budget=budget)


def test_budget_needs_int8_and_calibration_data(model, batches, tmp_path):
    with pytest.raises(ValueError, match="precision='int8'"):
        torch_gie.compile(model, batches[0], precision="fp16", backend="reference", accuracy_budget={"sqnr_db": 20})
    cache = tmp_path / "cal.json"
    with pytest.raises(ValueError, match="measures the network on calibration_data"):
        torch_gie.compile(model, batches[0], precision="int8", backend="reference", calibration_cache=cache,
                          accuracy_budget={"sqnr_db": 20})
    written = build(model, batches, calibration_cache=cache, accuracy_budget={"sqnr_db": 0.0})
    assert cache.exists()
    # a cache and data: ranges from the cache, samples from the data
    read = build(model, batches, calibration_cache=cache, accuracy_budget={"sqnr_db": 0.0})
    assert read.report()["int8_search"]["samples"] == BATCH * len(batches)
    assert read.report()["int8_search"]["log"] == written.report()["int8_search"]["log"]


def test_layer_precision_pins_survive_the_search(model, batches, all_int8):
    first = next(iter(int8_precisions(all_int8)))  # the stem conv's layer, "_0"
    budget = {"sqnr_db": all_int8.report()["int8_search"]["log"][0]["sqnr_db"] + 6.0}
    compiled = build(model, batches, layer_precisions={first: "fp16"}, accuracy_budget=budget)
    precisions = int8_precisions(compiled)
    assert precisions[first] != "int8"
    search = compiled.report()["int8_search"]
    assert search["log"][0]["fp16_layers"] == 1 and search["candidates"] == len(precisions) - 1
    assert measured(compiled, model, batches)["sqnr_db"] >= budget["sqnr_db"]


def test_sample_chunks_regroup_and_pad():
    batches = [(torch.arange(3.0).reshape(3, 1),), (torch.arange(3.0, 8.0).reshape(5, 1),)]
    chunks = sample_chunks(batches, batch_size=3, limit=7)
    assert [n for _, n in chunks] == [3, 3, 1]
    assert torch.equal(chunks[2][0][0].flatten(), torch.tensor([6.0, 0.0, 0.0]))


def test_compare_metrics():
    ref = torch.tensor([[3.0, 1.0], [0.0, 2.0]])
    same = compare(ref, ref.clone())
    assert same["top1_agreement"] == 1.0 and same["sqnr_db"] == 300.0
    flipped = compare(ref, torch.tensor([[3.0, 1.0], [2.0, 0.0]]))
    assert flipped["top1_agreement"] == 0.5
