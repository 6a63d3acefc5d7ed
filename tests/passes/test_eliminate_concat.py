import torch
from helpers import check_pass
from torch import nn

from torch_gie.passes.eliminate_concat import eliminate_concat


class Inceptionish(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(3, 2, 1)
        self.pool = nn.MaxPool2d(3, 1, 1)

    def forward(self, x):
        inner = torch.cat([self.b(x), self.c(x)], 1)
        return torch.cat([self.a(x), inner, self.pool(x)], 1)


def test_nested_cats_compose_views_without_copies():
    gm, result = check_pass(eliminate_concat, Inceptionish(), torch.randn(2, 3, 5, 5))
    assert result.counts["eliminated"] == 2 and result.counts.get("copies", 0) == 0
    nodes = {n.name: n for n in gm.graph.nodes}
    outer, off, step = nodes["cat"].meta["slot"]
    assert outer.name == "cat_1" and off == 4 and step == 1
    assert nodes["c"].meta["slot"] == (nodes["cat"], 5, 1)


def test_graph_input_and_repeated_input_are_copied():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.conv(x)
            return torch.cat([x, y, y], 1)

    gm, result = check_pass(eliminate_concat, M(), torch.randn(1, 3, 4, 4))
    assert result.counts["copies"] == 2 and result.counts.get("eliminated", 0) == 0
    cat = next(n for n in gm.graph.nodes if n.name == "cat")
    assert cat.meta["cat_copies"] == [0, 2]


def test_densenet_prefix_cats_become_views_of_one_buffer():
    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.layers = nn.ModuleList(nn.Conv2d(4 + 2 * i, 2, 3, padding=1) for i in range(3))

        def forward(self, x):
            feats = [self.stem(x)]
            for layer in self.layers:
                feats.append(layer(torch.cat(feats, 1)))
            return torch.cat(feats, 1)

    gm, result = check_pass(eliminate_concat, Dense(), torch.randn(2, 3, 6, 6))
    assert result.counts["eliminated"] == 4 and result.counts.get("copies", 0) == 0


def test_fallback_producer_is_copied():
    class M(nn.Module):
        def forward(self, x):
            return torch.cat([torch.sin(x), x.abs()], 1)  # ops with no lowering: fallbacks

    _, result = check_pass(eliminate_concat, M(), torch.randn(1, 2, 3, 3))
    assert result.counts["copies"] == 2


def test_cat_along_other_dims_is_left_alone():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return torch.cat([self.conv(x), self.conv(x)], 2)

    gm, result = check_pass(eliminate_concat, M(), torch.randn(1, 2, 3, 3))
    assert result.counts == {}
