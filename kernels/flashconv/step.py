"""One recurrent step of H3's two SSMs (generation) as fused Triton kernels; the torch references
are `flashconv.reference.shift_step` and `ssm_step` (same arguments), and `flashconv.shift_step` /
`ssm_step` choose between them as `h3_conv` does.

shift_step: the shift SSM's ring buffer takes k_t (slot t mod N, in place) and returns
    k'_t = sum_j taps[j] k_(t-j) + skip k_t.
ssm_step: the diagonal SSM's state x <- dA x + dB u (in place) and returns
    y = 2 Re sum_n C_n x_n (+ skip u).
Unfused in torch, one step is a dozen elementwise kernels that each read and write the whole
state; each Triton kernel reads the state once and writes back only what changes. The position is
read on the device (a 0-dim long tensor), so a step can be replayed as a CUDA graph.
"""
from __future__ import annotations

import torch

from .shift_fir import kernels_available, triton
from .state_passing import Discrete

if triton is not None:
    import triton.language as tl


    @triton.jit
    def _shift_step(ring_ptr, taps_ptr, skip_ptr, k_ptr, pos_ptr, out_ptr, C,
                    N: tl.constexpr, BLOCK_C: tl.constexpr):
        b, pid = tl.program_id(0), tl.program_id(1)
        c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = c < C
        s = tl.arange(0, N)
        slot = tl.load(pos_ptr) % N
        k = tl.load(k_ptr + b * C + c, mask=ok, other=0.0).to(tl.float32)
        ring_off = (b * C + c[:, None]) * N + s[None, :]
        is_new = s[None, :] == slot
        ring = tl.where(is_new, k[:, None], tl.load(ring_ptr + ring_off, mask=ok[:, None], other=0.0))
        tl.store(ring_ptr + ring_off, ring, mask=ok[:, None] & is_new)  # one slot changes
        lag = (slot - s + N) % N
        taps = tl.load(taps_ptr + c[:, None] * N + lag[None, :], mask=ok[:, None], other=0.0)
        skip = tl.load(skip_ptr + c, mask=ok, other=0.0)
        tl.store(out_ptr + b * C + c, tl.sum(ring * taps, axis=1) + skip * k, mask=ok)

    @triton.jit
    def _ssm_step(state_ptr, u_ptr, dA_ptr, dB_ptr, C_ptr, skip_ptr, y_ptr, R, INNER,
                  n: tl.constexpr, HAS_SKIP: tl.constexpr, BLOCK_R: tl.constexpr):
        """Rows r = (head, inner) of batch b; complex numbers as (re, im) pairs of floats."""
        b, pid = tl.program_id(0), tl.program_id(1)
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = r < R
        h = r // INNER
        m = tl.arange(0, n)
        u = tl.load(u_ptr + b * R + r, mask=ok, other=0.0).to(tl.float32)[:, None]
        x_off = ((b * R + r[:, None]) * n + m[None, :]) * 2
        p_off = (h[:, None] * n + m[None, :]) * 2
        mask = ok[:, None]
        xr = tl.load(state_ptr + x_off, mask=mask, other=0.0)
        xi = tl.load(state_ptr + x_off + 1, mask=mask, other=0.0)
        ar = tl.load(dA_ptr + p_off, mask=mask, other=0.0)
        ai = tl.load(dA_ptr + p_off + 1, mask=mask, other=0.0)
        br = tl.load(dB_ptr + p_off, mask=mask, other=0.0)
        bi = tl.load(dB_ptr + p_off + 1, mask=mask, other=0.0)
        new_r = ar * xr - ai * xi + br * u
        new_i = ar * xi + ai * xr + bi * u
        tl.store(state_ptr + x_off, new_r, mask=mask)
        tl.store(state_ptr + x_off + 1, new_i, mask=mask)
        cr = tl.load(C_ptr + p_off, mask=mask, other=0.0)
        ci = tl.load(C_ptr + p_off + 1, mask=mask, other=0.0)
        y = 2 * tl.sum(cr * new_r - ci * new_i, axis=1)
        if HAS_SKIP:
            y += tl.load(skip_ptr + h, mask=ok, other=0.0) * tl.sum(u, axis=1)
        tl.store(y_ptr + b * R + r, y, mask=ok)


BLOCK_C = 32  # shift step: channels per program (x 64 taps)
BLOCK_R = 32  # ssm step: rows per program (x 32 modes)


def kernels_apply(state: torch.Tensor, n: int) -> bool:
    """The Triton steps run here: a device Triton can use, a contiguous state, a power-of-two n."""
    return kernels_available(state.device) and state.is_contiguous() and n & (n - 1) == 0


def shift_step(ring: torch.Tensor, taps: torch.Tensor, skip: torch.Tensor, k: torch.Tensor,
               position: torch.Tensor) -> torch.Tensor:
    """As flashconv.reference.shift_step, in one kernel (where kernels_apply(ring, N))."""
    B, C, N = ring.shape
    out = torch.empty(B, C, device=k.device, dtype=torch.float32)
    _shift_step[(B, triton.cdiv(C, BLOCK_C))](ring, taps.float().contiguous(), skip.float().contiguous(),
                                              k.contiguous(), position, out, C, N=N, BLOCK_C=BLOCK_C)
    return out


def ssm_step(state: torch.Tensor, discrete: Discrete, u: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """As flashconv.reference.ssm_step, in one kernel (where kernels_apply(state, n))."""
    dA = discrete[0]
    B, R = u.shape[0], u[0].numel()
    y = torch.empty(u.shape, device=u.device, dtype=torch.float32)
    params = [torch.view_as_real(p.to(torch.cfloat).contiguous()) for p in discrete]
    skip = skip.float().contiguous() if skip is not None else y  # y: any pointer, never read
    _ssm_step[(B, triton.cdiv(R, BLOCK_R))](torch.view_as_real(state), u.contiguous(), *params, skip, y, R,
                                            R // dA.shape[0], n=dA.shape[-1], HAS_SKIP=skip is not y,
                                            BLOCK_R=BLOCK_R)
    return y
