"""Channel shuffles: the ``view -> transpose -> view`` idiom becomes one ``channel_shuffle``
op, and a shuffle of a concat becomes an interleaved concat whose inputs are written straight
into their (strided) channels, so ShuffleNet's shuffles cost no copy:

``reshape(x, (N, g, C/g, H, W)) -> permute(0, 2, 1, 3, 4) -> reshape(N, C, H, W)  =>  shuffle(x, g)``
``shuffle(cat(a_0, ..., a_{g-1}), g)  =>  cat(a_0, ..., a_{g-1}, interleave=g)``  (equal sizes)
"""
from torch import fx

from .. import ops
from ..graph import is_canonical, spec
from .base import PassContext, PassResult, sole_user


def _shuffle_groups(first: fx.Node) -> tuple[int, fx.Node] | None:
    """(groups, last node) if ``first`` starts the view-transpose-view idiom."""
    if not is_canonical(first, ops.reshape):
        return None
    x = first.args[0]
    xs, s5 = x.meta.get("shape", ()), first.meta["shape"]
    if len(xs) != 4 or len(s5) != 5 or s5[0] != xs[0] or s5[1] * s5[2] != xs[1] or tuple(s5[3:]) != tuple(xs[2:]):
        return None
    perm = sole_user(first)
    if perm is None or not is_canonical(perm, ops.permute) or tuple(spec(perm).dims) != (0, 2, 1, 3, 4):
        return None
    last = sole_user(perm)
    if last is None or not is_canonical(last, ops.reshape) or tuple(last.meta["shape"]) != tuple(xs):
        return None
    return s5[1], last


def fuse_channel_shuffle(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult()
    graph = gm.graph
    for node in list(graph.nodes):
        if node._erased:
            continue
        found = _shuffle_groups(node)
        if found is None:
            continue
        groups, last = found
        x = node.args[0]
        chain = [node, sole_user(node), last]
        with graph.inserting_before(last):
            if _interleavable(x, groups):
                new = graph.create_node("call_function", ops.cat, tuple(x.args), {}, name=f"{x.name}_shuffled")
                new.meta["spec"] = ops.CatSpec(1, groups)
                how = "interleaved concat"
            else:
                new = graph.create_node("call_function", ops.channel_shuffle, (x,), {}, name=f"{last.name}_shuffle")
                new.meta["spec"] = ops.ChannelShuffleSpec(groups)
                how = "shuffle"
        new.meta.update(shape=last.meta["shape"], dtype=last.meta["dtype"], source=last.meta.get("source", last.name))
        last.replace_all_uses_with(new)
        for n in reversed(chain):
            graph.erase_node(n)
        if how == "interleaved concat" and not x.users:
            graph.erase_node(x)
        result.count("shuffles")
        result.fusion("channel_shuffle", [x, *chain] if how != "shuffle" else chain, new.name, how=how)
    return result


def _interleavable(x: fx.Node, groups: int) -> bool:
    """A channel cat of ``groups`` equal inputs read only by this shuffle."""
    if not is_canonical(x, ops.cat) or spec(x).interleave != 1 or len(x.users) != 1 or len(x.args) != groups:
        return False
    return len({a.meta["shape"][1] for a in x.args}) == 1
