"""State passing for the diagonal SSM (H3 paper, section 4.2): a long sequence is processed chunk by
chunk; each chunk convolves with the kernel of its own length only and carries the exact SSM state
x (n complex modes per channel) to the next. Memory is linear in L; the result equals the
one-shot convolution with the full-length kernel.

With x_in the state before a chunk (after position s-1), inside the chunk (tau = 0 .. T-1):
    y[s + tau] = sum_{j<=tau} K[tau - j] u[s + j]  +  2 Re sum_n C_n dA_n^(tau+1) x_in_n
    x_out      = dA^T x_in + sum_j dA^(T-1-j) dB u[s + j]
where K[l] = 2 Re sum_n C_n dB_n dA_n^l. The same two terms let independent pieces of a sequence
(context parallelism) be computed with zero state and corrected afterwards: `combine_states`,
`h3_conv_piece`.

Powers dA^l for l < T are evaluated as dA^(a*S) * dA^b with S ~ sqrt(T) (`_split_powers`), so no
(H, n, T) Vandermonde is ever materialised. This is the torch formulation (autograd for the
backward); kernels fuse it.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .reference import causal_conv, gate, outer_kv

Discrete = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (dA, dB, C), each (H, n) complex


def _split_powers(dA: torch.Tensor, length: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """dA^(start + a*S + b) = outer[..., a] * inner[..., b]: outer (H, n, A), inner (H, n, S)."""
    S = max(1, math.isqrt(length))
    A = -(-length // S)
    log_dA = torch.log(dA)[..., None]
    inner = torch.exp(log_dA * torch.arange(S, device=dA.device, dtype=torch.float32))
    outer = torch.exp(log_dA * (start + S * torch.arange(A, device=dA.device, dtype=torch.float32)))
    return outer, inner, S


def _power(dA: torch.Tensor, exponent: int) -> torch.Tensor:
    return torch.exp(torch.log(dA) * float(exponent))


def _per_head(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """(H, n, ...) -> (H, 1, ..., 1, n, ...) to broadcast against (B, H, *inner, n, ...) of `ndim` dims."""
    H = x.shape[0]
    return x.view(H, *([1] * (ndim - 3 - (x.dim() - 2))), *x.shape[1:])


def mode_sum(coeff: torch.Tensor, dA: torch.Tensor, length: int, start: int = 0) -> torch.Tensor:
    """2 Re sum_n coeff_n dA_n^(start + t) for t < length: coeff (..., H, *inner, n) complex with the
    head axis third from the left of (B, H, *inner, n) or (H, n) itself -> (..., length) fp32."""
    outer, inner, S = _split_powers(dA, length, start)
    if coeff.dim() == 2:  # (H, n): a kernel
        blocks = torch.matmul(coeff[:, None, :] * outer.transpose(1, 2), inner)  # (H, A, S)
    else:
        nd = coeff.dim() + 1
        weighted = coeff[..., None, :] * _per_head(outer.transpose(1, 2), nd)  # (B, H, *, A, n)
        blocks = torch.matmul(weighted, _per_head(inner, nd))  # (B, H, *, A, S)
    return 2 * blocks.real.flatten(-2)[..., :length]


def ssm_kernel(discrete: Discrete, length: int) -> torch.Tensor:
    """(H, length) fp32: K[l] = 2 Re sum_n C_n dB_n dA_n^l."""
    dA, dB, C = discrete
    return mode_sum(C * dB, dA, length)


def final_state(u: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """x = sum_j dA^(L-1-j) dB u_j. u: (B, H, *inner, L) real -> (B, H, *inner, n) complex64.

    Chunk by chunk, x <- dA^T x + sum_tau dA^(T-1-tau) u_tau, where the sum is one real batched
    matmul per head, (H, B*inner, T) @ (H, T, 2n) against the real and imaginary parts of the
    powers (one (H, n, chunk) table for every chunk, from split powers), and dB multiplies once at the end."""
    B, H, L = u.shape[0], u.shape[1], u.shape[-1]
    inner = u.shape[2:-1]
    n = dA.shape[-1]
    rows = u.float().reshape(B, H, -1, L).transpose(0, 1).reshape(H, -1, L)  # (H, B*inner, L)
    T = min(chunk, L)
    high, low, S = _split_powers(dA, T)
    # descending exponents A*S-1 .. 0 from the two factors reversed; the last T are T-1 .. 0
    powers = (high.flip(-1)[..., None] * low.flip(-1)[..., None, :]).flatten(-2)[..., high.shape[-1] * S - T:]
    table = torch.cat([powers.real, powers.imag], dim=1).transpose(1, 2)  # (H, T, 2n), a view of (H, 2n, T)
    state = None
    for start in range(0, L, T):
        size = min(T, L - start)
        part = torch.bmm(rows[..., start:start + size], table[:, T - size:])  # (H, B*inner, 2n)
        part = torch.complex(part[..., :n], part[..., n:])
        state = part if state is None else _power(dA, size)[:, None] * state + part
    state = state * dB[:, None]
    return state.reshape(H, B, *inner, n).movedim(0, 1)


def state_correction(state: torch.Tensor, dA: torch.Tensor, C: torch.Tensor, length: int) -> torch.Tensor:
    """What a state x_in adds to the next `length` outputs: 2 Re sum_n C_n dA_n^(tau+1) x_in_n."""
    return mode_sum(state * _per_head(C, state.dim()), dA, length, start=1)


def ssm_chunk(u: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor, C: torch.Tensor,
              state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk. u: (B, H, *inner, T) real; dA, dB, C: (H, n) complex; state: (B, H, *inner, n)
    complex or None (zero). Returns y (B, H, *inner, T) fp32 (no D skip) and the state after it."""
    T = u.shape[-1]
    kernel = ssm_kernel((dA, dB, C), T)
    y = causal_conv(u, kernel.view(kernel.shape[0], *([1] * (u.dim() - 3)), T))
    new_state = final_state(u, dA, dB)
    if state is not None:
        y = y + state_correction(state, dA, C, T)
        new_state = new_state + _per_head(_power(dA, T), state.dim()) * state
    return y, new_state


def chunked_ssm_conv(u: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor, C: torch.Tensor, chunk: int,
                     state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole sequence, `chunk` positions at a time (the last chunk may be shorter)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, not {chunk}")
    outputs = []
    for start in range(0, u.shape[-1], chunk):
        y, state = ssm_chunk(u[..., start:start + chunk], dA, dB, C, state)
        outputs.append(y)
    return torch.cat(outputs, dim=-1), state


def combine_states(local_states: list[torch.Tensor], lengths: list[int], dA: torch.Tensor) -> list[torch.Tensor | None]:
    """Pieces of one sequence computed with zero initial state -> the true state entering each piece:
    x_in[r] = sum_{i<r} dA^(T_{i+1} + ... + T_{r-1}) x_local[i]. (Context parallelism: every rank
    all-gathers the local final states and combines them; no rank waits for another's compute.)"""
    entering: list[torch.Tensor | None] = [None]
    running = None
    for state, length in zip(local_states[:-1], lengths[:-1]):
        if running is not None:
            running = _per_head(_power(dA, length), state.dim()) * running
        running = state if running is None else running + state
        entering.append(running)
    return entering


def h3_conv_piece(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shift_taps: torch.Tensor,
    shift_skip: torch.Tensor,
    discrete: Discrete,
    ssm_skip: torch.Tensor,
    head_dim: int,
    k_history: torch.Tensor | None,
    entering_state: Callable[[torch.Tensor], torch.Tensor | None],
) -> torch.Tensor:
    """`flashconv.h3_conv` on one contiguous piece of a longer sequence.

    q, k, v: (B, T, D) of this piece; k_history: (B, <= N-1, D), the k inputs just before the piece
    (None at the start of the sequence), which the shift SSM's FIR still reaches;
    entering_state(x_local) -> x_in: given this piece's final diagonal-SSM state computed from zero
    (B, H, d1, d2, n), returns the true state entering the piece (None at the start). In context
    parallelism it all-gathers and combines (`combine_states`), the one point where ranks meet.
    Returns (B, T, D) in q's dtype; equals the matching slice of the whole sequence's h3_conv.
    """
    T = q.shape[1]
    dA, dB, C = discrete
    with torch.autocast(device_type=q.device.type, enabled=False):
        k = k.transpose(1, 2).float()  # (B, D, T)
        past = 0
        if k_history is not None:  # (an empty history still joins the graph: see parallel.context)
            past = k_history.shape[1]
            k = torch.cat([k_history.transpose(1, 2).float(), k], dim=-1)
        k = causal_conv(k, shift_taps, shift_skip[:, None])[..., past:]
        kv = outer_kv(k, v.transpose(1, 2), head_dim)  # (B, H, d1, d2, T)
        y, local_state = ssm_chunk(kv, dA, dB, C)
        state_in = entering_state(local_state)
        if state_in is not None:
            y = y + state_correction(state_in, dA, C, T)
        y = y + ssm_skip.view(-1, 1, 1, 1).float() * kv
        return gate(q, y).to(q.dtype)
