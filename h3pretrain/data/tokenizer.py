"""The tokenizer a model was trained with: found through the run's data directory, checked by sha256."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import Config, ModelConfig
from ..errors import InputFileError


def find_tokenizer(cfg: Config, override: str | Path | None = None) -> Path | None:
    """The run's SentencePiece model: `override`, else the one in the prepared data directory
    (checked against its manifest's sha256). None when neither exists."""
    from data_prep.tokenizer import load_tokenizer, sha256_file

    manifest = Path(cfg.data.path) / "manifest.json"
    info = None
    if manifest.is_file():
        try:
            info = json.loads(manifest.read_text(encoding="utf-8"))["tokenizer"]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise InputFileError(f"{manifest} is damaged ({err})") from None
    if override:
        path = Path(override)
        if not path.is_file():
            raise InputFileError(f"--tokenizer {path}: tokenizer model not found")
        load_tokenizer(path)  # refuses a file that is not a SentencePiece model
        if info is not None and sha256_file(path) != info["sha256"]:
            raise InputFileError(f"--tokenizer {path} is not the tokenizer the model was trained with (the one of "
                                 f"{manifest.parent}, sha256 {info['sha256'][:12]}...): omit --tokenizer to use it")
        return path
    if info is None:
        return None
    path = manifest.parent / info["file"]
    if not path.is_file() or sha256_file(path) != info["sha256"]:
        raise InputFileError(f"{path} is missing or differs from the one {manifest} was prepared with")
    return path


def check_tokenizer_vocab(model: ModelConfig, vocab_size: int, what: str) -> None:
    if vocab_size != model.vocab_size:
        raise InputFileError(f"{what} has {vocab_size} tokens but the model was trained with vocab_size "
                         f"{model.vocab_size}")
