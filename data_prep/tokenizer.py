"""Tokenizers: a SentencePiece BPE trained on a sample of documents, or an existing SentencePiece
`.model` or Hugging Face `tokenizer.json` (e.g. GPT-2's byte-level BPE), behind one interface.

The trained model is lossless by construction: identity normalisation, no dummy prefix, whitespace
kept, byte fallback, so decode(encode(text)) == text for any UTF-8 text.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from h3pretrain.errors import InputFileError, UserError

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
MAX_SENTENCE_BYTES = 8192
MIN_VOCAB = 256 + 3 + 1  # byte-fallback pieces, <unk> <s> </s>, and at least one merge


class TokenizerTrainingError(UserError):
    """SentencePiece refused to train (a vocabulary the sample cannot fill, or no text)."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _training_pieces(docs: Iterable[str]) -> Iterator[str]:
    """SentencePiece drops "sentences" longer than its limit: feed documents as line groups."""
    for doc in docs:
        piece: list[str] = []
        size = 0
        for line in doc.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if size + n > MAX_SENTENCE_BYTES and piece:
                yield "".join(piece)
                piece, size = [], 0
            piece.append(line[: MAX_SENTENCE_BYTES // 4] if n > MAX_SENTENCE_BYTES else line)
            size += min(n, MAX_SENTENCE_BYTES)
        if piece:
            yield "".join(piece)


def train_tokenizer(docs: Iterable[str], out: Path, vocab_size: int, threads: int = 1) -> Path:
    """Train a byte-fallback BPE model on `docs`; writes `out` atomically (".model")."""
    from sentencepiece import sentencepiece_model_pb2

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="spm-", dir=out.parent) as tmp:
        try:
            _train(docs, os.path.join(tmp, "tokenizer"), vocab_size, threads)
        except RuntimeError as err:  # sentencepiece reports bad settings for the sample this way
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise TokenizerTrainingError(f"tokenizer training failed for vocab_size {vocab_size}: {reason}") from None
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(tmp, "tokenizer.model").read_bytes())
    # The file records where and with how many threads it was trained; the vocabulary does not
    # depend on either, so fix them and keep the bytes (and the tokenizer hash) reproducible.
    proto.trainer_spec.model_prefix = "tokenizer"
    proto.trainer_spec.num_threads = 1
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_bytes(proto.SerializeToString())
    os.replace(tmp_out, out)
    return out


def _train(docs: Iterable[str], tmp_prefix: str, vocab_size: int, threads: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_pieces(docs),
        model_prefix=tmp_prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=MAX_SENTENCE_BYTES,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        num_threads=threads,
        minloglevel=2,
    )


# ---- one interface for SentencePiece models and Hugging Face tokenizer.json files -------------

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "[EOS]", "<|end_of_text|>")
BOS_NAMES = ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>", "<|endoftext|>")


class Tokenizer:
    """What prep, training, generation and export need of a tokenizer: encode without adding
    special tokens, decode, the vocabulary size and the end-of-document (EOS) and BOS ids."""

    kind: str  # "sentencepiece" or "huggingface"
    file_name: str  # its name in a prepared data directory
    path: Path
    vocab_size: int
    eos_id: int
    bos_id: int | None

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def files(self) -> list[tuple[Path, str]]:
        """(file, name to copy it under): what a copy of this tokenizer needs (a tokenizer.json's
        tokenizer_config.json too, which may name its EOS / BOS)."""
        config = self.path.with_name("tokenizer_config.json")
        return [(self.path, self.file_name)] + \
            ([(config, config.name)] if self.kind == "huggingface" and config.is_file() else [])


class SentencePieceTokenizer(Tokenizer):
    kind, file_name = "sentencepiece", "tokenizer.model"

    def __init__(self, path: Path, model_bytes: bytes | None = None):
        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_bytes) if model_bytes is not None else \
                spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:
            raise InputFileError(f"{path} is not a SentencePiece model ({str(err).strip()[:120]})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        if self.eos_id < 0:
            raise InputFileError(f"{path}: the SentencePiece model has no end-of-sequence piece")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return _sp_encode(self.sp, texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json (e.g. GPT-2's byte-level BPE). EOS / BOS: the ones its
    tokenizer_config.json names when it sits beside one, else its special token of a known name."""

    kind, file_name = "huggingface", "tokenizer.json"

    def __init__(self, path: Path, text: str | None = None, specials: dict | None = None):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = Path(path)
        try:
            self.tok = RustTokenizer.from_str(text if text is not None else self.path.read_text(encoding="utf-8"))
        except Exception as err:  # noqa: BLE001 - the library's own message names the problem
            raise InputFileError(f"{path} is not a Hugging Face tokenizer.json ({str(err).strip()[:120]})") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        vocab = self.tok.get_vocab(with_added_tokens=True)
        specials = specials if specials is not None else _named_specials(self.path.parent / "tokenizer_config.json")
        self.eos_id = _special_id(vocab, specials.get("eos_token"), EOS_NAMES)
        self.bos_id = _special_id(vocab, specials.get("bos_token"), BOS_NAMES)
        if self.eos_id is None:
            raise InputFileError(f"{path}: no end-of-text token (none of {', '.join(EOS_NAMES)}, and no eos_token in a "
                                 "tokenizer_config.json beside it)")
        self.specials = {"eos_token": self.tok.id_to_token(self.eos_id),
                         "bos_token": self.tok.id_to_token(self.bos_id) if self.bos_id is not None else None}

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return _hf_encode(self.tok, texts)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def _sp_encode(sp, texts: list[str]) -> list[list[int]]:
    return sp.encode(texts, num_threads=1)


def _hf_encode(tok, texts: list[str]) -> list[list[int]]:
    # ids without offsets and alignments: the same tokens, less work
    return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]


def batch_encoder(kind: str, model: bytes):
    """texts -> token ids, for a tokenizer worker: kind "sentencepiece" (model: the .model file)
    or "huggingface" (model: a tokenizer.json), one thread."""
    if kind == "sentencepiece":
        sp = spm.SentencePieceProcessor(model_proto=model)
        return lambda texts: _sp_encode(sp, texts)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker, as with SentencePiece
    from tokenizers import Tokenizer as RustTokenizer

    tok = RustTokenizer.from_str(model.decode("utf-8"))
    return lambda texts: _hf_encode(tok, texts)


def _named_specials(config: Path) -> dict:
    if not config.is_file():
        return {}
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise InputFileError(f"{config} is not JSON ({err})") from None
    out = {}
    for key in ("eos_token", "bos_token"):
        value = data.get(key)
        out[key] = value.get("content") if isinstance(value, dict) else value
    return out


def _special_id(vocab: dict[str, int], named: str | None, candidates: tuple[str, ...]) -> int | None:
    if named:
        return vocab.get(named)
    return next((vocab[name] for name in candidates if name in vocab), None)


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer file a path names: a .model / tokenizer.json file, or a directory with one."""
    path = Path(path)
    if path.is_dir():
        for name in (HFTokenizer.file_name, SentencePieceTokenizer.file_name):
            if (path / name).is_file():
                return path / name
        raise InputFileError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    if not path.is_file():
        raise InputFileError(f"tokenizer not found: {path}")
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A SentencePiece `.model` or a Hugging Face `tokenizer.json` (or a directory holding one)."""
    path = tokenizer_file(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)
