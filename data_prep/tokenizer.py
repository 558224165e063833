"""SentencePiece BPE tokenizer: train on a sample of documents, or load an existing model.

Lossless by construction: identity normalisation, no dummy prefix, whitespace kept, byte fallback,
so decode(encode(text)) == text for any UTF-8 text.
"""
from __future__ import annotations

import hashlib
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


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"tokenizer model not found: {path}")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as err:
        raise InputFileError(f"{path} is not a SentencePiece model ({str(err).strip()[:120]})") from None
