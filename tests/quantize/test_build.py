"""int8 builds end to end on the CPU: the Triton kernels (interpreter) against the reference
backend's integer emulation on a network with every int8 path (concat slots, residual, max
pool, depthwise, SE gate, Linear), the calibration cache, per-layer pins and bad input."""
import copy
import json

import pytest
import torch
from torch import nn

import torch_gie
from torch_gie.quantize.calibrate import rebatch


class Block(nn.Module):
    """Stem, max pool, two branches into a concat, depthwise + SE, projection with residual."""

    def __init__(self, c: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.a = nn.Sequential(nn.Conv2d(c, c // 2, 1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(c, c // 2, 3, padding=1), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.ReLU6())
        self.se1, self.se2 = nn.Conv2d(c, 8, 1), nn.Conv2d(8, c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.pool(self.stem(x))
        y = torch.cat([self.a(x), self.b(x)], 1)
        z = self.dw(y)
        z = z * torch.sigmoid(self.se2(torch.relu(self.se1(z.mean((2, 3), keepdim=True)))))
        z = torch.relu(self.proj(z) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(z, 1), 1))


def _data(n=3, batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]


def _model():
    torch.manual_seed(0)
    return Block().eval()


def test_triton_int8_kernels_match_the_reference_emulation(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, cal = _model(), _data()
    x = _data(1, seed=5)[0]
    ref = torch_gie.compile(model, x, precision="int8", calibration_data=cal, backend="reference")
    tri = torch_gie.compile(model, x, precision="int8", calibration_data=cal, backend="triton")
    a, b = ref(x), tri(x)
    assert torch.equal(a, b), (a - b).abs().max()
    report = tri.report()
    assert report["int8"]["int8_layers"] >= 7 and report["concat_copies"] == 0
    with torch.no_grad():
        eager = model(x)
    assert ((a - eager).norm() / eager.norm()).item() < 0.1  # int8 close to fp32


def test_calibration_cache_is_reused_and_refused_for_another_model(tmp_path):
    model, cal, x = _model(), _data(), _data(1, seed=5)[0]
    path = tmp_path / "ranges.json"
    first = torch_gie.compile(model, x, precision="int8", calibration_data=cal, calibration_cache=path)
    assert json.loads(path.read_text())["tensors"]
    again = torch_gie.compile(model, x, precision="int8", calibration_cache=path)  # no data needed now
    assert torch.equal(first(x), again(x))
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 2)).eval()
    with pytest.raises(ValueError, match="calibration cache"):
        torch_gie.compile(other, x, precision="int8", calibration_cache=path)


def test_layer_precisions_pin_by_module_name_and_reject_unknown_names():
    model, cal, x = _model(), _data(), _data(1, seed=5)[0]
    pinned = torch_gie.compile(model, x, precision="int8", calibration_data=cal, layer_precisions={"fc": "fp16"})
    layers = {entry["name"]: entry["precision"] for entry in pinned.report()["layers"]}
    assert layers["fc"] != "int8" and layers["stem_0"] == "int8" and layers["dw_0"] == "int8"
    with pytest.raises(ValueError, match="not a conv, Linear or pool"):
        torch_gie.compile(model, x, precision="int8", calibration_data=cal, layer_precisions={"nope": "fp16"})
    with pytest.raises(ValueError, match="'fp16' or 'int8'"):
        torch_gie.compile(model, x, precision="int8", calibration_data=cal, layer_precisions={"fc": "bf16"})


def test_bad_calibration_data_is_named_and_nothing_is_modified():
    model, cal, x = _model(), _data(), _data(1, seed=5)[0]
    state, saved = copy.deepcopy(model.state_dict()), [t.clone() for t in cal]
    torch_gie.compile(model, x, precision="int8", calibration_data=cal)
    assert all(torch.equal(a, b) for a, b in zip(cal, saved))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    bad = [cal[0], cal[1].clone().index_fill_(0, torch.tensor([0]), float("nan"))]
    with pytest.raises(ValueError, match="batch 1"):
        torch_gie.compile(model, x, precision="int8", calibration_data=bad)
    with pytest.raises(ValueError, match="calibration"):
        torch_gie.compile(model, x, precision="int8", calibration_data=[torch.randn(2, 3, 8)])


def test_explain_reports_the_int8_plan():
    report = torch_gie.explain(_model(), _data(1)[0], precision="int8", calibration_data=_data())
    assert report["int8"]["int8_mac_share"] == 1.0


def test_calibration_batches_are_regrouped_to_the_compiled_batch_size():
    batches = [(torch.arange(3.0)[:, None],), (torch.arange(3.0, 8.0)[:, None],)]
    assert [b[0].flatten().tolist() for b in rebatch(iter(batches), 3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 6]]
    assert [b[0].shape[0] for b in rebatch(iter(batches), 16)] == [16]


class FallbackInside(nn.Module):
    """An int8 conv reading a PyTorch fallback's result, and a view that holds the batch size."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x):
        y = torch.relu(self.conv1(x)).cumsum(1)  # cumsum: no lowering, a fallback
        return self.fc(torch.relu(self.conv2(y)).reshape(2, -1))  # the batch size baked in


def test_int8_layers_read_fallback_results_and_batch_bound_views():
    torch.manual_seed(0)
    model, x = FallbackInside().eval(), torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="fallback"):
        engine = torch_gie.compile(model, x, precision="int8", calibration_data=_data(3, batch=3, size=8))
    with torch.no_grad():
        ref = model(x)
    assert ((engine(x) - ref).norm() / ref.norm()).item() < 0.05
