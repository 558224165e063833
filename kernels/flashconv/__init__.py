"""flashconv: the long convolutions of the H3 mixer.

`h3_conv` is the one entry point the model calls. Today its body is the fp32 torch.fft reference
(`flashconv.reference`); the fused Triton kernels replace the body, never the call sites.
"""
from __future__ import annotations

import torch

from .reference import causal_conv, fft_size, h3_conv_reference

__all__ = ["h3_conv", "causal_conv", "fft_size", "h3_conv_reference"]


def h3_conv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shift_taps: torch.Tensor,
    shift_skip: torch.Tensor,
    ssm_kernel: torch.Tensor,
    ssm_skip: torch.Tensor,
    head_dim: int,
) -> torch.Tensor:
    """Shift conv on k, k (x) v per head, diagonal-SSM conv, gating by q. See `h3_conv_reference`."""
    return h3_conv_reference(q, k, v, shift_taps, shift_skip, ssm_kernel, ssm_skip, head_dim)
