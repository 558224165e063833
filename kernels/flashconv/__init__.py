"""flashconv: the long convolutions of the H3 mixer.

`h3_conv` is the one entry point the model calls. Two implementations behind it:
- "reference": the fp32 torch.fft formulation (`flashconv.reference`);
- "triton": the fused kernels — the shift SSM's FIR (`shift_fir`) and the diagonal SSM as a chunked
  scan with the kv outer product and the q gating fused in (`ssm_scan`), both torch.library custom
  ops (torch.compile traces around them); for generation, one kernel per recurrent step of each
  SSM (`step`). They run where Triton can (CUDA, or the CPU interpreter under TRITON_INTERPRET=1).

H3_FLASHCONV (or `set_implementation`) chooses:
- "auto" (default): the kernels once `self_check` has passed on the device at a run's shapes
  (the trainer runs it before the first step), the reference before that or where it failed;
  generation steps use the reference;
- "triton": the kernels wherever they can run, unchecked (generation steps too);
- "reference": always the reference.
"""
from __future__ import annotations

import os

import torch

from . import reference
from .reference import causal_conv, fft_size, h3_conv_reference
from .state_passing import Discrete, ssm_kernel

__all__ = ["h3_conv", "shift_step", "ssm_step", "causal_conv", "fft_size", "h3_conv_reference",
           "set_implementation", "implementation", "self_check", "kernels_apply"]

IMPLEMENTATIONS = ("auto", "reference", "triton")
_choice = os.environ.get("H3_FLASHCONV", "auto")
if _choice not in IMPLEMENTATIONS:
    raise ValueError(f"H3_FLASHCONV={_choice!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
_checked: dict[str, bool] = {}  # device type -> whether the self-check passed there (auto)


def set_implementation(name: str) -> None:
    global _choice
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"flashconv implementation {name!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    _choice = name


def chosen() -> str:
    """What H3_FLASHCONV / set_implementation asked for."""
    return _choice


def implementation_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on `device` (whatever is chosen now)."""
    from .shift_fir import kernels_available

    return kernels_available(device)


def kernels_apply(head_dim: int, d_state: int) -> bool:
    """Whether the fused kernels cover an H3 layer of this shape (else h3_conv uses the reference)."""
    from .ssm_scan import supported

    return supported(head_dim, d_state // 2)


def mark_checked(device: torch.device, passed: bool) -> None:
    """Record the self-check's verdict for `device` (what "auto" then runs there)."""
    _checked[torch.device(device).type] = passed


def implementation(device: torch.device) -> str:
    """What h3_conv runs on `device` now (shapes the kernels don't support also fall back)."""
    if not implementation_available(device) or _choice == "reference":
        return "reference"
    if _choice == "triton" or _checked.get(torch.device(device).type, False):
        return "triton"
    return "reference"


def _triton_conv(q, k, v, shift_taps, shift_skip, discrete: Discrete, ssm_skip, head_dim: int) -> torch.Tensor:
    # imported on first use: the Triton modules pick interpreter or GPU when they load
    from .shift_fir import shift_fir_kernel
    from .ssm_scan import h3_ssm_scan

    with torch.autocast(device_type=q.device.type, enabled=False):
        k_shifted = shift_fir_kernel(k, shift_taps, shift_skip)
        return h3_ssm_scan(q, k_shifted, v, discrete, ssm_skip, head_dim).to(q.dtype)


def _reference_conv(q, k, v, shift_taps, shift_skip, discrete: Discrete, ssm_skip, head_dim: int) -> torch.Tensor:
    return h3_conv_reference(q, k, v, shift_taps, shift_skip, ssm_kernel(discrete, q.shape[1]), ssm_skip, head_dim)


def _call(conv):
    return lambda t, hd: conv(t["q"], t["k"], t["v"], t["taps"], t["shift_skip"], (t["dA"], t["dB"], t["C"]),
                              t["ssm_skip"], hd)


def self_check(device: torch.device, *, batch: int, length: int, channels: int, head_dim: int, d_state: int,
               dtype: torch.dtype, seed: int = 0):
    """The Triton kernels vs the fp32 reference, forward and backward, at these shapes
    (flashconv.selfcheck); returns its CheckResult (the verdict is recorded by `mark_checked`)."""
    from . import selfcheck

    if not implementation_available(device):
        return selfcheck.CheckResult(False, {"device": str(device)}, failure=f"Triton cannot run on {device}")
    if not kernels_apply(head_dim, d_state):
        return selfcheck.CheckResult(False, {"head_dim": head_dim, "d_state": d_state},
                                     failure=f"the fused kernels do not cover head_dim {head_dim}, d_state {d_state}")
    return selfcheck.check(_call(_triton_conv), _call(_reference_conv), batch=batch, length=length,
                           channels=channels, head_dim=head_dim, d_state=d_state, dtype=dtype,
                           device=torch.device(device), seed=seed)


def h3_conv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shift_taps: torch.Tensor,
    shift_skip: torch.Tensor,
    discrete: Discrete,
    ssm_skip: torch.Tensor,
    head_dim: int,
) -> torch.Tensor:
    """Shift conv on k, k (x) v per head, diagonal-SSM conv, gating by q. See `h3_conv_reference`;
    discrete: the diagonal SSM's (dA, dB, C)."""
    if implementation(q.device) == "triton" and kernels_apply(head_dim, 2 * discrete[0].shape[1]):
        return _triton_conv(q, k, v, shift_taps, shift_skip, discrete, ssm_skip, head_dim)
    return _reference_conv(q, k, v, shift_taps, shift_skip, discrete, ssm_skip, head_dim)


def _steps(state: torch.Tensor, n: int):
    """The module whose shift_step / ssm_step run on `state`: `step` (Triton, when chosen
    explicitly) or `reference`."""
    if _choice == "triton" and implementation(state.device) == "triton":
        from . import step

        if step.kernels_apply(state, n):
            return step
    return reference


def shift_step(ring: torch.Tensor, taps: torch.Tensor, skip: torch.Tensor, k: torch.Tensor,
               position: torch.Tensor) -> torch.Tensor:
    """One generation step of the shift SSM (see `reference.shift_step`)."""
    return _steps(ring, ring.shape[-1]).shift_step(ring, taps, skip, k, position)


def ssm_step(state: torch.Tensor, discrete: Discrete, u: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """One generation step of the diagonal SSM (see `reference.ssm_step`)."""
    return _steps(state, discrete[0].shape[-1]).ssm_step(state, discrete, u, skip)
