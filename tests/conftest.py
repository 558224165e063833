import os

import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny_config(**overrides):
    """A small hybrid config for CPU tests: 3 layers (H3, attention, H3), fp32-friendly sizes."""
    from h3pretrain.config import ModelConfig

    base = dict(vocab_size=97, d_model=32, n_layer=3, attn_layer_idx=[1], attn_num_heads=4,
                embed_dropout=0.0, attn_dropout=0.0)
    base.update(overrides)
    return ModelConfig(**base)


def prep_settings(corpus, out, **kw):
    from data_prep.prep import PrepSettings

    base = dict(inputs=[str(corpus)], out=str(out), seq_len=64, vocab_size=1000, tokenizer_sample_mb=1.0,
                val_fraction=0.05, samples_per_shard=16, workers=2)
    base.update(kw)
    return PrepSettings(**base)


def corpus_docs(corpus) -> list[str]:
    """The documents of the corpus fixture's jsonl.zst files, in file order."""
    import json
    from pathlib import Path

    import zstandard

    docs = []
    for path in sorted(Path(corpus).glob("*.jsonl.zst")):
        data = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True).read()
        docs += [json.loads(line)["text"] for line in data.decode().splitlines()]
    return docs


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """120 documents of the local corpus (Debian's Python docs, or stdlib docstrings without them)."""
    from data_prep.corpus import build

    out = tmp_path_factory.mktemp("corpus")
    build(out, max_docs=120, files=3)
    return out


@pytest.fixture(scope="session")
def prepared(corpus, tmp_path_factory):
    """(directory, manifest) of `corpus` prepared with seq_len 64, 16 samples per shard."""
    from data_prep.prep import prepare

    out = tmp_path_factory.mktemp("prep")
    return out, prepare(prep_settings(corpus, out), progress=False)
