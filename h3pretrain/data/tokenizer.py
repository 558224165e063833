"""The tokenizer a model was trained with: given, beside an imported model, or found through the
run's data directory (checked by sha256). SentencePiece `.model` or Hugging Face `tokenizer.json`."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import Config, ModelConfig
from ..errors import InputFileError


def _manifest_tokenizer(cfg: Config) -> tuple[Path, dict] | None:
    manifest = Path(cfg.data_sources()[0][0]) / "manifest.json"  # (every source of a mixture has the same)
    if not manifest.is_file():
        return None
    try:
        return manifest, json.loads(manifest.read_text(encoding="utf-8"))["tokenizer"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise InputFileError(f"{manifest} is damaged ({err})") from None


def find_tokenizer(cfg: Config, override: str | Path | None = None, source: str | Path | None = None) -> Path | None:
    """The model's tokenizer file: `override` (a file or a directory holding one), else one kept
    beside the model in `source` (an import-h3 model directory), else the one of the prepared data
    directory (checked against its manifest's sha256). None when there is none."""
    from data_prep.tokenizer import load_tokenizer, sha256_file, tokenizer_file

    from ..checkpoint.model_dir import is_model_dir

    # an import-h3 model directory has no training data: its config's data section is a default
    recorded = None if source is not None and is_model_dir(source) else _manifest_tokenizer(cfg)
    if override:
        path = tokenizer_file(override)
        load_tokenizer(path)  # refuses a file that is neither kind of tokenizer
        if recorded is not None and sha256_file(path) != recorded[1]["sha256"]:
            manifest, info = recorded
            raise InputFileError(f"--tokenizer {path} is not the tokenizer the model was trained with (the one of "
                                 f"{manifest.parent}, sha256 {info['sha256'][:12]}...): omit --tokenizer to use it")
        return path
    if source is not None and Path(source).is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (Path(source) / name).is_file():
                return Path(source) / name
    if recorded is None:
        return None
    manifest, info = recorded
    path = manifest.parent / info["file"]
    if not path.is_file() or sha256_file(path) != info["sha256"]:
        raise InputFileError(f"{path} is missing or differs from the one {manifest} was prepared with")
    return path


def check_tokenizer_vocab(model: ModelConfig, vocab_size: int, what: str) -> None:
    if vocab_size != model.vocab_size:
        raise InputFileError(f"{what} has {vocab_size} tokens but the model was trained with vocab_size "
                         f"{model.vocab_size}")
