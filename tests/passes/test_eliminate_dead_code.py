import torch
from helpers import captured, count, ops
from torch import nn

from torch_gie.graph import run_graph
from torch_gie.passes import PassContext
from torch_gie.passes.eliminate_dead_code import eliminate_dead_code


def test_unused_results_are_removed_and_used_kept():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU()).eval()
    x = torch.randn(1, 2, 3, 3)
    gm = captured(model, x)
    conv = next(n for n in gm.graph.nodes if n.target is ops.conv2d)
    with gm.graph.inserting_after(conv):  # a dead copy, as a rewrite might leave behind
        dead = gm.graph.create_node("call_function", ops.conv2d, conv.args, {}, name="dead")
    dead.meta.update(conv.meta)
    result = eliminate_dead_code(gm, PassContext())
    assert result.counts["removed"] == 1 and count(gm, ops.conv2d) == 1
    assert torch.allclose(run_graph(gm, x), model(x))
