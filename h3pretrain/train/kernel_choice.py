"""Which FlashConv implementation a run uses (H3_FLASHCONV; see the flashconv package): with "auto",
the Triton kernels run the self-check at this rank's shapes before the first step, and are used
only if it passes on every rank."""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

import flashconv

from ..config import Config

log = logging.getLogger("h3pretrain.train")


def _all_passed(passed: bool, device: torch.device) -> bool:
    t = torch.tensor([1.0 if passed else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def choose_flashconv(cfg: Config, device: torch.device, seq_len: int, tp: int, cp: int) -> dict:
    """{"implementation": "triton" | "reference" | "none", "reason": ...}; collective under "auto"
    where the kernels can run."""
    m = cfg.model
    if "h3" not in m.layer_kinds():
        return {"implementation": "none", "reason": f"no H3 layers (mixer {m.mixer})"}
    if cp > 1:
        return {"implementation": "reference", "reason": "context parallel pieces run in torch (state passing)"}
    choice = flashconv.chosen()
    if not flashconv.kernels_apply(m.ssm_head_dim, m.ssm_d_state):
        return {"implementation": "reference", "reason": f"the fused kernels do not cover ssm_head_dim "
                                                         f"{m.ssm_head_dim}, ssm_d_state {m.ssm_d_state}"}
    if choice != "auto":
        impl = flashconv.implementation(device)
        return {"implementation": impl, "reason": f"H3_FLASHCONV={choice}" +
                ("" if impl == choice else f"; Triton cannot run on {device.type}")}
    if not flashconv.implementation_available(device):
        return {"implementation": "reference", "reason": f"H3_FLASHCONV=auto; Triton cannot run on {device.type}"}
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    result = flashconv.self_check(device, batch=cfg.train.micro_batch, length=seq_len, channels=m.d_model // tp,
                                  head_dim=m.ssm_head_dim, d_state=m.ssm_d_state, dtype=dtype)
    passed = _all_passed(result.passed, device)
    flashconv.mark_checked(device, passed)
    shapes = f"B {cfg.train.micro_batch} x L {seq_len} x D {m.d_model // tp}, {str(dtype).replace('torch.', '')}"
    if not result.passed:
        rank = dist.get_rank() if dist.is_initialized() else 0
        log.warning("FlashConv self-check failed on rank %d (%s): %s; training uses the reference convolution",
                    rank, shapes, result.failure)
    worst = max(result.errors.values(), default=float("nan"))
    if passed:
        reason = f"H3_FLASHCONV=auto, self-check passed ({shapes}; largest error {worst:.2g}, tolerance {result.tolerance:g})"
    else:
        reason = "H3_FLASHCONV=auto, self-check failed" + (f": {result.failure}" if result.failure else " on another rank")
    return {"implementation": "triton" if passed else "reference", "reason": reason}
