"""A model directory: `model.safetensors` (weights, HybridLM names) + `config.json` (ModelConfig).

Loading never runs code from the files: safetensors for tensors, JSON for metadata.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import ModelConfig, from_dict, to_dict
from ..errors import InputFileError
from ..model import HybridLM
from ..model.released import check_state_dict

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_model_dir(model: HybridLM, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "producer": "h3pretrain"})
    os.replace(tmp, out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps({"model": to_dict(model.config)}, indent=2) + "\n")
    return out


def is_model_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def read_model_dir(path: str | Path, device: str | torch.device = "cpu") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise InputFileError(f"{path} is not a model directory: {name} is missing")
    try:
        recorded = json.loads((path / CONFIG).read_text(encoding="utf-8"))["model"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise InputFileError(f"{path / CONFIG} is not a model config ({type(err).__name__}: {err})") from None
    cfg = from_dict(ModelConfig, recorded, f"{path / CONFIG}:model")
    try:
        return cfg, load_file(str(path / WEIGHTS), device=str(device))
    except SafetensorError as err:
        raise InputFileError(f"{path / WEIGHTS} is not a safetensors file ({err})") from None


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], what: str = "checkpoint") -> HybridLM:
    """A HybridLM holding exactly `state` (HybridLM names; every key checked), in eval mode."""
    with torch.device("meta"):
        model = HybridLM(cfg)
    check_state_dict(model, state, what)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> HybridLM:
    cfg, state = read_model_dir(path, device)
    return model_from_state(cfg, state, str(Path(path) / WEIGHTS))
