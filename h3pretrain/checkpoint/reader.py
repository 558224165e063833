"""Reading trained weights for export, generation and evaluation.

`load_checkpoint_model` is the one place that knows the training checkpoint formats; everything
else goes through it (or through `load_model_source`, which also takes `import-h3` model
directories). A step directory holds the run's config in `trainer_state.json` and the weights
either sharded in `state/` (PyTorch Distributed Checkpoint: every rank's boxes of the full tensors,
h3pretrain.checkpoint.sharded) or gathered in `model/*.safetensors` (full tensors, one file per
pipeline stage: h3pretrain.checkpoint.canonical). Either way the full fp32 tensors come back, under
HybridLM names, whatever layout wrote them. Every file is checked against the manifest's sha256
before anything is read (DCP's `.metadata` is a pickle: only one the run wrote is opened).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import Config, from_dict
from ..errors import InputFileError

STEP_PREFIX = "step-"


def resolve_step_dir(path: str | Path) -> Path:
    """A step directory, or the one `latest` names in a run dir or checkpoints dir."""
    from .manager import inside

    path = Path(path)
    if path.name.startswith(STEP_PREFIX) and (path / "trainer_state.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        pointer = root / "latest"
        if pointer.is_file():
            name = pointer.read_text().strip()
            step = root / name
            if inside(root, name) is None or not name.startswith(STEP_PREFIX) or "/" in name:
                raise InputFileError(f"{pointer} names {name!r}, which is not a checkpoint directory of {root}")
            if not step.is_dir():
                raise InputFileError(f"{pointer} names {step.name}, which does not exist")
            return step
    raise InputFileError(f"{path} is not a checkpoint: expected a run directory, its checkpoints/ "
                            f"directory (with a `latest` file) or a {STEP_PREFIX}NNNNNNNN directory")


def _check_complete(step: Path) -> None:
    from .manager import verify_checkpoint

    problem = verify_checkpoint(step)
    if problem:
        raise InputFileError(f"{step} is incomplete or damaged: {problem}")


def load_checkpoint_model(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """path: a run dir (uses checkpoints/latest), a checkpoints dir, or one step-NNNNNNNN dir.
    Returns the run's Config and the full fp32 model state dict with HybridLM.state_dict() names."""
    step = resolve_step_dir(path)
    _check_complete(step)
    state = json.loads((step / "trainer_state.json").read_text())
    cfg = from_dict(Config, state["config"], f"{step}/trainer_state.json:config")
    from . import sharded
    from .canonical import SafetensorsReader

    if sharded.is_sharded(step):
        return cfg, {k: v.float() for k, v in sharded.read_full(step, lambda key: "::" not in key).items()}
    weights = SafetensorsReader(step / "model")
    return cfg, {k: weights(k).float().contiguous() for k in weights.keys()}


def load_model_source(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """A training checkpoint (see `load_checkpoint_model`) or an `import-h3` model directory
    (whose Config has only the model section filled in)."""
    from .model_dir import is_model_dir, read_model_dir

    if is_model_dir(path):
        model_cfg, state = read_model_dir(path)
        return Config(model=model_cfg), state
    return load_checkpoint_model(path)


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(Config, HybridLM in eval mode on `device`) from a checkpoint or model directory."""
    from .model_dir import model_from_state

    cfg, state = load_model_source(path)
    return cfg, model_from_state(cfg.model, state, str(path)).to(device)
