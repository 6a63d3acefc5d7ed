"""Engine files (torch_gie.save / torch_gie.load): bit-identical round trips, loading without the
model's code in a fresh process, and refusal of damaged, forged, foreign and pickle files."""
import json
import os
import pickle
import struct
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize_
from torch import nn

import torch_gie
from torch_gie import serialize


class OnlyHere(nn.Module):
    """Defined only in this test module: a fresh process cannot import it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = torch.roll(y, 1, dims=2) + y.softmax(1)  # fallbacks: a torch function, a Tensor method
        return F.pixel_shuffle(self.head(y), 2).sum((2, 3))


def small_cnn():
    return randomize_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(2),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))).eval()


def _compile(model, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback-op warnings
        return torch_gie.compile(model, x, backend="reference", **{"precision": "fp32", **kw})


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """(compiled small CNN, its input, path of its engine file)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    compiled = _compile(small_cnn(), x)
    path = tmp_path_factory.mktemp("engine") / "cnn.gie"
    torch_gie.save(compiled, path)
    return compiled, x, path


def test_resnet18_fp32_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    compiled = _compile(model, x)
    torch_gie.save(compiled, tmp_path / "r18.gie")
    loaded = torch_gie.load(tmp_path / "r18.gie")
    assert torch.equal(loaded(x), compiled(x))
    report = loaded.report()
    assert report["loaded_from"] == str(tmp_path / "r18.gie") and report["model"] == "ResNet"
    assert report["launches"] == compiled.report()["launches"] and report["fusions"] == compiled.report()["fusions"]


def test_int8_round_trip_is_bit_identical_and_keeps_quantization(tmp_path):
    torch.manual_seed(0)
    x, cal = torch.randn(2, 3, 8, 8), [torch.randn(2, 3, 8, 8) for _ in range(3)]
    compiled = _compile(small_cnn(), x, precision="int8", calibration_data=cal)
    torch_gie.save(compiled, tmp_path / "int8.gie")
    loaded = torch_gie.load(tmp_path / "int8.gie")
    assert loaded.report()["int8"] == compiled.report()["int8"] and compiled.report()["int8"]["int8_layers"] >= 3
    quant = [layer.get("quant") for layer in loaded.report()["layers"]]
    assert quant == [layer.get("quant") for layer in compiled.report()["layers"]]
    for _ in range(2):
        x = torch.randn(2, 3, 8, 8)
        assert torch.equal(loaded(x), compiled(x))


def test_triton_kernel_configs_are_restored_not_retuned(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    compiled = torch_gie.compile(small_cnn(), x, precision="fp32", backend="triton")
    conv = next(s for s in compiled._program.steps if s.op == "conv2d").kernel.layer
    conv.config = conv.configs[-1]  # not the default: the file must carry it
    torch_gie.save(compiled, tmp_path / "tri.gie")
    loaded = torch_gie.load(tmp_path / "tri.gie")
    assert next(s for s in loaded._program.steps if s.op == "conv2d").kernel.layer.config == conv.configs[-1]
    assert torch.equal(loaded(x), compiled(x))


def test_fresh_process_loads_without_the_model_code(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    compiled = _compile(randomize_(OnlyHere()).eval(), x)
    torch_gie.save(compiled, tmp_path / "m.gie")
    torch.save(x, tmp_path / "x.pt")
    child = ("import sys, torch, torch_gie\n"
             f"m = torch_gie.load({str(tmp_path / 'm.gie')!r})\n"
             f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
             f"torch.save(m(x), {str(tmp_path / 'y.pt')!r})\n"
             "assert not any('test_serialize' in name for name in sys.modules), 'imported the test module'\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(torch_gie.__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run([sys.executable, "-c", child], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), compiled(x))


def test_flipped_bytes_are_rejected(engine, tmp_path):
    _, _, path = engine
    raw = path.read_bytes()
    (hlen,) = struct.unpack_from("<Q", raw, 8)
    data = 16 + hlen
    for pos in (3, 12, 20, 16 + hlen // 2, data - 2, data + 5, (data + len(raw)) // 2, len(raw) - 1):
        bad = bytearray(raw)
        bad[pos] ^= 0x10
        (tmp_path / "bad.gie").write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="engine|corrupted|truncated|digest"):
            torch_gie.load(tmp_path / "bad.gie")


def test_truncated_file_is_rejected(engine, tmp_path):
    _, _, path = engine
    raw = path.read_bytes()
    for n in (0, 5, 12, 40, len(raw) // 2, len(raw) - 1):
        (tmp_path / "short.gie").write_bytes(raw[:n])
        with pytest.raises(ValueError, match="engine file|truncated"):
            torch_gie.load(tmp_path / "short.gie")


def _forge(path, out, change):
    """Rewrite the header of an engine file with ``change`` applied, digest recomputed."""
    raw = path.read_bytes()
    (hlen,) = struct.unpack_from("<Q", raw, 8)
    header, data = json.loads(raw[16:16 + hlen]), raw[16 + hlen:]
    change(header)
    header["digest"] = serialize._digest(header, data)
    blob = serialize._canonical(header)
    out.write_bytes(serialize.MAGIC + struct.pack("<Q", len(blob)) + blob + data)
    return out


def test_other_gpu_or_format_version_is_refused_saying_what_differs(engine, tmp_path):
    _, _, path = engine

    def other_gpu(h):
        h["device"] = {"type": "cuda", "gpu": "NVIDIA Imaginary X1", "capability": [12, 7]}
    with pytest.raises(ValueError, match=r"built for GPU NVIDIA Imaginary X1 \(compute capability 12.7\)") as err:
        torch_gie.load(_forge(path, tmp_path / "gpu.gie", other_gpu))
    if torch.cuda.is_available():
        assert torch.cuda.get_device_name() in str(err.value)
    assert "torch_gie.compile" in str(err.value) and "torch_gie.save" in str(err.value)

    def other_version(h):
        h["format_version"] = 99
    with pytest.raises(ValueError, match="version 99.*reads version 1.*torch_gie.compile"):
        torch_gie.load(_forge(path, tmp_path / "v99.gie", other_version))


def test_forged_file_cannot_name_unlisted_functions(engine, tmp_path):
    _, _, path = engine

    def call_os_system(h):
        node = next(n for n in h["graph"]["nodes"] if n["op"] == "call_function")
        node["target"] = "os.system"
    with pytest.raises(ValueError, match="allow-list"):
        torch_gie.load(_forge(path, tmp_path / "os.gie", call_os_system))

    def call_torch_load(h):
        node = next(n for n in h["graph"]["nodes"] if n["op"] == "call_function")
        node["target"] = "torch.load"
    with pytest.raises(ValueError, match="allow-list"):
        torch_gie.load(_forge(path, tmp_path / "load.gie", call_torch_load))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payloads_only_raise(engine, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(str(marker))}, tmp_path / "torch_save.gie")
    (tmp_path / "pickle.gie").write_bytes(pickle.dumps(_Payload(str(marker))))
    # magic bytes, then a pickle where the header should be
    payload = pickle.dumps(_Payload(str(marker)))
    (tmp_path / "magic.gie").write_bytes(serialize.MAGIC + struct.pack("<Q", len(payload)) + payload)
    for name in ("torch_save.gie", "pickle.gie", "magic.gie"):
        with pytest.raises(ValueError):
            torch_gie.load(tmp_path / name)
    assert not marker.exists()


def test_saving_a_module_object_fallback_names_the_node_and_op(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.PixelShuffle(2)).eval()
    compiled = _compile(model, torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"node _1 \(call_module.*PixelShuffle.*stores no Python code"):
        torch_gie.save(compiled, tmp_path / "no.gie")
    assert not (tmp_path / "no.gie").exists()


def test_save_takes_compiled_modules_only(tmp_path):
    with pytest.raises(TypeError, match="torch_gie.compile"):
        torch_gie.save(small_cnn(), tmp_path / "x.gie")


@pytest.mark.gpu
def test_resnet18_fp16_cuda_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval().cuda()
    x = torch.randn(1, 3, 224, 224, device="cuda")
    compiled = torch_gie.compile(model, x, precision="fp16")
    torch_gie.save(compiled, tmp_path / "r18.gie")
    loaded = torch_gie.load(tmp_path / "r18.gie")
    assert loaded.report()["backend"] == "triton" and loaded._program.graph is not None
    configs = [getattr(getattr(s.kernel, "layer", None), "config", None) for s in compiled._program.steps
               if hasattr(s, "kernel")]
    assert configs == [getattr(getattr(s.kernel, "layer", None), "config", None) for s in loaded._program.steps
                       if hasattr(s, "kernel")]
    assert torch.equal(loaded(x), compiled(x))
