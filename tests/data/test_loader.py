"""Shard loader: deterministic epochs, exact resume with the same or another DP size, integrity."""
import shutil

import numpy as np
import pytest
import torch

from h3pretrain.data import ShardError, TokenBatches


def _run(root, n_batches, *, global_batch=12, dp=1, state=None, seed=7):
    loaders = [TokenBatches(root, global_batch=global_batch, dp_rank=r, dp_size=dp, seed=seed) for r in range(dp)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    batches = [torch.cat([ld.next() for ld in loaders]) for _ in range(n_batches)]
    return batches, loaders[0].state_dict()


def test_each_epoch_is_a_permutation(prepared):
    root, manifest = prepared
    ld = TokenBatches(root, global_batch=1, seed=3)
    n = manifest["splits"]["train"]["samples"]
    epoch0 = ld.order.indices(np.arange(n)).tolist()
    epoch1 = ld.order.indices(np.arange(n, 2 * n)).tolist()
    assert sorted(epoch0) == list(range(n)) == sorted(epoch1)
    assert epoch0 != epoch1 and epoch0 != list(range(n))
    assert [TokenBatches(root, global_batch=1, seed=3).order(p) for p in range(0, n, 97)] == epoch0[::97]


@pytest.mark.parametrize("dp_after", [1, 2, 4])
def test_resume_equals_uninterrupted(prepared, dp_after):
    root, manifest = prepared
    n = manifest["splits"]["train"]["samples"]
    steps = n // 96 + 3  # crosses an epoch boundary
    full, _ = _run(root, steps, global_batch=96)
    first, state = _run(root, 4, global_batch=96, dp=2)
    rest, _ = _run(root, steps - 4, global_batch=96, dp=dp_after, state=state)
    for a, b in zip(full, first + rest):
        assert torch.equal(a, b)


def test_samples_are_rows_of_the_shards(prepared):
    root, _ = prepared
    ld = TokenBatches(root, global_batch=4, shuffle=False)
    batch = ld.next()
    first = ld.reader.shard_samples(0)[:4]
    assert torch.equal(batch, torch.from_numpy(first)) and batch.shape == (4, 65)


def test_state_from_another_setup_is_refused(prepared):
    root, _ = prepared
    state = TokenBatches(root, global_batch=12, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        TokenBatches(root, global_batch=12, seed=2).load_state_dict(state)


def test_corrupt_and_truncated_shards_are_named(prepared, tmp_path):
    root, _ = prepared
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shard = copy / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    ld = TokenBatches(copy, global_batch=1, shuffle=False)
    ld.reader[0]  # shard 0 is fine
    with pytest.raises(ShardError, match="train-000001.tar is corrupt"):
        ld.reader[16]
    shard.write_bytes(bytes(data[:-1024]))
    with pytest.raises(ShardError, match="train-000001.tar is truncated"):
        TokenBatches(copy, global_batch=1, shuffle=False).reader[16]
    assert np.all(ld.reader[3] >= 0)
