"""Pure-PyTorch reference for the H3 mixer's convolution section.

Everything here runs in fp32 whatever the input dtype (autocast is switched off inside), with FFT
size >= 2L so the circular FFT convolution equals the causal linear one. The fused kernels in this
package are tested against these functions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fft_size(length: int) -> int:
    """Smallest power of two >= 2 * length (linear, not circular, convolution)."""
    return 1 << max(1, (2 * length - 1).bit_length())


def causal_conv(u: torch.Tensor, kernel: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """y[..., t] = sum_{s<=t} kernel[..., s] * u[..., t-s]  (+ skip * u), in fp32.

    u: (..., L); kernel: (..., Lk) broadcastable against u, zero-padded or truncated to L;
    skip: broadcastable against u, or None.
    """
    L = u.shape[-1]
    u = u.float()
    kernel = kernel.float()
    if kernel.shape[-1] > L:
        kernel = kernel[..., :L]
    n = fft_size(L)
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(kernel, n=n), n=n)[..., :L]
    if skip is not None:
        y = y + u * skip.float()
    return y


def h3_conv_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shift_taps: torch.Tensor,
    shift_skip: torch.Tensor,
    ssm_kernel: torch.Tensor,
    ssm_skip: torch.Tensor,
    head_dim: int,
) -> torch.Tensor:
    """The convolution section of an H3 mixer (docs/design.md section 1, steps 2-5).

    q, k, v: (B, L, D) projections, channel c = h * head_dim + d (head-major).
    shift_taps: (D, N) FIR taps of the shift SSM; shift_skip: (D,).
    ssm_kernel: (H, L') diagonal-SSM kernel (L' >= L); ssm_skip: (H,).
    Returns (B, L, D) in q's dtype:
        k' = shift_taps * k + shift_skip * k
        kv[h, d1, d2] = k'[h, d1] * v[h, d2]
        y = ssm_kernel[h] * kv + ssm_skip[h] * kv
        out[h, d2] = sum_d1 q[h, d1] * y[h, d1, d2]
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        k = causal_conv(k.transpose(1, 2), shift_taps, shift_skip[:, None])  # (B, D, L)
        kv = outer_kv(k, v.transpose(1, 2), head_dim)
        y = causal_conv(kv, ssm_kernel[:, None, None, :], ssm_skip[:, None, None, None])
        return gate(q, y).to(q.dtype)


def outer_kv(k: torch.Tensor, v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per-head outer product in fp32: k, v (B, D, L) -> kv (B, H, d1, d2, L), kv[d1, d2] = k[d1] v[d2]."""
    B, D, L = k.shape
    H = D // head_dim
    return k.float().view(B, H, head_dim, 1, L) * v.float().view(B, H, 1, head_dim, L)


def gate(q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """q (B, L, D), y (B, H, d1, d2, L) -> out[h, d2] = sum_d1 q[h, d1] y[h, d1, d2], (B, L, D) fp32."""
    B, H, hd, _, L = y.shape
    out = (q.transpose(1, 2).float().view(B, H, hd, 1, L) * y).sum(dim=2)  # (B, H, d2, L)
    return out.reshape(B, H * hd, L).transpose(1, 2)


def pad_taps(taps: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad (or cut) FIR taps to `length` along the last axis."""
    n = taps.shape[-1]
    return taps[..., :length] if n >= length else F.pad(taps, (0, length - n))


def shift_step(ring: torch.Tensor, taps: torch.Tensor, skip: torch.Tensor, k: torch.Tensor,
               position: torch.Tensor) -> torch.Tensor:
    """The shift SSM's step: ring (B, C, N) fp32 takes k_t in slot t mod N (in place); returns
    k'_t = sum_j taps[j] k_(t-j) + skip k_t, (B, C) fp32. taps (C, N), skip (C,), k (B, C),
    position: t as a 0-dim long tensor."""
    N = ring.shape[-1]
    k = k.float()
    ring.index_copy_(2, (position % N).view(1), k[..., None])
    # slot s holds k from (position - s) mod N steps back, which tap `lag` multiplies
    lag = (position - torch.arange(N, device=k.device)) % N
    return (ring * taps.index_select(1, lag)).sum(-1) + skip * k


def ssm_step(state: torch.Tensor, discrete: tuple[torch.Tensor, torch.Tensor, torch.Tensor], u: torch.Tensor,
             skip: torch.Tensor | None = None) -> torch.Tensor:
    """The diagonal SSM's step: state (B, H, *inner, n) complex64 <- dA x + dB u (in place); returns
    y = 2 Re sum_n C_n x_n (+ skip u), (B, H, *inner) fp32. (dA, dB, C) each (H, n) complex,
    u (B, H, *inner) real, skip (H,) or None."""
    dA, dB, C = discrete
    shape = (dA.shape[0],) + (1,) * (u.dim() - 2) + (dA.shape[1],)
    state.mul_(dA.view(shape)).add_(dB.view(shape) * u.to(torch.cfloat)[..., None])
    y = 2 * (C.view(shape) * state).sum(-1).real
    if skip is not None:
        y = y + skip.view(skip.shape[0], *([1] * (u.dim() - 2))) * u.float()
    return y
