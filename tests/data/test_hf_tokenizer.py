"""Hugging Face tokenizer.json files wherever a SentencePiece model works: a byte-level BPE (GPT-2's
kind) trained here with the `tokenizers` library, no downloads. prep -> train -> export-hf ->
generate, the export encodes exactly as prep did, EOS comes from the tokenizer (and an imported
released-vocabulary model exported without one gets GPT-2's 50256)."""
import json

import numpy as np
import pytest

from conftest import corpus_docs, prep_settings


_texts = corpus_docs


@pytest.fixture(scope="module")
def gpt2_like(corpus, tmp_path_factory):
    """A byte-level BPE tokenizer.json with <|endoftext|> as its last id, as GPT-2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_texts(corpus), trainer)
    tok.add_special_tokens(["<|endoftext|>"])
    out = tmp_path_factory.mktemp("gpt2-like") / "tokenizer.json"
    tok.save(str(out))
    return out


def test_load_tokenizer_takes_a_tokenizer_json_or_its_directory(gpt2_like, tmp_path):
    from data_prep.tokenizer import HFTokenizer, load_tokenizer

    tok = load_tokenizer(gpt2_like)
    assert isinstance(tok, HFTokenizer) and load_tokenizer(gpt2_like.parent).path == gpt2_like
    assert tok.eos_id == tok.vocab_size - 1 == 600 and tok.bos_id == tok.eos_id
    text = "def f(x):\n    return x  # ünïcode ✓\n"
    assert tok.decode(tok.encode(text)) == text
    (tmp_path / "nothing").mkdir()
    from h3pretrain.errors import InputFileError

    with pytest.raises(InputFileError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path / "nothing")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InputFileError, match="is not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


@pytest.fixture(scope="module")
def prepared_hf(corpus, gpt2_like, tmp_path_factory):
    from data_prep.prep import prepare

    out = tmp_path_factory.mktemp("prep-hf")
    return out, prepare(prep_settings(corpus, out, tokenizer=str(gpt2_like)), progress=False)


def test_prep_with_a_tokenizer_json_ends_documents_with_its_eos(prepared_hf, gpt2_like, corpus):
    from data_prep.tokenizer import load_tokenizer
    from h3pretrain.data import Manifest, ShardReader

    out, manifest = prepared_hf
    tok = load_tokenizer(gpt2_like)
    assert manifest["tokenizer"]["file"] == "tokenizer.json" and manifest["eos_id"] == 600
    assert manifest["tokenizer"]["vocab_size"] == 601 and manifest["tokenizer"]["kind"] == "huggingface"
    reader = ShardReader(Manifest.load(out), "train")
    stream = np.concatenate([reader.shard_samples(i).ravel() for i in range(len(reader.shards))])
    ends = np.flatnonzero(stream == tok.eos_id)
    pieces = np.split(stream, ends + 1)[:-1]  # whole documents, each ended by the EOS
    docs = set(_texts(corpus))
    assert len(pieces) > 10 and all(tok.decode(p[:-1].tolist()) in docs for p in pieces)
    assert sum(s["documents"] for s in manifest["splits"]["train"]["shards"]) == len(pieces)


@pytest.mark.slow
def test_prep_train_export_generate_with_a_tokenizer_json(prepared_hf, gpt2_like, tmp_path, capsys):
    from test_train import run
    from transformers import AutoTokenizer

    from data_prep.tokenizer import load_tokenizer
    from h3pretrain.cli import main

    data, _ = prepared_hf
    run_dir = tmp_path / "run"
    assert run(data, run_dir, steps=2, eval_every=0, ckpt_every=2, **{"model.vocab_size": 601}) == 0
    assert main(["export-hf", "--checkpoint", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer(gpt2_like)
    for text in ["import os\nprint(os.getcwd())", "  spaces  and\ttabs ✓", "<|endoftext|> in text"]:
        assert exported(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] == 600 == exported.eos_token_id
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "def", "--max-new-tokens", "5",
                 "--temperature", "0", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.startswith("def")


def test_an_imported_gpt2_vocabulary_model_exports_with_eos_50256(tmp_path, gpt2_like, capsys):
    import torch

    from h3pretrain.cli import main
    from h3pretrain.config import preset
    from h3pretrain.model import HybridLM

    cfg = preset("tiny")
    cfg.vocab_size = 50257
    torch.save(HybridLM(cfg).official_state_dict(), tmp_path / "model.pt")
    assert main(["import-h3", str(tmp_path / "model.pt"), "--preset", "tiny", "--set", "model.vocab_size=50257",
                 "--out", str(tmp_path / "imported")]) == 0
    assert main(["export-hf", "--checkpoint", str(tmp_path / "imported"), "--out", str(tmp_path / "hf")]) == 0
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 50256 and generation["bos_token_id"] == 50256
    # with --tokenizer, import-h3 keeps the tokenizer beside the model, and generate finds it there
    cfg.vocab_size = 601
    torch.save(HybridLM(cfg).official_state_dict(), tmp_path / "small.pt")
    assert main(["import-h3", str(tmp_path / "small.pt"), "--preset", "tiny", "--set", "model.vocab_size=601",
                 "--tokenizer", str(gpt2_like), "--out", str(tmp_path / "with-tok")]) == 0
    assert (tmp_path / "with-tok" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "with-tok"), "--prompt", "x = ", "--max-new-tokens", "3",
                 "--temperature", "0", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.startswith("x = ")
    assert main(["import-h3", str(tmp_path / "small.pt"), "--preset", "tiny", "--set", "model.vocab_size=601",
                 "--tokenizer", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")]) == 2
    # imported without one, the tokenizer given to generate (whatever data/shards the working directory holds)
    assert main(["import-h3", str(tmp_path / "small.pt"), "--preset", "tiny", "--set", "model.vocab_size=601",
                 "--out", str(tmp_path / "no-tok")]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "no-tok"), "--tokenizer", str(gpt2_like), "--prompt", "y",
                 "--max-new-tokens", "2", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("y")
