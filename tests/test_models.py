"""Whole torchvision models through the compiler on the reference backend (CPU, fp32): every
model must match eager within 1e-4; the structural claims for GoogLeNet and ResNet-50 are checked."""
import pytest
import torch
import torchvision
from helpers import randomize_, rel_err

import torch_gie

# (model, input size): small spatial sizes keep CI fast; each is the smallest the model allows.
MODELS = [
    ("resnet18", 64), ("resnet50", 64), ("resnext50_32x4d", 64), ("wide_resnet50_2", 64),
    ("googlenet", 64), ("inception_v3", 80), ("densenet121", 64), ("vgg16", 32),
    ("mobilenet_v2", 64), ("mobilenet_v3_large", 64), ("squeezenet1_1", 64), ("shufflenet_v2_x1_0", 64),
    ("efficientnet_b0", 64), ("regnet_y_400mf", 64), ("mnasnet1_0", 64), ("convnext_tiny", 64),
    ("vit_b_16", 32), ("swin_v2_t", 224),
]
# Models whose ops the rewrites do not cover keep them as fallbacks (and must list them): ViT's
# class-token expand and its concat along the token dim; Swin's window attention (torchvision wraps it
# as one opaque function for fx) and its patch-merging pad.
EXPECTED_FALLBACKS = {"vit_b_16": {"Tensor.expand", "cat"},
                      "swin_v2_t": {"shifted_window_attention", "_get_relative_position_bias", "_patch_merging_pad"}}


def build(name: str, size: int, batch: int = 2):
    kwargs = {"image_size": size} if name == "vit_b_16" else {}
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = True
    torch.manual_seed(0)
    model = randomize_(getattr(torchvision.models, name)(weights=None, **kwargs)).eval()
    return model, torch.randn(batch, 3, size, size)


@pytest.mark.slow
@pytest.mark.parametrize("name,size", MODELS, ids=[m for m, _ in MODELS])
def test_model_matches_eager_fp32(name, size):
    model, x = build(name, size)
    compiled = torch_gie.compile(model, x, precision="fp32", backend="reference")
    with torch.no_grad():
        ref = model(x)
    out = compiled(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < 1e-4
    report = compiled.report()
    assert report["launches"] < report["layers_in"]
    assert {f["op"] for f in report["fallback_ops"]} == EXPECTED_FALLBACKS.get(name, set())
    assert all(f["reason"] for f in report["fallback_ops"])
    # a second call with new data must not depend on the first (buffers are reused)
    x2 = torch.randn_like(x)
    with torch.no_grad():
        assert rel_err(compiled(x2), model(x2)) < 1e-4


def test_googlenet_structure():
    model, x = build("googlenet", 64, batch=1)
    report = torch_gie.explain(model, x, precision="fp32")
    assert report["concats_eliminated"] == 9 and report["concat_copies"] == 0
    horizontal = [f for f in report["fusions"] if f["kind"] == "horizontal"]
    assert len(horizontal) == 9 and all(len(f["nodes"]) == 3 for f in horizontal)
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules() if m is not model.aux1
                  and m is not model.aux2) - sum(isinstance(m, torch.nn.Conv2d)
                                                for aux in (model.aux1, model.aux2) for m in aux.modules())
    vertical = [f for f in report["fusions"] if f["kind"] == "vertical" and f.get("epilogue") == "+relu"]
    assert len(vertical) == n_convs == 57  # every conv took its folded BN and its ReLU
    assert not report["fallback_ops"]


def test_resnet50_structure():
    model, x = build("resnet50", 64, batch=1)
    report = torch_gie.explain(model, x, precision="fp32")
    eager_ops = report["layers_in"]
    # 53 conv + 53 bn + 49 relu + 16 add + maxpool + avgpool + flatten + fc = 175 eager ops;
    # fused: 53 convs (BN, ReLU, residual adds inside) + maxpool + avgpool + fc = 56 launches.
    assert eager_ops == 175
    assert report["launches"] == 56
    residual = [f for f in report["fusions"] if f["kind"] == "vertical" and "+residual" in f.get("epilogue", "")]
    assert len(residual) == 16
    assert not report["fallback_ops"]


BENCHMARK_SIX = [("resnet50", 64), ("googlenet", 64), ("mobilenet_v2", 64), ("vgg16", 32),
                 ("inception_v3", 80), ("densenet121", 64)]


@pytest.mark.slow
@pytest.mark.parametrize("name,size", BENCHMARK_SIX, ids=[m for m, _ in BENCHMARK_SIX])
def test_benchmark_models_build_int8_without_fallbacks_or_concat_copies(name, size):
    """The six benchmark models in int8: every conv and Linear runs int8, nothing falls back to
    PyTorch, and every concat stays a set of slots its producers write (one scale per concat)."""
    model, x = build(name, size)
    cal = [torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    compiled = torch_gie.compile(model, x, precision="int8", calibration_data=cal, backend="reference")
    report = compiled.report()
    assert report["fallback_ops"] == [] and report["concat_copies"] == 0
    layers = [r for r in report["layers"] if r.get("op") in ("conv2d", "linear")]
    assert layers and all(r.get("precision") == "int8" for r in layers), \
        [(r.get("name"), r.get("precision")) for r in layers if r.get("precision") != "int8"]
