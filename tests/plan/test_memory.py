import torch

from torch_gie.plan.memory import ALIGN, Buffer, Placement, assign_offsets, materialize


def test_overlapping_lifetimes_never_share_bytes_and_disjoint_ones_reuse():
    bufs = [Buffer(0, (1, 4, 8, 8), torch.float32, True, first=0, last=2),
            Buffer(1, (1, 4, 8, 8), torch.float32, True, first=1, last=3),
            Buffer(2, (1, 4, 8, 8), torch.float32, True, first=3, last=5),
            Buffer(3, (2, 7), torch.float16, False, first=4, last=6)]
    size = assign_offsets(bufs)
    for a in bufs:
        assert a.offset % ALIGN == 0
        for b in bufs:
            if a is b or a.last < b.first or b.last < a.first:
                continue
            assert a.offset + a.nbytes <= b.offset or b.offset + b.nbytes <= a.offset
    assert bufs[2].offset == bufs[0].offset  # buffer 0 is dead by step 3: its bytes are reused
    assert size < sum(b.nbytes for b in bufs)


def test_materialize_channel_slice_is_a_channels_last_view():
    buf = Buffer(0, (2, 6, 3, 5), torch.float32, True, offset=ALIGN)
    arena = torch.zeros(ALIGN + buf.nbytes, dtype=torch.uint8)
    whole = materialize(arena, Placement(buf, 0, 6))
    part = materialize(arena, Placement(buf, 2, 3))
    assert whole.is_contiguous(memory_format=torch.channels_last)
    assert part.shape == (2, 3, 3, 5) and part.stride() == whole.stride()
    part.fill_(1.0)
    assert whole[:, 2:5].eq(1).all() and whole[:, :2].eq(0).all() and whole[:, 5:].eq(0).all()
