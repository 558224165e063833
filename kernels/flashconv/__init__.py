"""flashconv: the long convolutions of the H3 mixer.

`h3_conv` is the one entry point the model calls. Two implementations behind it:
- "reference": the fp32 torch.fft formulation (`flashconv.reference`), the default;
- "triton": the fused kernels — the shift SSM's FIR (`shift_fir`) and the diagonal SSM as a chunked
  scan with the kv outer product and the q gating fused in (`ssm_scan`); for generation, one
  kernel per recurrent step of each SSM (`step`). Chosen with the environment
  variable H3_FLASHCONV=triton (or `set_implementation`); it runs where Triton can (CUDA, or the CPU
  interpreter under TRITON_INTERPRET=1) and falls back to the reference elsewhere. It is not the
  default until it has been validated and measured on a GPU (bench/bench_kernels.py).
"""
from __future__ import annotations

import os

import torch

from . import reference
from .reference import causal_conv, fft_size, h3_conv_reference
from .state_passing import Discrete, ssm_kernel

__all__ = ["h3_conv", "shift_step", "ssm_step", "causal_conv", "fft_size", "h3_conv_reference",
           "set_implementation", "implementation"]

_IMPLEMENTATIONS = ("reference", "triton")
_choice = os.environ.get("H3_FLASHCONV", "reference")
if _choice not in _IMPLEMENTATIONS:
    raise ValueError(f"H3_FLASHCONV={_choice!r}: expected one of {', '.join(_IMPLEMENTATIONS)}")


def set_implementation(name: str) -> None:
    global _choice
    if name not in _IMPLEMENTATIONS:
        raise ValueError(f"flashconv implementation {name!r}: expected one of {', '.join(_IMPLEMENTATIONS)}")
    _choice = name


def implementation_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on `device` (whatever is chosen now)."""
    from .shift_fir import kernels_available

    return kernels_available(device)


def implementation(device: torch.device) -> str:
    """What h3_conv runs on `device` now (shapes the kernels don't support also fall back)."""
    return "triton" if _choice == "triton" and implementation_available(device) else "reference"


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
    if implementation(q.device) == "triton":
        # imported on first use: the Triton modules pick interpreter or GPU when they load
        from .shift_fir import shift_fir_kernel
        from .ssm_scan import h3_ssm_scan, supported

        if supported(head_dim, discrete[0].shape[1]):
            with torch.autocast(device_type=q.device.type, enabled=False):
                k_shifted = shift_fir_kernel(k, shift_taps, shift_skip)
                return h3_ssm_scan(q, k_shifted, v, discrete, ssm_skip, head_dim).to(q.dtype)
    return h3_conv_reference(q, k, v, shift_taps, shift_skip, ssm_kernel(discrete, q.shape[1]), ssm_skip, head_dim)


def _steps(state: torch.Tensor, n: int):
    """The module whose shift_step / ssm_step run on `state`: `step` (Triton) or `reference`."""
    if implementation(state.device) == "triton":
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
