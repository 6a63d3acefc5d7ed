"""The calibration cache: a faithful round trip, and a clear refusal of every cache that does not
belong to this graph or this format."""
import json

import pytest

from torch_gie.quantize.arith import QParams
from torch_gie.quantize.cache import (
    CACHE_VERSION,
    graph_fingerprint,
    load_calibration_cache,
    save_calibration_cache,
)
from torch_gie.quantize.calibrators import TensorRange

GRAPH = [("conv1", (1, 64, 56, 56)), ("relu1", (1, 64, 56, 56)), ("fc", (1, 1000))]
FP = graph_fingerprint(GRAPH)


def saved(tmp_path, **overrides):
    path = tmp_path / "model.calib.json"
    save_calibration_cache(path, {"conv1": (-2.5, 3.0, False), "relu1": (0.0, 6.1, True)}, FP, "entropy")
    if overrides:
        doc = json.loads(path.read_text())
        doc.update(overrides)
        path.write_text(json.dumps(doc))
    return path


def test_round_trip(tmp_path):
    ranges = {"conv1": (-2.5, 3.0, False), "relu1": QParams(6.1 / 255, -128), "fc": TensorRange(-1e-3, 7.0, False)}
    path = tmp_path / "c.json"
    save_calibration_cache(path, ranges, FP, "percentile")
    loaded = load_calibration_cache(path, FP, calibrator="percentile")
    assert loaded["conv1"] == TensorRange(-2.5, 3.0, False)
    assert loaded["relu1"] == TensorRange(0.0, 6.1 / 255 * 255, True)
    for name, value in ranges.items():
        expected = value if isinstance(value, QParams) else TensorRange(*value).qparams()
        assert loaded[name].qparams() == expected  # scales survive exactly
    assert json.loads(path.read_text())["calibrator"] == "percentile"
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # the temporary file is gone


def test_fingerprint_depends_on_names_shapes_and_order():
    assert graph_fingerprint(list(GRAPH)) == FP
    assert graph_fingerprint([("conv1", (1, 64, 56, 56)), ("relu2", (1, 64, 56, 56)), ("fc", (1, 1000))]) != FP
    assert graph_fingerprint([("conv1", (1, 64, 56, 56)), ("relu1", (1, 64, 28, 28)), ("fc", (1, 1000))]) != FP
    assert graph_fingerprint(GRAPH[::-1]) != FP


def test_another_graph_is_refused(tmp_path):
    path = saved(tmp_path)
    other = graph_fingerprint(GRAPH[:2])
    with pytest.raises(ValueError, match=f"another graph: fingerprint '{FP}', this model's is '{other}'.*delete"):
        load_calibration_cache(path, other)
    with pytest.raises(ValueError, match=r"not in the cache: \['fc'\]; in the cache only: \[\]"):
        load_calibration_cache(path, other, expected_names=["conv1", "relu1", "fc"])


def test_another_calibrator_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'entropy' calibrator, this build asks for 'mse'"):
        load_calibration_cache(saved(tmp_path), FP, calibrator="mse")


def test_another_version_is_refused(tmp_path):
    with pytest.raises(ValueError, match=f"version {CACHE_VERSION + 1}, this torch_gie reads version {CACHE_VERSION}"):
        load_calibration_cache(saved(tmp_path, version=CACHE_VERSION + 1), FP)


def test_malformed_json_is_a_clear_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"format": "torch_gie calibration cache", "version": 1, ')
    with pytest.raises(ValueError, match="not valid JSON.*delete the file") as info:
        load_calibration_cache(path, FP)
    assert type(info.value) is ValueError and info.value.__suppress_context__  # no JSONDecodeError trace
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a torch_gie calibration cache"):
        load_calibration_cache(path, FP)


@pytest.mark.parametrize("entry", [
    {"lo": 1.0, "hi": 0.0, "non_negative": False},
    {"lo": -1.0, "hi": 2.0, "non_negative": True},
    {"lo": "0", "hi": 2.0, "non_negative": True},
    {"hi": 2.0, "non_negative": True},
    {"lo": 0.0, "hi": 2.0, "non_negative": 1},
    [0.0, 2.0, True],
])
def test_malformed_entry_names_the_tensor(tmp_path, entry):
    path = saved(tmp_path, tensors={"conv1": {"lo": -1.0, "hi": 1.0, "non_negative": False}, "relu1": entry})
    with pytest.raises(ValueError, match="tensor 'relu1' has a malformed entry"):
        load_calibration_cache(path, FP)


def test_missing_fields_are_refused(tmp_path):
    path = saved(tmp_path)
    doc = json.loads(path.read_text())
    del doc["tensors"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="lacks its 'tensors'"):
        load_calibration_cache(path, FP)
    with pytest.raises(TypeError, match="expected QParams or"):
        save_calibration_cache(tmp_path / "d.json", {"x": (1.0, 2.0)}, FP, "minmax")
