"""Optimizer parameter groups, optimizer choice, and the generated DeepSpeed config."""
from __future__ import annotations

import copy
import json

import torch
from torch import nn

from ..config import ConfigError, TrainConfig
from ..model.ssm import NO_WEIGHT_DECAY


def is_no_decay(name: str) -> bool:
    """SSM parameters log_dt, inv_A_real, A_imag and both B's (docs/design.md section 1)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in NO_WEIGHT_DECAY and ("shift_kernel." in name or "diag_kernel." in name)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if is_no_decay(name) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "ssm_no_decay"}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, str]:
    """Returns the optimizer and a short description of which implementation it is."""
    groups = param_groups(model, cfg.weight_decay)
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    cuda = next(model.parameters()).is_cuda
    choice = cfg.optimizer
    if choice in ("auto", "apex") and cuda:
        try:
            from apex.optimizers import FusedAdam as ApexFusedAdam

            return ApexFusedAdam(groups, adam_w_mode=True, **kw), "apex FusedAdam"
        except ImportError:
            if choice == "apex":
                raise RuntimeError("train.optimizer=apex but NVIDIA apex is not installed") from None
    if choice == "deepspeed":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kw), "DeepSpeed FusedAdam"
    if choice not in ("auto", "torch", "apex"):
        raise ConfigError(f"unknown train.optimizer {choice!r} (auto, torch, apex, deepspeed)")
    if cuda:
        return torch.optim.AdamW(groups, fused=True, **kw), "torch AdamW (fused)"
    return torch.optim.AdamW(groups, foreach=True, **kw), "torch AdamW (foreach)"


def deepspeed_config(cfg: TrainConfig, dp_size: int, micro_batch: int | None = None, cp: int = 1) -> dict:
    """micro_batch: what DeepSpeed calls one micro-batch (default train.micro_batch; the local batch
    when a pipeline schedule does the micro-batching itself). cp: context-parallel ranks, which
    DeepSpeed counts as data-parallel ones (each holds a piece of the same sequences)."""
    micro = micro_batch or cfg.micro_batch
    local = cfg.global_batch // dp_size
    if cfg.global_batch % dp_size or local % micro:
        raise ConfigError(f"global_batch {cfg.global_batch} must split into {dp_size} ranks x micro_batch "
                          f"{micro} x an integer number of accumulation steps")
    ds = {
        "train_batch_size": cfg.global_batch * cp,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": local // micro,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        # Mixed precision is torch autocast in the loop: parameters (the SSMs above all), gradients
        # and optimizer state stay fp32, so DeepSpeed runs its fp32 path.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": cfg.steps, "warmup_num_steps": max(2, cfg.warmup_steps),
            "warmup_min_ratio": 0.0, "warmup_type": "linear", "cos_min_ratio": cfg.min_lr_ratio}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    ds = _merge(ds, cfg.deepspeed)
    if cfg.deepspeed_json:
        with open(cfg.deepspeed_json) as f:
            ds = _merge(ds, json.load(f))
    return ds


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
