"""Tokenizer worker processes. Kept free of heavy imports: each worker is a fresh (spawned)
interpreter, and this module is all it imports besides numpy, the tokenizer library and the reader."""
from __future__ import annotations

import numpy as np

from .reader import ReadProblem, parse_record

_ENCODE = None


def init_worker(kind: str, model_bytes: bytes) -> None:
    """kind: "sentencepiece" (model_bytes: the .model) or "huggingface" (a tokenizer.json)."""
    global _ENCODE
    if kind == "sentencepiece":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        _ENCODE = lambda texts: sp.encode(texts, num_threads=1)  # noqa: E731
    else:
        import os

        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker, as with SentencePiece
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(model_bytes.decode("utf-8"))
        _ENCODE = lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]  # noqa: E731


def process_batch(batch: list, val_fraction: float, sets: frozenset | None) -> list:
    """-> [(file_index, index, last_piece, skip_reason, is_val, tokens)] in input order.

    A ReadProblem from the reader passes through as a skipped record (its kind as the reason)."""
    out, texts, slots = [], [], []
    for item in batch:
        if isinstance(item, ReadProblem):
            out.append((item.file_index, item.index, True, item.kind, False, None))
            continue
        parsed = parse_record(item, val_fraction, sets)
        out.append([item.file_index, item.index, item.last_piece, parsed.skip, parsed.is_val, None])
        if parsed.skip is None:
            texts.append(parsed.text)
            slots.append(len(out) - 1)
    if texts:
        for slot, ids in zip(slots, _ENCODE(texts)):
            out[slot][5] = np.asarray(ids, dtype=np.uint32)
    return [tuple(r) for r in out]
