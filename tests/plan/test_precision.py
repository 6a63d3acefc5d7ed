"""Precision planning for int8 builds: which layers run int8, which values share one scale
(concat slots, merged-conv segments, views, max pools) and which are stored as codes."""
import torch
import torchvision
from helpers import ops, randomize_
from torch import nn

from torch_gie.capture import capture
from torch_gie.graph import is_canonical
from torch_gie.passes import run_passes
from torch_gie.plan import make_plan
from torch_gie.plan.precision import plan_precision


def _planned(model, x, fp16=lambda n: False):
    gm = capture(model.eval(), (x,))
    run_passes(gm)
    order = [n for n in gm.graph.nodes if n.op != "output"]
    pp = plan_precision(gm, order, {n for n in order if fp16(n)})
    return gm, pp, make_plan(gm, torch.float16, precision=pp)


def test_googlenet_concats_share_one_class_and_stay_int8_without_copies():
    model = randomize_(torchvision.models.googlenet(weights=None, init_weights=True))
    gm, pp, plan = _planned(model, torch.randn(1, 3, 64, 64))
    cats = [n for n in gm.graph.nodes if is_canonical(n, ops.cat)]
    assert cats
    for cat in cats:
        assert all(pp.classes[a] is pp.classes[cat] for a in cat.args)
        assert pp.is_int8_value(cat) and plan.placements[cat].buffer.dtype == torch.int8
        assert not cat.meta.get("cat_copies")
    # merged sibling 1x1 convs: their segments are one class (one output scale)
    merged = [n for n in gm.graph.nodes if is_canonical(n, ops.conv2d) and n.meta["spec"].out_splits]
    assert merged
    for conv in merged:
        segments = [u for u in conv.users if u.meta.get("segment_of") is conv]
        assert len({pp.classes[s] for s in segments}) == 1
    # max pools keep their input's scale (exact on codes)
    for pool in (n for n in gm.graph.nodes if is_canonical(n, ops.pool2d) and n.meta["spec"].kind == "max"):
        assert pp.classes[pool] is pp.classes[pool.args[0]]


def test_outputs_stay_real_and_every_conv_linear_runs_int8():
    gm, pp, plan = _planned(randomize_(torchvision.models.resnet18(num_classes=10)), torch.randn(1, 3, 64, 64))
    layers = [n for n in gm.graph.nodes if is_canonical(n) and n.target in (ops.conv2d, ops.linear)]
    assert layers and all(n in pp.int8_layers for n in layers)
    for out in gm.graph.output_node().all_input_nodes:
        assert not pp.is_int8_value(out) and plan.value_dtype(out) == torch.float16
    assert pp.is_int8_value(next(n for n in gm.graph.nodes if n.op == "placeholder"))


def test_pinned_layer_reads_real_values_and_a_lone_pool_falls_back():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    pin_first = lambda n: is_canonical(n, ops.conv2d) and n.args[0].op == "placeholder"  # noqa: E731
    gm, pp, plan = _planned(model, torch.randn(2, 3, 16, 16), pin_first)
    first, pool = [n for n in gm.graph.nodes if is_canonical(n) and n.target in (ops.conv2d, ops.pool2d)][:2]
    assert first not in pp.int8_layers
    assert not pp.is_int8_value(first)  # an fp16 layer writes real values
    assert pool not in pp.int8_layers  # its input is not int8: pooling alone in int8 is a loss
    assert not pp.is_int8_value(next(n for n in gm.graph.nodes if n.op == "placeholder"))


def test_a_value_read_only_as_a_residual_is_stored_as_codes():
    """A ResNet downsample branch's output is read by nothing but the block's last conv, as the
    residual its epilogue adds: an int8 conv reads it as codes, so it is stored as codes (half
    the bytes of fp16 on both sides); with that conv pinned to fp16 it stays real."""
    model = randomize_(torchvision.models.resnet18(num_classes=10))
    gm, pp, plan = _planned(model, torch.randn(1, 3, 64, 64))
    downsample = [n for n in gm.graph.nodes if is_canonical(n, ops.conv2d) and "downsample" in n.meta.get("source", "")]
    assert len(downsample) == 3
    for ds in downsample:
        (reader,) = ds.users
        assert reader.args[-1] is ds and reader.args[0] is not ds  # the residual, not the main input
        assert pp.is_int8_value(ds) and plan.value_dtype(ds) == torch.int8
    reads_ds = {next(iter(ds.users)) for ds in downsample}
    gm, pp, plan = _planned(model, torch.randn(1, 3, 64, 64), lambda n: n.name in {r.name for r in reads_ds})
    for ds in (n for n in gm.graph.nodes if n.name in {d.name for d in downsample}):
        assert not pp.is_int8_value(ds) and plan.value_dtype(ds) == torch.float16
