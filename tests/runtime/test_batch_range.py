"""Dynamic batch (``compile(..., batch_range=(min, opt, max))``): one engine serves every batch size
in the range against eager, refuses the others and bad ranges clearly, keeps at most
``max_batch_graphs`` programs, saves and loads as one engine, and leaves fixed-shape engines as
they were. CPU tests use the reference backend (and one the Triton interpreter); the GPU test
checks Triton kernels and CUDA-graph reuse."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torchvision
from helpers import randomize_, rel_err
from torch import nn

import torch_gie
import torch_gie.backends.reference


def _resnet(device="cpu"):
    torch.manual_seed(0)
    return randomize_(torchvision.models.resnet18(num_classes=10)).eval().to(device)


@pytest.fixture(scope="module")
def engine():
    """(resnet18, its engine for batches 2..8 tuned at 4, built from a batch-4 example)."""
    model = _resnet()
    x = torch.randn(4, 3, 32, 32)
    return model, torch_gie.compile(model, x, precision="fp32", backend="reference", batch_range=(2, 4, 8))


def _eager(model, x):
    with torch.no_grad():
        return model(x)


def test_every_batch_size_in_the_range_matches_eager(engine):
    model, compiled = engine
    for batch in range(2, 9):
        x = torch.randn(batch, 3, 32, 32)
        out = compiled(x)
        assert out.shape == (batch, 10)
        assert rel_err(out, _eager(model, x)) < 1e-5, batch


def test_a_new_batch_size_needs_no_retrace_recalibration_or_relowering(monkeypatch):
    model = _resnet()
    data = [torch.randn(4, 3, 32, 32)]
    compiled = torch_gie.compile(model, data[0], precision="int8", backend="reference", calibration_data=data,
                                 batch_range=(1, 4, 8))

    def forbidden(*args, **kwargs):
        raise AssertionError("a call rebuilt part of the engine")
    for name in ("capture", "run_passes", "calibrate_int8", "make_plan"):
        monkeypatch.setattr(torch_gie.compiler, name, forbidden)
    monkeypatch.setattr(torch_gie.backends.reference, "lower", forbidden)
    monkeypatch.setattr(torch_gie.backends.reference, "lower_int8", forbidden)
    for batch in (1, 5, 8):
        assert compiled(torch.randn(batch, 3, 32, 32)).shape == (batch, 10)


@pytest.mark.parametrize("batch", [1, 9, 64])
def test_a_batch_outside_the_range_names_the_range_and_the_batch(engine, batch):
    _, compiled = engine
    with pytest.raises(ValueError, match=rf"batch size {batch} is outside the engine's batch_range \[2, 8\]"):
        compiled(torch.randn(batch, 3, 32, 32))


def test_other_dims_stay_fixed(engine):
    _, compiled = engine
    with pytest.raises(ValueError, match=r"expected shape \('B', 3, 32, 32\) with batch B in 2..8"):
        compiled(torch.randn(4, 3, 16, 16))


def test_report_states_the_range(engine):
    _, compiled = engine
    report = compiled.report()
    assert report["batch_range"] == (2, 4, 8)
    assert "batch range           : 2..8 (tuned for 4, arena planned for 8)" in torch_gie.format_report(report)
    assert "batch_range=(2, 4, 8)" in repr(compiled)


def test_the_arena_is_planned_for_max_and_shared():
    model = _resnet()
    x = torch.randn(4, 3, 32, 32)
    fixed = {b: torch_gie.compile(model, x[:1].expand(b, -1, -1, -1), precision="fp32", backend="reference")
             for b in (4, 8)}
    ranged = torch_gie.compile(model, x, precision="fp32", backend="reference", batch_range=(2, 4, 8))
    assert ranged.report()["arena_bytes"] == fixed[8].report()["arena_bytes"] > fixed[4].report()["arena_bytes"]
    ranged(torch.randn(3, 3, 32, 32))
    programs = [ranged._program.program(b) for b in (3, 4, 8)]
    assert all(p.arena is ranged._program.arena for p in programs)  # one arena, no copies per batch size


def test_explain_plans_the_range_without_building():
    model = _resnet()
    x = torch.randn(4, 3, 32, 32)
    report = torch_gie.explain(model, x, precision="fp32", backend="reference", batch_range=(2, 4, 8))
    fixed = torch_gie.explain(model, torch.randn(8, 3, 32, 32), precision="fp32", backend="reference")
    assert report["batch_range"] == (2, 4, 8) and report["arena_bytes"] == fixed["arena_bytes"]


def test_the_example_is_regrouped_to_opt_and_left_untouched():
    model = _resnet()
    x = torch.randn(3, 3, 32, 32)
    before = x.clone()
    compiled = torch_gie.compile(model, x, precision="fp32", backend="reference", batch_range=(1, 6, 8))
    assert torch.equal(x, before)
    assert compiled._signature[0][0] == (6, 3, 32, 32)  # traced and tuned at opt
    for batch in (1, 3, 6, 8):
        xb = torch.randn(batch, 3, 32, 32)
        assert rel_err(compiled(xb), _eager(model, xb)) < 1e-5


@pytest.mark.parametrize("bad, match", [
    ((4, 2, 8), "min <= opt <= max, got min=4, opt=2, max=8"),
    ((2, 9, 8), "min <= opt <= max, got min=2, opt=9, max=8"),
    ((0, 1, 4), "min must be at least 1"),
    ((-2, 1, 4), "min must be at least 1"),
    ((1, 2.0, 4), r"must hold ints .* \(int, float, int\)"),
    ((1, True, 4), r"must hold ints .* \(int, bool, int\)"),
    ((1, 4), "three batch sizes"),
    (8, "three batch sizes"),
    ("1,4,8", "three batch sizes"),
])
def test_bad_batch_ranges_raise_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        torch_gie.compile(nn.Conv2d(3, 4, 3).eval(), torch.randn(2, 3, 8, 8), backend="reference", batch_range=bad)


def test_max_batch_graphs_needs_a_batch_range():
    with pytest.raises(ValueError, match="pass batch_range"):
        torch_gie.compile(nn.Conv2d(3, 4, 3).eval(), torch.randn(2, 3, 8, 8), backend="reference",
                          max_batch_graphs=2)
    with pytest.raises(ValueError, match="max_batch_graphs must be an int >= 1, got 0"):
        torch_gie.compile(nn.Conv2d(3, 4, 3).eval(), torch.randn(2, 3, 8, 8), backend="reference",
                          batch_range=(1, 2, 4), max_batch_graphs=0)


def test_at_most_max_batch_graphs_programs_are_kept():
    model = _resnet()
    x = torch.randn(4, 3, 32, 32)
    compiled = torch_gie.compile(model, x, precision="fp32", backend="reference", batch_range=(2, 4, 8),
                                 max_batch_graphs=3)
    batched = compiled._program
    for batch in (2, 3, 5, 6, 7, 8, 2, 3):
        xb = torch.randn(batch, 3, 32, 32)
        assert rel_err(compiled(xb), _eager(model, xb)) < 1e-5
        assert len(batched.batch_sizes) <= 3 and 4 in batched.batch_sizes  # opt's program stays
        assert batched.batch_sizes[-1] == batch  # the one just used is the most recent
    assert batched.batch_sizes == [4, 2, 3]
    built = batched.built
    compiled(torch.randn(3, 3, 32, 32))  # kept: not rebuilt
    assert batched.built == built
    compiled(torch.randn(5, 3, 32, 32))  # evicted earlier: built again
    assert batched.built == built + 1


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, image, features):
        return self.conv(image).mean((2, 3)) + self.fc(features)


def test_every_input_carries_the_same_batch():
    torch.manual_seed(0)
    model = _TwoInputs().eval()
    compiled = torch_gie.compile(model, (torch.randn(2, 3, 8, 8), torch.randn(2, 6)), precision="fp32",
                                 backend="reference", batch_range=(1, 2, 4))
    image, features = torch.randn(3, 3, 8, 8), torch.randn(3, 6)
    with torch.no_grad():
        assert rel_err(compiled(image, features), model(image, features)) < 1e-5
    with pytest.raises(ValueError, match="input 1: batch size 2 differs from input 0's 3"):
        compiled(image, features[:2])
    with pytest.raises(ValueError, match="all have the batch as their leading dim"):
        torch_gie.compile(model, (torch.randn(2, 3, 8, 8), torch.randn(3, 6)), backend="reference",
                          batch_range=(1, 2, 4))


class _LiteralBatch(nn.Module):
    def forward(self, x):
        return torch.relu(x.reshape(2, -1))  # the model's code fixes the batch at 2


class _ComputedBatch(nn.Module):
    def forward(self, x):
        return torch.relu(x.view(x.size(0), -1)) + torch.relu(x.view(-1, 48)).sum(1, keepdim=True)


def test_a_model_whose_code_fixes_the_batch_is_refused_naming_the_node():
    with pytest.raises(torch_gie.CompileError, match=r"reshapes to a literal leading size \(2\)"):
        torch_gie.compile(_LiteralBatch().eval(), torch.randn(2, 3, 4, 4), backend="reference",
                          batch_range=(1, 2, 4))
    model = _ComputedBatch().eval()  # sizes computed from the input, or inferred: they follow the batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sum runs as a PyTorch fallback
        compiled = torch_gie.compile(model, torch.randn(2, 3, 4, 4), precision="fp32", backend="reference",
                                     batch_range=(1, 2, 4))
    for batch in (1, 3, 4):
        x = torch.randn(batch, 3, 4, 4)
        assert rel_err(compiled(x), model(x)) < 1e-6


def test_without_batch_range_the_engine_stays_fixed():
    model = _resnet()
    x = torch.randn(4, 3, 32, 32)
    compiled = torch_gie.compile(model, x, precision="fp32", backend="reference")
    assert compiled.report()["batch_range"] is None and compiled.batch_range is None
    assert type(compiled._program).__name__ == "Program"
    with pytest.raises(ValueError, match="batch size is fixed at compile time"):
        compiled(torch.randn(2, 3, 32, 32))


def test_static_outputs_are_the_batch_sizes_views():
    model = _resnet()
    compiled = torch_gie.compile(model, torch.randn(4, 3, 32, 32), precision="fp32", backend="reference",
                                 batch_range=(2, 4, 8), static_outputs=True)
    for batch in (3, 8):
        x = torch.randn(batch, 3, 32, 32)
        out = compiled(x)
        assert out.shape == (batch, 10) and rel_err(out, _eager(model, x)) < 1e-5


def test_int8_calibrates_at_opt_and_serves_the_range():
    model = _resnet()
    torch.manual_seed(1)
    data = [torch.randn(3, 3, 32, 32) for _ in range(4)]  # regrouped to opt=4 for calibration
    kw = dict(precision="int8", backend="reference", calibration_data=data)
    fixed = torch_gie.compile(model, data[0][:1].expand(4, -1, -1, -1), **kw)
    ranged = torch_gie.compile(model, data[0], batch_range=(1, 4, 6), **kw)
    x = torch.randn(6, 3, 32, 32)
    assert rel_err(ranged(x[:4]), fixed(x[:4])) < 1e-6  # same calibration, same integer arithmetic
    for batch in (1, 5, 6):
        # Per-sample results do not depend on the batch: integer arithmetic with static scales.
        assert rel_err(ranged(x[:batch])[:1], ranged(x[:4])[:1]) < 1e-6
        assert rel_err(ranged(x[:batch]), _eager(model, x[:batch])) < 0.1


def test_triton_kernels_serve_several_batch_sizes():
    """Triton interpreter: one set of kernel objects (sizes as runtime arguments) for every batch."""
    torch.manual_seed(0)
    model = randomize_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))).eval()
    compiled = torch_gie.compile(model, torch.randn(2, 3, 8, 8), precision="fp32", backend="triton",
                                 batch_range=(1, 2, 3))
    convs = [s.kernel for s in compiled._program.steps if s.op == "conv2d"]
    for batch in (1, 3):
        x = torch.randn(batch, 3, 8, 8)
        assert rel_err(compiled(x), _eager(model, x)) < 1e-5
        program = compiled._program.program(batch)
        assert [s.kernel for s in program.steps if s.op == "conv2d"] == convs


def test_save_and_load_keep_the_range(engine, tmp_path):
    _, compiled = engine
    path = tmp_path / "ranged.gie"
    torch_gie.save(compiled, path)
    loaded = torch_gie.load(path)
    assert loaded.batch_range == compiled.batch_range and loaded.report()["batch_range"] == (2, 4, 8)
    for batch in (2, 5, 8):
        x = torch.randn(batch, 3, 32, 32)
        assert torch.equal(loaded(x), compiled(x))
    with pytest.raises(ValueError, match="outside the engine's batch_range"):
        loaded(torch.randn(9, 3, 32, 32))


def test_threads_with_different_batch_sizes_share_one_engine(engine):
    model, compiled = engine
    inputs = [torch.randn(b, 3, 32, 32) for b in (2, 3, 5, 8)]
    expected = [_eager(model, x) for x in inputs]
    errors: list[float] = []

    def worker(i: int) -> None:
        for _ in range(3):
            errors.append(rel_err(compiled(inputs[i]), expected[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 12 and max(errors) < 1e-5


def test_every_batch_size_gets_its_cuda_graph_on_first_use_max_included(monkeypatch):
    """The build prepares max without capturing it (workspaces grow first); its first call must
    capture it like any other batch size's. CPU stand-in: capture records a replayable fake."""
    from torch_gie.runtime.program import Program

    class Recorded:
        def __init__(self, program):
            self.replay = program._run_steps

    monkeypatch.setattr(Program, "capture_cuda_graph", lambda self: setattr(self, "graph", Recorded(self)))
    model = _resnet()
    compiled = torch_gie.compile(model, torch.randn(4, 3, 32, 32), precision="fp32", backend="reference",
                                 batch_range=(2, 4, 8))
    batched = compiled._program
    batched._cuda_graph = True  # as on CUDA
    for batch in (8, 3, 4):
        x = torch.randn(batch, 3, 32, 32)
        assert rel_err(compiled(x), _eager(model, x)) < 1e-5, batch
        assert isinstance(batched.program(batch).graph, Recorded), batch


@pytest.mark.gpu
def test_gpu_triton_batch_sizes_match_eager_and_reuse_their_cuda_graphs():
    model = _resnet("cuda")
    compiled = torch_gie.compile(model, torch.randn(32, 3, 64, 64, device="cuda"), precision="fp16",
                                 batch_range=(1, 32, 128))
    batched = compiled._program
    assert compiled.report()["backend"] == "triton"
    for batch in (1, 7, 32, 128):
        x = torch.randn(batch, 3, 64, 64, device="cuda")
        out = compiled(x)
        assert rel_err(out, _eager(model, x)) < 2e-2, batch
        graph, built = batched.program(batch).graph, batched.built
        assert graph is not None
        assert rel_err(compiled(x), out) == 0  # replayed: the same graph, nothing rebuilt
        assert batched.program(batch).graph is graph and batched.built == built
