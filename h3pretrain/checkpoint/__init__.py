"""Everything that knows the on-disk formats of trained weights (docs/design.md section 5).

- manager: training checkpoints, one `step-NNNNNNNN/` directory each (atomic write, manifest with
  sizes and sha256, verification, choice of the one to resume from, pruning);
- sharded: the default tensor format, every rank's own share through PyTorch DCP, read back under
  any layout;
- canonical: the layout-independent full tensors (gathered from and scattered to any TP / PP /
  ZeRO layout), the gathered format's per-stage files, the LR schedule file;
- reader: a checkpoint or a model directory -> (Config, full state dict) for export, generation
  and evaluation, verified before anything is loaded;
- model_dir: `model.safetensors` + `config.json` (what `import-h3` writes).
"""
from .manager import CheckpointManager, CheckpointSpaceError, verify_checkpoint
from .model_dir import is_model_dir, load_model_dir, model_from_state, read_model_dir, save_model_dir
from .reader import load_checkpoint_model, load_model, load_model_source, resolve_step_dir

__all__ = ["CheckpointManager", "CheckpointSpaceError", "is_model_dir", "load_checkpoint_model", "load_model", "load_model_dir",
           "load_model_source", "model_from_state", "read_model_dir", "resolve_step_dir", "save_model_dir",
           "verify_checkpoint"]
