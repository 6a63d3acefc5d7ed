"""The torch-gie command line: compile, check against eager, report, JSON and DOT (fp32 reference
backend on CPU; on a GPU the defaults are fp16 and Triton)."""
import json

import pytest
import torch

from torch_gie.cli import main


def test_cli_compiles_checks_and_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["--model", "resnet18", "--size", "32", "--batch", "1", "--json", str(out),
                 "--dot", str(tmp_path / "g.dot")]) == 0
    text = capsys.readouterr().out
    assert "torch_gie report: ResNet" in text and "rel. error vs eager" in text
    report = json.loads(out.read_text())
    tol = 1e-4 if report["precision"] == "fp32" else 1e-2
    assert report["launches"] < report["layers_in"] and report["max_rel_error"] < tol
    assert (tmp_path / "g.dot").exists()


def test_cli_unknown_model_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown model 'resnet1000'"):
        main(["--model", "resnet1000"])


def test_cli_tune_and_layers_options(capsys):
    assert main(["--model", "resnet18", "--size", "32", "--batch", "1", "--tune", "new", "--layers"]) == 0
    text = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert "per-layer times      : need a GPU" in text
    else:
        assert "per-layer GPU time" in text
    with pytest.raises(SystemExit):
        main(["--tune", "always"])
