"""Weighted data mixtures (h3pretrain.data.mixture): the proportions of every source over N batches,
the batches of every data-parallel rank as slices of one global batch, epochs per source, and the
checks on the sources. Training with a mixture (SIGKILL/resume, DP 2 -> 1): tests/train."""
import numpy as np
import pytest
import torch

from conftest import prep_settings
from h3pretrain.data import Manifest, MixtureBatches, ShardReader, TrainingData
from h3pretrain.data.mixture import MixtureSchedule
from h3pretrain.errors import InputFileError


@pytest.mark.parametrize("weights,global_batch", [([0.7, 0.2, 0.1], 8), ([1, 1, 1], 8), ([5, 3, 1, 1], 16),
                                                  ([0.01, 0.99], 4), ([1, 2], 512), ([3, 1], 6)])
def test_every_source_gets_its_share_within_three_samples_after_every_batch(weights, global_batch):
    schedule = MixtureSchedule(weights, global_batch, seed=1234)
    share = np.asarray(weights, dtype=np.float64) / sum(weights)
    counts = schedule.counts(np.arange(20000))
    assert (counts.sum(axis=1) == global_batch).all()
    # each batch holds floor or ceil of its expected count of every source
    assert (np.abs(counts - share * global_batch) < 1).all()
    running = counts.cumsum(axis=0)
    expected = np.arange(1, 20001)[:, None] * share * global_batch
    assert np.abs(running - expected).max() <= 3.0  # the stated bound, after every batch (measured: 2)
    assert (schedule.taken_before(20000) == counts.sum(axis=0)).all()
    assert (schedule.taken_before(123) == counts[:123].sum(axis=0)).all()  # also going back


@pytest.fixture(scope="module")
def two_sources(corpus, prepared, tmp_path_factory):
    """The whole corpus (A) and one of its three files (B, a smaller source), one tokenizer."""
    from data_prep.prep import prepare

    a, _ = prepared
    b = tmp_path_factory.mktemp("source-b")
    files = sorted(str(p) for p in corpus.glob("*.jsonl.zst"))
    prepare(prep_settings(corpus, b, inputs=files[:1], tokenizer=str(a / "tokenizer.model")), progress=False)
    return a, b


def _rows_of(path) -> dict[bytes, int]:
    reader = ShardReader(Manifest.load(path), "train")
    return {reader[i].tobytes(): i for i in range(len(reader))}


def test_ranks_take_slices_of_one_global_batch_and_rows_come_from_their_sources(two_sources):
    a, b = two_sources
    sources = [(str(a), 3.0), (str(b), 1.0)]
    whole = MixtureBatches(sources, global_batch=8, seed=5)
    ranks = [MixtureBatches(sources, global_batch=8, dp_rank=r, dp_size=2, seed=5) for r in range(2)]
    rows = [_rows_of(a), _rows_of(b)]
    taken = [0, 0]
    for position in range(0, 8 * 30, 8):
        batch = whole.batch_at(position)
        assert torch.equal(torch.cat([r.batch_at(position) for r in ranks]), batch)
        for (source, index), row in zip(whole.indices(position), batch):
            assert rows[source][row.numpy().tobytes()] == index
            taken[source] += 1
    assert taken == [180, 60]  # 3 : 1 of 240 samples
    assert whole.samples_per_source(8 * 30) == taken


def test_a_small_source_repeats_while_a_large_one_continues(two_sources):
    a, b = two_sources
    small = len(ShardReader(Manifest.load(b), "train"))
    mix = MixtureBatches([(str(a), 1.0), (str(b), 1.0)], global_batch=8, seed=0)
    batches = 3 * small // 4 + 1  # enough for source B to give every sample more than once
    assert mix.samples_per_source(8 * batches)[1] > small
    seen = [i for p in range(0, 8 * batches, 8) for s, i in mix.indices(p) if s == 1]
    first_epoch = seen[:small]
    assert sorted(first_epoch) == list(range(small))  # every sample once per epoch
    assert seen[small:2 * small] != first_epoch  # then a fresh order
    assert max(i for p in range(0, 8 * batches, 8) for s, i in mix.indices(p) if s == 0) < len(
        ShardReader(Manifest.load(a), "train"))


def test_sources_must_share_tokenizer_and_sample_length(corpus, prepared, two_sources, tmp_path):
    from data_prep.prep import prepare

    a, _ = prepared
    other = tmp_path / "other-seq"
    prepare(prep_settings(corpus, other, seq_len=32, tokenizer=str(a / "tokenizer.model")), progress=False)
    with pytest.raises(InputFileError, match="samples of 33 tokens"):
        TrainingData([(str(a), 1.0), (str(other), 1.0)])
    retok = tmp_path / "retok"
    prepare(prep_settings(corpus, retok, vocab_size=600), progress=False)
    with pytest.raises(InputFileError, match="another tokenizer"):
        TrainingData([(str(a), 1.0), (str(retok), 1.0)])
    data = TrainingData([(str(p), w) for p, w in zip(two_sources, (2.0, 1.0))], ["", ""], mixture=True)
    assert data.names == [a.name, two_sources[1].name] and data.shares() == [2 / 3, 1 / 3]
    assert data.fingerprint()["weights"] == {a.name: 2.0, two_sources[1].name: 1.0}


def test_bad_source_settings_are_one_config_error():
    from h3pretrain.config import Config, ConfigError, DataSource

    cfg = Config()
    cfg.data.sources = [DataSource(path="x", weight=0.0), DataSource(path="", weight=1.0), DataSource(path="x")]
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    text = str(err.value)
    assert "data.sources[0].weight must be a positive number" in text and "data.sources[1].path is empty" in text
    assert "lists a directory twice" in text
