"""Public API behaviour: argument checking, bad inputs, training mode, reports, explain."""
import logging
import os

import pytest
import torch
from helpers import randomize_, rel_err
from torch import nn

import torch_gie


def small_net():
    return randomize_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))).eval()


def test_compile_returns_drop_in_module():
    model, x = small_net(), torch.randn(2, 3, 8, 8)
    compiled = torch_gie.compile(model, x, precision="fp32", backend="reference")
    assert isinstance(compiled, nn.Module) and isinstance(compiled, torch_gie.GIEModule)
    out = compiled(x)
    assert out.shape == (2, 5) and out.dtype == torch.float32 and rel_err(out, model(x)) < 1e-5
    r = compiled.report()
    for key in ("layers_in", "launches", "concats_eliminated", "fusions", "fallback_ops", "layers", "arena_bytes"):
        assert key in r
    assert r["layers_in"] == 6 and r["launches"] == 3
    assert all({"name", "op", "input_shapes", "output_shapes", "precision"} <= set(layer) for layer in r["layers"])


def test_multiple_inputs_and_structured_outputs():
    class TwoIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, a, b):
            y = self.conv(a)
            return {"sum": y + self.conv(b), "parts": (y, b * 2)}

    model, a, b = TwoIn().eval(), torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    compiled = torch_gie.compile(model, (a, b), precision="fp32", backend="reference")
    out, ref = compiled(a, b), model(a, b)
    assert set(out) == {"sum", "parts"} and isinstance(out["parts"], tuple)
    assert rel_err(out["sum"], ref["sum"]) < 1e-6 and rel_err(list(out["parts"]), list(ref["parts"])) < 1e-6


def test_outputs_are_fresh_unless_static_requested():
    model, x = small_net(), torch.randn(2, 3, 8, 8)
    compiled = torch_gie.compile(model, x, precision="fp32", backend="reference")
    first = compiled(x)
    snapshot = first.clone()
    compiled(torch.randn_like(x))
    assert torch.equal(first, snapshot)
    static = torch_gie.compile(model, x, precision="fp32", backend="reference", static_outputs=True)
    assert static(x).data_ptr() == static(x).data_ptr()


def test_wrong_inputs_at_call_time_raise_value_error():
    compiled = torch_gie.compile(small_net(), torch.randn(2, 3, 8, 8), precision="fp32", backend="reference")
    with pytest.raises(ValueError, match=r"expected shape \(2, 3, 8, 8\), got \(4, 3, 8, 8\).*batch size"):
        compiled(torch.randn(4, 3, 8, 8))
    with pytest.raises(ValueError, match="expected dtype torch.float32, got torch.float64"):
        compiled(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected 1 input"):
        compiled(torch.randn(2, 3, 8, 8), torch.randn(1))
    with pytest.raises(ValueError, match="expected a tensor"):
        compiled([1, 2])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="expected device cpu"):
            compiled(torch.randn(2, 3, 8, 8, device="cuda"))


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA inputs"):
        torch_gie.compile(small_net(), torch.randn(1, 3, 8, 8), backend="triton")


def test_untraceable_model_raises_compile_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x

    with pytest.raises(torch_gie.CompileError, match="could not trace DataDependent"):
        torch_gie.compile(DataDependent(), torch.randn(2, 2), precision="fp32", backend="reference")


def test_model_failing_on_example_inputs_raises_compile_error():
    with pytest.raises(torch_gie.CompileError, match="failed on the example inputs"):
        torch_gie.compile(nn.Linear(4, 4), torch.randn(2, 5), precision="fp32", backend="reference")


def test_bad_arguments():
    model, x = small_net(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="precision must be one of"):
        torch_gie.compile(model, x, precision="fp64")
    with pytest.raises(ValueError, match="calibration_data"):
        torch_gie.compile(model, x, precision="int8")
    with pytest.raises(ValueError, match="backend must be one of"):
        torch_gie.compile(model, x, backend="tensorrt")
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        torch_gie.compile(model, [1, 2])
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        torch_gie.compile(lambda t: t, x)
    with pytest.raises(TypeError, match="unknown option"):
        torch_gie.compile(model, x, fast=True)
    with pytest.raises(ValueError, match="tune must be one of"):
        torch_gie.compile(model, x, tune="always")


def test_training_mode_model_is_compiled_in_eval_and_left_untouched(caplog):
    model = small_net().train()
    x = torch.randn(2, 3, 8, 8)
    weights = [p.clone() for p in model.parameters()]
    with caplog.at_level(logging.WARNING, logger="torch_gie"):
        compiled = torch_gie.compile(model, x, precision="fp32", backend="reference")
    assert "training mode" in caplog.text
    assert model.training and all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert rel_err(compiled(x), model.eval()(x)) < 1e-5


def test_user_input_is_not_modified():
    model, x = small_net(), torch.randn(2, 3, 8, 8)
    keep = x.clone()
    torch_gie.compile(model, x, precision="fp32", backend="reference")(x)
    assert torch.equal(x, keep)


def test_explain_writes_dot(tmp_path):
    report = torch_gie.explain(small_net(), torch.randn(1, 3, 8, 8), dot=str(tmp_path / "g.dot"))
    assert os.path.exists(tmp_path / "g.dot")
    text = (tmp_path / "g.dot").read_text()
    assert text.startswith("digraph") and "relu" in text
    assert report["launches"] == 3 and "torch_gie report" in torch_gie.format_report(report)


def test_pass_dump_and_disable(tmp_path):
    model, x = small_net(), torch.randn(1, 3, 8, 8)
    r = torch_gie.explain(model, x, dump_dir=str(tmp_path), disable_passes=["fold_batchnorm"])
    names = sorted(os.listdir(tmp_path))
    assert names[0] == "00-captured.txt" and any("fuse_conv_epilogue" in n for n in names)
    assert not any("fold_batchnorm" in n for n in names)
    assert r["launches"] == 4  # the BatchNorm stays a separate (affine+relu) launch
