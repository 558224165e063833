"""Released-H3 state dicts <-> HybridLM.

Accepted input forms:
  - the official names (docs/design.md section 2), `backbone.*` + `lm_head.weight`;
  - older files whose backbone is called `s4seq.encoder.`;
  - PyTorch-Lightning files: {"state_dict": {"model.<name>": ...}, ...};
  - the 2.7B rotary file's `...mixer.rotary_emb.inv_freq` buffers (recomputed, so dropped).
Loading is strict: every missing, unexpected or mis-shaped key is reported in one error.

Output channel order with head_dim > 1: the official CUDA fftconv path (and this project) flattens
an H3 layer's output as channel h·head_dim + d2, the official PyTorch path as d2·H + h. A
checkpoint trained with the PyTorch path is imported with layout "pytorch", which reorders the
input columns of each H3 `output_linear` (nothing else differs). With head_dim 1 both are the same.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from ..errors import InputFileError, UserError

_RENAMES = ((".mixer.ssm_k_kernel.kernel.", ".mixer.shift_kernel."), (".mixer.kernel.kernel.", ".mixer.diag_kernel."))
EMBEDDING_KEY = "backbone.embeddings.word_embeddings.weight"
HEAD_KEY = "lm_head.weight"


# Plain config objects a Lightning `.ckpt` may hold besides tensors, allowed to torch.load's
# weights_only unpickler as data: argparse.Namespace, and Lightning's AttributeDict read as a plain
# dict (Lightning need not be installed; no code of theirs runs).
_PLAIN_CONFIG_CLASSES = [argparse.Namespace] + [
    (dict, name) for name in ("pytorch_lightning.utilities.parsing.AttributeDict",
                              "lightning.fabric.utilities.data.AttributeDict",
                              "lightning_fabric.utilities.data.AttributeDict")]


class CheckpointMismatchError(UserError):
    """A state dict that does not fit the model; the message lists every problem."""


def unwrap(obj: object) -> dict[str, torch.Tensor]:
    """Bring any accepted file layout to a flat dict with official key names."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # PyTorch Lightning
    if not isinstance(obj, dict) or not obj:
        raise CheckpointMismatchError(f"expected a state dict (name -> tensor), got {type(obj).__name__}")
    sd = {}
    for key, value in obj.items():
        if key.startswith("model."):
            key = key[len("model."):]
        if key.startswith("s4seq.encoder."):
            key = "backbone." + key[len("s4seq.encoder."):]
        if key.endswith(".rotary_emb.inv_freq"):
            continue
        sd[key] = value
    return sd


def _rename(key: str, reverse: bool = False) -> str:
    for official, ours in _RENAMES:
        src, dst = (ours, official) if reverse else (official, ours)
        if src in key:
            return key.replace(src, dst)
    return key


def from_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official names -> HybridLM names. The tied head must equal the embedding when present."""
    sd = unwrap(sd)
    head = sd.pop(HEAD_KEY, None)
    if head is not None and EMBEDDING_KEY in sd and not torch.equal(head, sd[EMBEDDING_KEY]):
        raise CheckpointMismatchError(f"{HEAD_KEY} differs from {EMBEDDING_KEY}, but the LM head is tied")
    return {_rename(k): v for k, v in sd.items()}


def to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HybridLM names -> official names, with the tied `lm_head.weight` written out."""
    out = {_rename(k, reverse=True): v for k, v in sd.items()}
    out[HEAD_KEY] = out[EMBEDDING_KEY]
    return out


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(f"{k}: {what} {tuple(sd[k].shape)} vs model {expected[k]}"
                    for k in set(sd) & set(expected) if tuple(sd[k].shape) != expected[k])
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if items:
            more = f"\n    ... and {len(items) - 8} more" if len(items) > 8 else ""
            problems.append(f"{len(items)} {title} key(s):\n    " + "\n    ".join(items[:8]) + more)
    if problems:
        raise CheckpointMismatchError(f"{what} does not fit the model\n  " + "\n  ".join(problems))


OUTPUT_LAYOUTS = ("cuda", "pytorch")
DEFAULT_OUTPUT_LAYOUT = "cuda"


def to_our_output_layout(sd: dict[str, torch.Tensor], layout: str, head_dim: int) -> dict[str, torch.Tensor]:
    """Each H3 layer's output_linear with its input columns in channel order h·head_dim + d2."""
    if layout not in OUTPUT_LAYOUTS:
        raise UserError(f"output layout {layout!r}: expected one of {', '.join(OUTPUT_LAYOUTS)}")
    if layout == "cuda" or head_dim == 1:
        return sd
    out = dict(sd)
    for key, w in sd.items():
        if key.endswith(".mixer.output_linear.weight"):
            rows, channels = w.shape
            # column d2·H + h -> column h·head_dim + d2
            out[key] = w.reshape(rows, head_dim, channels // head_dim).transpose(1, 2).reshape(rows, channels)
    return out


def load_official(model: nn.Module, state_dict: dict, layout: str = DEFAULT_OUTPUT_LAYOUT) -> None:
    sd = to_our_output_layout(from_official(state_dict), layout, model.config.ssm_head_dim)
    check_state_dict(model, sd, "released checkpoint")
    params = model.state_dict()
    sd = {k: v.to(params[k].dtype) for k, v in sd.items()}
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(sd, strict=True, assign=on_meta)


def load_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a released `.pt`/`.ckpt` (never executes code: weights_only) or a `.safetensors` file."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path))
        except SafetensorError as err:
            raise CheckpointMismatchError(f"{path} is not a safetensors file ({err})") from None
    try:
        with torch.serialization.safe_globals(_PLAIN_CONFIG_CLASSES):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as err:  # noqa: BLE001 - reported with the reason
        raise CheckpointMismatchError(
            f"{path} could not be read as tensors only (weights_only=True refuses pickled code and "
            f"objects other than tensors and containers): {err}") from err
