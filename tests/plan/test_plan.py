import torch
import torchvision
from helpers import ops, randomize_
from torch import nn

from torch_gie.capture import capture
from torch_gie.passes import run_passes
from torch_gie.plan import make_plan


def _plan(model, x, dtype=torch.float32):
    gm = capture(model.eval(), (x,))
    run_passes(gm)
    return gm, make_plan(gm, dtype)


def test_concat_producers_share_the_concat_buffer():
    model = randomize_(torchvision.models.googlenet(weights=None, init_weights=True))
    gm, plan = _plan(model, torch.randn(1, 3, 64, 64))
    cats = [n for n in gm.graph.nodes if n.target is ops.cat]
    assert len(cats) == 9
    for cat in cats:
        producers = [p for p in cat.args]
        buf = plan.placements[cat].buffer
        assert all(plan.placements[p].buffer is buf for p in producers)
        offsets = [plan.placements[p].channel_offset for p in producers]
        assert offsets == sorted(offsets) and offsets[0] == 0


def test_arena_reuses_memory_and_respects_lifetimes():
    gm, plan = _plan(randomize_(torchvision.models.resnet18()), torch.randn(2, 3, 64, 64), torch.float16)
    assert plan.arena_bytes < plan.naive_bytes / 2
    assert all(b.dtype == torch.float16 for b in plan.buffers)
    for a in plan.buffers:
        for b in plan.buffers:
            if a is not b and not (a.pinned or b.pinned) and not (a.last < b.first or b.last < a.first):
                assert a.offset + a.nbytes <= b.offset or b.offset + b.nbytes <= a.offset


def test_rgb_input_is_padded_to_four_channels_and_pinned():
    gm, plan = _plan(randomize_(torchvision.models.resnet18()), torch.randn(2, 3, 32, 32), torch.float16)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    placement = plan.placements[x]
    assert placement.buffer.pinned and placement.buffer.shape == (2, 4, 32, 32)
    assert placement.channels == 3 and placement.channel_offset == 0
    assert all(not b.pinned for b in plan.buffers if b is not placement.buffer)


def test_input_read_by_a_non_conv_is_not_padded():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x), torch.tanh(x)

    gm, plan = _plan(M(), torch.randn(1, 3, 8, 8))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert plan.placements[x].buffer.shape == (1, 3, 8, 8)


def test_buffer_layouts_images_nhwc_feature_last_contiguous():
    """Image values (conv outputs, merged-conv segments) are NHWC; a Linear's (N, H, W, C) result
    and what is computed from it are contiguous rows."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)  # siblings: merged into segments
            self.fc = nn.Linear(5, 8)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)  # (N, 10, H, W)
            t = torch.relu(self.fc(y))  # (N, 10, H, 8): a Linear over the last dim, feature-last
            return y, t

    gm, plan = _plan(M(), torch.randn(2, 3, 5, 5))
    layouts = {n.name: p.buffer.channels_last for n, p in plan.placements.items()}
    assert all(v for k, v in layouts.items() if k in ("a", "b", "cat", "x"))
    linear = next(n for n in plan.placements if n.target is ops.linear)
    assert not plan.placements[linear].buffer.channels_last
