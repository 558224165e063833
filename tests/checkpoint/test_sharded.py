"""The geometry of sharded checkpoints (h3pretrain.checkpoint.sharded), one process: a flat ZeRO range
of a tensor-parallel piece becomes boxes of the full tensor that hold exactly its elements, and the
boxes of every (TP rank, ZeRO range) tile the full tensor once. Multi-rank save/load across layouts:
tests/parallel/test_parallel.py."""
import pickle

import pytest
import torch

from h3pretrain.checkpoint import sharded
from h3pretrain.errors import InputFileError


@pytest.mark.parametrize("shape", [(), (7,), (3, 4), (2, 3, 4), (4, 1, 3)])
def test_flat_ranges_become_contiguous_boxes_in_order(shape):
    n = torch.Size(shape).numel()
    t = torch.arange(n).view(shape)
    for a in range(n):
        for b in range(a + 1, n + 1):
            seen = []
            for offsets, sizes, pos in sharded.flat_boxes(shape, a, b):
                values = t[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].reshape(-1).tolist()
                assert values == list(range(pos, pos + len(values))), (shape, a, b, offsets, sizes)
                seen += values
            assert seen == list(range(a, b)), (shape, a, b)


def _tp_param(local: torch.Tensor, dim: int, fused: int) -> torch.nn.Parameter:
    p = torch.nn.Parameter(local.clone())
    p.tensor_model_parallel, p.partition_dim, p.tp_fused = True, dim, fused
    return p


@pytest.mark.parametrize("shape,dim,fused,tp,zero", [
    ((12, 4), 0, 3, 2, 3),  # fused q, k, v rows, column parallel
    ((6, 8), 1, 2, 2, 2),  # two blocks along columns, row parallel
    ((8,), 0, 1, 4, 1),  # a sharded bias
    ((4, 6), 1, 1, 3, 4),
    ((5, 3), 0, 1, 1, 3),  # replicated (TP 1)
])
def test_boxes_of_every_rank_tile_the_full_tensor_once(shape, dim, fused, tp, zero):
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape) + 1
    cover = torch.zeros(shape, dtype=torch.int64)
    rebuilt = torch.zeros(shape)
    for r in range(tp):
        local = torch.cat([block.chunk(tp, dim)[r] for block in full.chunk(fused, dim)], dim)
        p = _tp_param(local, dim, fused) if tp > 1 else torch.nn.Parameter(local.clone())
        assert sharded.full_shape(p, tp) == shape
        n = local.numel()
        size = -(-n // zero)  # ZeRO-3's partitions: equal, the last one short
        for start in range(0, n, size):
            flat = local.reshape(-1)[start:start + size]
            for offsets, box in sharded.boxes(p, flat, start, r, tp):
                where = tuple(slice(o, o + s) for o, s in zip(offsets, box.shape))
                cover[where] += 1
                rebuilt[where] = box
    assert (cover == 1).all()
    assert torch.equal(rebuilt, full)


def test_metadata_naming_anything_else_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(InputFileError, match="is not checkpoint metadata this program wrote: io.open"):
        sharded.read_full(tmp_path)
    assert not marker.exists()


def test_a_failed_pinned_allocation_falls_back_to_pageable_memory(monkeypatch, caplog):
    """The background save copies a GPU's share into pinned host memory; when pinning fails (here a
    planted failure, the one a CPU-only build gives) the buffers are pageable, with one warning."""
    from h3pretrain.checkpoint import sharded

    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("planted: cannot pin memory (memlock limit)")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(sharded, "_pinning_failed", [])
    monkeypatch.setattr(sharded.torch, "empty", empty)
    with caplog.at_level("WARNING", logger="h3pretrain.checkpoint"):
        buffers = [sharded.host_buffer((3, 5), pinned=True) for _ in range(3)]
    assert all(b.shape == (3, 5) and b.dtype == torch.float32 and not b.is_pinned() for b in buffers)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "planted: cannot pin memory" in warnings[0] and "pageable" in warnings[0]
    assert sharded.host_buffer((2,), pinned=False).shape == (2,)
