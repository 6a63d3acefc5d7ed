"""torch.compile(model, backend="torch_gie"): Dynamo's graphs become torch_gie engines (lifted
parameters inlined as constants); a graph break gives several engines; a graph torch_gie cannot
build runs eagerly with a warning."""
import warnings

import pytest
import torch
import torchvision
from torch import nn

from torch_gie.runtime.module import GIEModule

REFERENCE = {"precision": "fp32", "backend": "reference"}


@pytest.fixture
def engine_calls(monkeypatch):
    calls = []
    forward = GIEModule.forward

    def counted(self, *inputs):
        calls.append(self)
        return forward(self, *inputs)
    monkeypatch.setattr(GIEModule, "forward", counted)
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_resnet_runs_as_one_engine(engine_calls):
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="torch_gie", options=REFERENCE)
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    assert _rel(out, ref) < 1e-5
    assert len(engine_calls) == 1 and engine_calls[0].report()["fallback_ops"] == []


def test_without_module_guards_the_engine_serves_every_call(engine_calls):
    """The README's batch-1 recipe: Dynamo's guards on module attributes skipped. The engine keeps
    its own weights either way, so the only change is that Dynamo stops re-checking them."""
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(2, 3, 32, 32)
    options = {**REFERENCE, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    compiled = torch.compile(model, backend="torch_gie", options=options)
    with torch.no_grad():
        ref = model(x)
        outs = [compiled(torch.randn_like(x)) for _ in range(2)] + [compiled(x)]
    assert _rel(outs[-1], ref) < 1e-5
    assert len(engine_calls) == 3 and len({id(e) for e in engine_calls}) == 1


class WithGraphBreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        y = self.a(x)
        torch._dynamo.graph_break()
        return self.b(y)


def test_a_graph_break_gives_one_engine_per_graph(engine_calls):
    torch.manual_seed(0)
    model, x = WithGraphBreak().eval(), torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, backend="torch_gie", options=REFERENCE)
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    assert _rel(out, ref) < 1e-5 and len(engine_calls) == 2


def test_a_graph_torch_gie_cannot_build_runs_eagerly_with_a_warning(engine_calls):
    torch.manual_seed(0)
    model, x = WithGraphBreak().eval(), torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, backend="torch_gie", options={"precision": "int4"})
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out, ref = compiled(x), model(x)
    assert any("running this graph eagerly" in str(w.message) for w in caught)
    assert _rel(out, ref) < 1e-6 and not engine_calls


def test_register_adds_the_name_where_no_entry_point_did(monkeypatch):
    """A source tree on PYTHONPATH has no installed entry point: ``register()`` adds the name;
    a second call (or an installed entry point) leaves it as it is."""
    from torch._dynamo import list_backends
    from torch._dynamo.backends import registry

    from torch_gie import dynamo_backend
    list_backends(exclude_tags=())  # discover entry points first, as torch.compile would
    monkeypatch.delitem(registry._BACKENDS, "torch_gie", raising=False)
    monkeypatch.delitem(registry._COMPILER_FNS, "torch_gie", raising=False)  # loaded by an earlier test
    assert "torch_gie" not in list_backends(exclude_tags=())
    dynamo_backend.register()
    dynamo_backend.register()
    assert "torch_gie" in list_backends(exclude_tags=())
    assert registry.lookup_backend("torch_gie") is dynamo_backend.torch_gie_backend
