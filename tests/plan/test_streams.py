import torch
import torchvision
from helpers import captured, randomize_
from torch import nn

from torch_gie.passes import run_passes
from torch_gie.plan import launches_kernel, make_plan
from torch_gie.plan.streams import assign_streams, launch_dependencies, region_bounds


def _graph(model, x):
    gm = captured(model, x)
    run_passes(gm)
    return gm, [n for n in gm.graph.nodes if n.op != "output"]


def _ancestors(node, launches):
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen & launches


def test_inception_branches_get_different_streams_and_joins_wait():
    model = randomize_(torchvision.models.googlenet(weights=None, init_weights=True))
    gm, order = _graph(model, torch.randn(1, 3, 64, 64))
    launches = {n for n in order if launches_kernel(n)}
    plan = assign_streams(order, launches)
    assert plan.streams == 4
    for node in launches:  # every dependency is either on the same stream (in order) or waited on
        for dep in launch_dependencies(order, launches)[node]:
            assert plan.stream[dep] == plan.stream[node] or dep in plan.waits[node]
    # in every block the 3x3 arms and the pool arm run on three different streams, each arm's
    # chain (pool -> 1x1 conv) staying on its stream
    by_name = {n.name: n for n in order}
    for block in ("inception3a", "inception4c", "inception5b"):
        arms = [by_name[f"{block}_branch2_1_conv"], by_name[f"{block}_branch3_1_conv"],
                by_name[f"{block}_branch4_1_conv"]]
        assert len({plan.stream[a] for a in arms}) == 3
        assert plan.stream[by_name[f"{block}_branch4_0"]] == plan.stream[arms[2]]


def test_chain_stays_on_one_stream():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.MaxPool2d(2))
    gm, order = _graph(model, torch.randn(1, 3, 12, 12))
    plan = assign_streams(order, {n for n in order if launches_kernel(n)})
    assert plan.streams == 1 and not any(plan.waits.values())


def test_regions_split_at_single_live_value():
    model = torchvision.models.resnet18()
    gm, order = _graph(model, torch.randn(1, 3, 32, 32))
    bounds = region_bounds(order)
    pos = {n: i for i, n in enumerate(order)}
    # a basic block with downsample: both arms lie in one region; the region ends at the join
    down = next(n for n in order if "downsample" in n.name)
    start, end = bounds[pos[down]]
    assert any("conv1" in n.name for n in order[start:end + 1])


def test_stream_plan_widens_lifetimes_to_regions():
    model = randomize_(torchvision.models.googlenet(weights=None, init_weights=True))
    gm, _ = _graph(model, torch.randn(1, 3, 64, 64))
    plan = make_plan(gm, torch.float16, streams=True)
    assert plan.streams.streams > 1
    for a in plan.buffers:
        for b in plan.buffers:
            if a is not b and not (a.pinned or b.pinned) and not (a.last < b.first or b.last < a.first):
                assert a.offset + a.nbytes <= b.offset or b.offset + b.nbytes <= a.offset


def test_no_streams_with_fallbacks():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return torch.sin(self.a(x)) + self.b(x)  # sin: no lowering, a fallback

    gm, _ = _graph(M(), torch.randn(1, 3, 5, 5))
    assert make_plan(gm, torch.float32, streams=True).streams.streams == 1
