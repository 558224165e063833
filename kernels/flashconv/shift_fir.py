"""The shift SSM's causal FIR as Triton kernels: y[b, t, c] = sum_{j<N} taps[c, j] * u[b, t-j, c]
+ skip[c] * u[b, t, c], directly (N = d_state = 64 taps: no FFT), on the (B, L, C) projections as
they come out of the linear layer, fp32 accumulation whatever the input dtype.

Backward: du is the same FIR looking forward (taps reversed in time); dtaps[c, j] and dskip[c] are
reductions over batch and time, accumulated per block with atomics. `shift_fir_reference` is the
torch.fft equivalent the tests compare against.

On CPU the kernels run under TRITON_INTERPRET=1 (tests, small sizes); `shift_fir` otherwise falls
back to the reference when no GPU is present.
"""
from __future__ import annotations

import os

import torch

from .reference import causal_conv

# triton.jit chooses the interpreter when a kernel is defined, i.e. when this module is imported
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA torch and in our CPU venv
    triton = None


def shift_fir_reference(u: torch.Tensor, taps: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """u (B, L, C), taps (C, N), skip (C,) -> (B, L, C) fp32."""
    return causal_conv(u.transpose(1, 2), taps, skip[:, None]).transpose(1, 2)


if triton is not None:

    @triton.jit
    def _fir_fwd(u_ptr, taps_ptr, skip_ptr, y_ptr, L, C, N: tl.constexpr, REVERSE: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        """y[t] = sum_j taps[j] * u[t - j] (+ skip * u[t]); REVERSE: u[t + j] (the backward's du)."""
        b, pid_t, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        base = b * L * C
        acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for j in range(N):
            src = t + j if REVERSE else t - j
            ok = (src >= 0) & (src < L)
            x = tl.load(u_ptr + base + src[:, None] * C + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
            w = tl.load(taps_ptr + c * N + j, mask=c_ok, other=0.0)
            acc += x.to(tl.float32) * w.to(tl.float32)[None, :]
        t_ok = t < L
        mask = t_ok[:, None] & c_ok[None, :]
        x0 = tl.load(u_ptr + base + t[:, None] * C + c[None, :], mask=mask, other=0.0)
        s = tl.load(skip_ptr + c, mask=c_ok, other=0.0)
        acc += x0.to(tl.float32) * s.to(tl.float32)[None, :]
        tl.store(y_ptr + base + t[:, None] * C + c[None, :], acc, mask=mask)

    @triton.jit
    def _fir_bwd_params(u_ptr, dy_ptr, dtaps_ptr, dskip_ptr, L, C, N: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        """dtaps[c, j] += sum_t dy[t, c] * u[t - j, c]; dskip[c] += sum_t dy[t, c] * u[t, c]."""
        b, pid_t, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        t_ok = t < L
        base = b * L * C
        g = tl.load(dy_ptr + base + t[:, None] * C + c[None, :], mask=t_ok[:, None] & c_ok[None, :],
                    other=0.0).to(tl.float32)
        for j in range(N):
            src = t - j
            ok = (src >= 0) & t_ok
            x = tl.load(u_ptr + base + src[:, None] * C + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
            tl.atomic_add(dtaps_ptr + c * N + j, tl.sum(g * x.to(tl.float32), axis=0), mask=c_ok)
        x0 = tl.load(u_ptr + base + t[:, None] * C + c[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
        tl.atomic_add(dskip_ptr + c, tl.sum(g * x0.to(tl.float32), axis=0), mask=c_ok)


BLOCK_T, BLOCK_C = 64, 32


def _grid(B: int, L: int, C: int):
    return (B, triton.cdiv(L, BLOCK_T), triton.cdiv(C, BLOCK_C))


@torch.library.custom_op("flashconv::shift_fir", mutates_args=())
def shift_fir_kernel(u: torch.Tensor, taps: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """The Triton FIR as a custom op (opaque to torch.compile, differentiable): (B, L, C) fp32."""
    u, taps, skip = u.contiguous(), taps.contiguous(), skip.contiguous()
    B, L, C = u.shape
    y = torch.empty(B, L, C, device=u.device, dtype=torch.float32)
    _fir_fwd[_grid(B, L, C)](u, taps, skip, y, L, C, N=taps.shape[1], REVERSE=False, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
    return y


@shift_fir_kernel.register_fake
def _(u, taps, skip):
    return u.new_empty(u.shape, dtype=torch.float32)


@torch.library.custom_op("flashconv::shift_fir_backward", mutates_args=())
def shift_fir_backward(dy: torch.Tensor, u: torch.Tensor, taps: torch.Tensor,
                       skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(du, dtaps, dskip) in the dtypes of (u, taps, skip)."""
    u, taps, skip, dy = u.contiguous(), taps.contiguous(), skip.contiguous(), dy.contiguous()
    B, L, C = u.shape
    N = taps.shape[1]
    du = torch.empty(B, L, C, device=u.device, dtype=torch.float32)
    _fir_fwd[_grid(B, L, C)](dy, taps, skip, du, L, C, N=N, REVERSE=True, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
    dtaps = torch.zeros(C, N, device=u.device, dtype=torch.float32)
    dskip = torch.zeros(C, device=u.device, dtype=torch.float32)
    _fir_bwd_params[_grid(B, L, C)](u, dy, dtaps, dskip, L, C, N=N, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
    return du.to(u.dtype), dtaps.to(taps.dtype), dskip.to(skip.dtype)


@shift_fir_backward.register_fake
def _(dy, u, taps, skip):
    return u.new_empty(u.shape), taps.new_empty(taps.shape), skip.new_empty(skip.shape)


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _shift_fir_grads(ctx, dy):
    return shift_fir_backward(dy, *ctx.saved_tensors)


shift_fir_kernel.register_autograd(_shift_fir_grads, setup_context=_save_inputs)


def kernels_available(device: torch.device) -> bool:
    if triton is None:
        return False
    return device.type == "cpu" if INTERPRETED else device.type == "cuda"


def shift_fir(u: torch.Tensor, taps: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """u (B, L, C), taps (C, N), skip (C,) -> (B, L, C) fp32: the Triton kernels where they can run."""
    if not kernels_available(u.device):
        return shift_fir_reference(u, taps, skip)
    return shift_fir_kernel(u, taps, skip)
