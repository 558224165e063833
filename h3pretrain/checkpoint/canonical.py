"""Layout-independent ("canonical") model and optimizer state: full, unsharded fp32 tensors named
as in HybridLM.state_dict(), whatever the TP / PP / ZeRO layout that holds them.

ZeRO shards are assembled and set with DeepSpeed's own accessors (deepspeed.utils
safe_get/set_full_fp32_param and *_optimizer_state); tensor-parallel shards are gathered over the
TP group and cut with megatron's attributes (`tensor_model_parallel`, `partition_dim`) plus ours
(`tp_fused`: blocks sharded separately, e.g. Wqkv's q, k, v). The gathered checkpoint format stores
these tensors (one safetensors file per pipeline stage); the sharded format
(h3pretrain.checkpoint.sharded) stores the same tensors as boxes, each written by the rank owning it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
MODEL_DIR, OPTIM_DIR, SCHEDULER_FILE = "model", "optim", "lr_scheduler.pt"


def stage_file(pp_rank: int, pp: int) -> str:
    return f"stage-{pp_rank:03d}-of-{pp:03d}.safetensors"


def write_stage(directory: Path, tensors: dict[str, torch.Tensor], pp_rank: int, pp: int) -> list[Path]:
    """One pipeline stage's full tensors: weights to model/, Adam moments (`name::exp_avg`) to optim/.
    Returns the two files."""
    from safetensors.torch import save_file

    written = []
    for sub, keep in ((MODEL_DIR, lambda k: "::" not in k), (OPTIM_DIR, lambda k: "::" in k)):
        (directory / sub).mkdir(parents=True, exist_ok=True)
        written.append(directory / sub / stage_file(pp_rank, pp))
        save_file({k: v.contiguous() for k, v in tensors.items() if keep(k)}, str(written[-1]))
    return written


def tensor_source(directory: Path):
    """name -> full tensor, from every stage's files (weights and Adam moments)."""
    weights = SafetensorsReader(directory / MODEL_DIR)
    optim = SafetensorsReader(directory / OPTIM_DIR)
    return lambda name: optim(name) if "::" in name else weights(name)


def write_scheduler(directory: Path, state: dict) -> Path:
    torch.save(state, directory / SCHEDULER_FILE)
    return directory / SCHEDULER_FILE


def read_scheduler(directory: Path) -> dict:
    return torch.load(directory / SCHEDULER_FILE, weights_only=True)


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def shard(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's piece of a full tensor, for the parameter `param` holds."""
    if not is_tp_sharded(param) or tp == 1:
        return full
    dim, fused = param.partition_dim, getattr(param, "tp_fused", 1)
    return torch.cat([block.chunk(tp, dim)[tp_rank] for block in full.chunk(fused, dim)], dim)


def gather(local: torch.Tensor, param: torch.Tensor, tp_group, tp: int) -> torch.Tensor:
    """Collective over the TP group: the full tensor from every rank's piece."""
    if not is_tp_sharded(param) or tp == 1:
        return local
    pieces = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(pieces, local.contiguous(), group=tp_group)
    dim, fused = param.partition_dim, getattr(param, "tp_fused", 1)
    blocks = [piece.chunk(fused, dim) for piece in pieces]
    return torch.cat([torch.cat([b[f] for b in blocks], dim) for f in range(fused)], dim)


def named_params(models: Iterable[nn.Module]) -> Iterator[tuple[str, nn.Parameter]]:
    """Canonical names of this rank's parameters (pipeline chunks keep the global layer index)."""
    for model in models:
        yield from model.named_parameters()


def _zero_full(param: nn.Parameter, key: str | None) -> torch.Tensor | None:
    """Collective over the DP group for ZeRO parameters: the full (this TP rank's) tensor."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if key is None:
        value = safe_get_full_fp32_param(param)
        return param.detach().float() if value is None else value
    return safe_get_full_optimizer_state(param, key)


def collect(models: list[nn.Module], tp_group, tp: int, optimizer_state: bool = True,
            grads: bool = False) -> dict[str, torch.Tensor]:
    """Collective (all ranks of the job). Full tensors of this pipeline stage: `name` for weights,
    `name::exp_avg` etc. for optimizer state, `name::grad` for gradients (after the DP reduction)."""
    from deepspeed.utils import safe_get_full_grad

    out: dict[str, torch.Tensor] = {}
    for name, p in named_params(models):
        if getattr(p, "ds_pipe_replicated", False):
            continue  # the last stage's copy of the tied embedding: the first stage owns it
        out[name] = gather(_zero_full(p, None), p, tp_group, tp).to("cpu", copy=True)  # never a view of training state
        if optimizer_state:
            for key in ADAM_KEYS:
                value = _zero_full(p, key)
                if value is not None:
                    out[f"{name}::{key}"] = gather(value, p, tp_group, tp).to("cpu", copy=True)
        if grads:
            g = safe_get_full_grad(p)
            out[f"{name}::grad"] = gather(g if g is not None else torch.zeros_like(p), p, tp_group, tp).cpu()
    return out


def load(models: list[nn.Module], read, tp_rank: int, tp: int, optimizer_state: bool = True,
         zero_dp_group=None) -> None:
    """Sets this rank's parameters (and ZeRO optimizer partitions) from full tensors; `read(name)`
    returns a full tensor. Collective only under ZeRO-3 (re-partitioning)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    for name, p in named_params(models):
        value = shard(read(name), p, tp_rank, tp)
        if hasattr(p, "ds_id"):  # ZeRO-3: write the gathered parameter, re-partitioned on exit
            import deepspeed

            src = dist.get_global_rank(zero_dp_group, 0) if zero_dp_group is not None else 0
            with deepspeed.zero.GatheredParameters([p], modifier_rank=src):
                p.data.copy_(value.to(p.dtype).view_as(p.data))
        else:
            with torch.no_grad():
                p.copy_(value.to(p.dtype).view_as(p))
        safe_set_full_fp32_param(p, value.to(p.device))
        if optimizer_state:
            for key in ADAM_KEYS:
                safe_set_full_optimizer_state(p, shard(read(f"{name}::{key}"), p, tp_rank, tp).to(p.device), key)


class SafetensorsReader:
    """Full tensors by name from a directory of safetensors files (one per pipeline stage)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.files = sorted(Path(directory).glob("*.safetensors"))
        if not self.files:
            raise FileNotFoundError(f"no .safetensors files in {directory}")
        self.handles = [safe_open(str(f), framework="pt") for f in self.files]
        self.index = {key: h for h in self.handles for key in h.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def __call__(self, name: str) -> torch.Tensor:
        try:
            return self.index[name].get_tensor(name)
        except KeyError:
            raise KeyError(f"{name} is not in the checkpoint ({len(self.index)} tensors in "
                           f"{', '.join(f.name for f in self.files)})") from None

    def keys(self) -> list[str]:
        return list(self.index)
