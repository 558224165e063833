"""The H3 mixer's diagonal-SSM section as one fused Triton kernel (forward and backward):

    kv[h, d1, d2, t] = k'[h, d1, t] * v[h, d2, t]
    y = SSM(kv) + D[h] * kv                  (S4D-Lin diagonal SSM, n complex modes per head)
    out[h, d2, t] = sum_d1 q[h, d1, t] * y[h, d1, d2, t]

computed as a chunked scan instead of an FFT: the sequence is cut into chunks of T positions, and
for every chunk, with x the complex state entering it (n modes per kv channel),

    y     = kv @ Toep + Re(x @ W) + D kv       Toep[s, t] = K[t - s] (t >= s), W[n, t] = 2 C dA^(t+1)
    x_out = dA^T x + kv @ V                    V[s, n] = dA^(T-1-s) dB

so all the work is small matrix products (tl.dot: tensor cores) on tiles that stay on chip; q, k',
v are read once and out written once (kv never reaches memory), any L works (the last chunk is
masked), memory is linear in L, and the state passing between chunks is exact (the same equations
as flashconv.state_passing). The per-head matrices come from `chunk_matrices` (torch, autograd), so
the SSM parameters get their gradients through them.

The backward walks the chunks in reverse with the adjoint state; it reads the chunk-entering
states that the forward saved (n complex per kv channel per chunk: for head_dim 1 and T = 64 about
as much memory as the inputs). Parameter-matrix gradients are summed per program, then over
programs in torch (deterministic: no atomics).

On CPU the kernels run under TRITON_INTERPRET=1 (tests, small sizes).
"""
from __future__ import annotations

import torch

from .shift_fir import INTERPRETED, kernels_available, triton
from .state_passing import Discrete, ssm_kernel

if triton is not None:
    import triton.language as tl
    from triton.runtime.errors import OutOfResources


def chunk_matrices(discrete: Discrete, T: int) -> tuple[torch.Tensor, ...]:
    """(Toep (H, T, T), Wr, Wi (H, n, T), Vr, Vi (H, T, n), Pr, Pi (H, n)), fp32, differentiable."""
    dA, dB, C = discrete
    K = ssm_kernel(discrete, T)  # (H, T)
    s = torch.arange(T, device=K.device)
    lag = s[None, :] - s[:, None]  # t - s
    Toep = torch.where(lag >= 0, K[:, lag.clamp_min(0)], K.new_zeros(()))
    steps = torch.arange(T + 1, device=K.device, dtype=torch.float32)
    powers = torch.exp(torch.log(dA)[..., None] * steps)  # dA^0 .. dA^T: (H, n, T+1)
    W = 2 * C[..., None] * powers[..., 1:]  # (H, n, T)
    V = (powers[..., :T].flip(-1) * dB[..., None]).transpose(1, 2)  # (H, T, n)
    P = powers[..., T]
    return Toep, W.real, W.imag, V.real, V.imag, P.real, P.imag


if triton is not None:

    @triton.jit
    def _rows(L, D, h, pid_b, B, HD: tl.constexpr, BB: tl.constexpr):
        """Row r of a program's tile = (batch b, d1, d2); returns offsets of k'[b, 0, h*HD+d1],
        v[b, 0, h*HD+d2] and whether b < B."""
        r = tl.arange(0, BB * HD * HD)
        b = pid_b * BB + r // (HD * HD)
        d1 = (r // HD) % HD
        d2 = r % HD
        ok = b < B
        base = b * L * D + h * HD
        return base + d1, base + d2, ok

    @triton.jit
    def _head_matrices(toep_ptr, wr_ptr, wi_ptr, vr_ptr, vi_ptr, pr_ptr, pi_ptr, dskip_ptr, h,
                       T: tl.constexpr, N: tl.constexpr):
        """Head h's chunk matrices (see chunk_matrices), loaded once per program."""
        tt = tl.arange(0, T)
        nn = tl.arange(0, N)
        toep = tl.load(toep_ptr + h * T * T + tt[:, None] * T + tt[None, :])
        wr = tl.load(wr_ptr + h * N * T + nn[:, None] * T + tt[None, :])
        wi = tl.load(wi_ptr + h * N * T + nn[:, None] * T + tt[None, :])
        vr = tl.load(vr_ptr + h * T * N + tt[:, None] * N + nn[None, :])
        vi = tl.load(vi_ptr + h * T * N + tt[:, None] * N + nn[None, :])
        pr = tl.load(pr_ptr + h * N + nn)[None, :]
        pi = tl.load(pi_ptr + h * N + nn)[None, :]
        return toep, wr, wi, vr, vi, pr, pi, tl.load(dskip_ptr + h)

    @triton.jit
    def _out_rows(L, D, h, pid_b, B, HD: tl.constexpr, BB: tl.constexpr):
        """Rows (b, d) of a program's (B*HD, T) output tiles: offsets of [b, 0, h*HD+d], and b < B."""
        ro = tl.arange(0, BB * HD)
        ob = pid_b * BB + ro // HD
        return ob * L * D + h * HD + ro % HD, ob < B

    @triton.jit
    def _state_rows(h, pid_b, H, HD: tl.constexpr, BB: tl.constexpr):
        """Row r = (b, d1, d2) of a tile -> its row in the saved states (B, H, HD*HD, ...)."""
        rows = tl.arange(0, BB * HD * HD)
        return ((pid_b * BB + rows // (HD * HD)) * H + h) * (HD * HD) + rows % (HD * HD)

    @triton.jit
    def _load_chunk(q_ptr, k_ptr, v_ptr, k_off, v_off, row_ok, t, L, D):
        """q[d1], k'[d1], v[d2] of every row over positions t, fp32 (zero past L)."""
        m = row_ok[:, None] & (t < L)[None, :]
        kk = tl.load(k_ptr + k_off[:, None] + t[None, :] * D, mask=m, other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + v_off[:, None] + t[None, :] * D, mask=m, other=0.0).to(tl.float32)
        qq = tl.load(q_ptr + k_off[:, None] + t[None, :] * D, mask=m, other=0.0).to(tl.float32)
        return qq, kk, vv

    @triton.jit
    def _chunk_y(kv, xr, xi, toep, wr, wi, dsk, IEEE: tl.constexpr):
        """y = kv @ Toep + Re(x @ W) + D kv (the forward's output, recomputed by the backward)."""
        prec: tl.constexpr = "ieee" if IEEE else "tf32"
        return tl.dot(kv, toep, input_precision=prec) + tl.dot(xr, wr, input_precision=prec) \
            - tl.dot(xi, wi, input_precision=prec) + dsk * kv

    @triton.jit
    def _ssm_fwd(q_ptr, k_ptr, v_ptr, out_ptr, states_ptr,
                 toep_ptr, wr_ptr, wi_ptr, vr_ptr, vi_ptr, pr_ptr, pi_ptr, dskip_ptr,
                 B, L, D, H, n_chunks,
                 HD: tl.constexpr, BB: tl.constexpr, T: tl.constexpr, N: tl.constexpr, IEEE: tl.constexpr):
        h, pid_b = tl.program_id(0), tl.program_id(1)
        R: tl.constexpr = BB * HD * HD
        prec: tl.constexpr = "ieee" if IEEE else "tf32"
        k_off, v_off, row_ok = _rows(L, D, h, pid_b, B, HD, BB)
        tt = tl.arange(0, T)
        nn = tl.arange(0, N)
        toep, wr, wi, vr, vi, pr, pi, dsk = _head_matrices(toep_ptr, wr_ptr, wi_ptr, vr_ptr, vi_ptr, pr_ptr, pi_ptr,
                                                           dskip_ptr, h, T, N)
        xr = tl.zeros((R, N), dtype=tl.float32)
        xi = tl.zeros((R, N), dtype=tl.float32)
        o_off, o_ok = _out_rows(L, D, h, pid_b, B, HD, BB)  # rows (b, d2)
        state_row = _state_rows(h, pid_b, H, HD, BB)
        for c in range(n_chunks):
            t = c * T + tt
            qq, kk, vv = _load_chunk(q_ptr, k_ptr, v_ptr, k_off, v_off, row_ok, t, L, D)
            kv = kk * vv
            st = states_ptr + (state_row[:, None] * n_chunks + c) * 2 * N + nn[None, :]
            tl.store(st, xr, mask=row_ok[:, None])
            tl.store(st + N, xi, mask=row_ok[:, None])
            y = _chunk_y(kv, xr, xi, toep, wr, wi, dsk, IEEE)
            z = tl.sum(tl.reshape(qq * y, (BB, HD, HD, T)), axis=1)
            z = tl.reshape(z, (BB * HD, T))
            tl.store(out_ptr + o_off[:, None] + t[None, :] * D, z, mask=o_ok[:, None] & (t < L)[None, :])
            xr_new = pr * xr - pi * xi + tl.dot(kv, vr, input_precision=prec)
            xi = pi * xr + pr * xi + tl.dot(kv, vi, input_precision=prec)
            xr = xr_new

    @triton.jit
    def _ssm_bwd(q_ptr, k_ptr, v_ptr, dout_ptr, states_ptr, dq_ptr, dk_ptr, dv_ptr,
                 toep_ptr, wr_ptr, wi_ptr, vr_ptr, vi_ptr, pr_ptr, pi_ptr, dskip_ptr,
                 g_toep_ptr, g_wr_ptr, g_wi_ptr, g_vr_ptr, g_vi_ptr, g_pr_ptr, g_pi_ptr, g_dskip_ptr,
                 B, L, D, H, n_chunks,
                 HD: tl.constexpr, BB: tl.constexpr, T: tl.constexpr, N: tl.constexpr, IEEE: tl.constexpr):
        h, pid_b = tl.program_id(0), tl.program_id(1)
        R: tl.constexpr = BB * HD * HD
        prec: tl.constexpr = "ieee" if IEEE else "tf32"
        k_off, v_off, row_ok = _rows(L, D, h, pid_b, B, HD, BB)
        tt = tl.arange(0, T)
        nn = tl.arange(0, N)
        toep, wr, wi, vr, vi, pr, pi, dsk = _head_matrices(toep_ptr, wr_ptr, wi_ptr, vr_ptr, vi_ptr, pr_ptr, pi_ptr,
                                                           dskip_ptr, h, T, N)
        g_toep = tl.zeros((T, T), dtype=tl.float32)
        g_wr = tl.zeros((N, T), dtype=tl.float32)
        g_wi = tl.zeros((N, T), dtype=tl.float32)
        g_vr = tl.zeros((T, N), dtype=tl.float32)
        g_vi = tl.zeros((T, N), dtype=tl.float32)
        g_pr = tl.zeros((N,), dtype=tl.float32)
        g_pi = tl.zeros((N,), dtype=tl.float32)
        g_dsk = tl.zeros((R, T), dtype=tl.float32)
        gr = tl.zeros((R, N), dtype=tl.float32)  # dLoss / d(state leaving the chunk)
        gi = tl.zeros((R, N), dtype=tl.float32)
        state_row = _state_rows(h, pid_b, H, HD, BB)
        o_off, o_ok = _out_rows(L, D, h, pid_b, B, HD, BB)  # rows (b, d)
        d2_off = v_off  # dout[b, t, h*HD + d2] sits where v[b, t, h*HD + d2] does
        for i in range(n_chunks):
            c = n_chunks - 1 - i
            t = c * T + tt
            qq, kk, vv = _load_chunk(q_ptr, k_ptr, v_ptr, k_off, v_off, row_ok, t, L, D)
            m = row_ok[:, None] & (t < L)[None, :]
            go = tl.load(dout_ptr + d2_off[:, None] + t[None, :] * D, mask=m, other=0.0).to(tl.float32)
            st = states_ptr + (state_row[:, None] * n_chunks + c) * 2 * N + nn[None, :]
            xr = tl.load(st, mask=row_ok[:, None], other=0.0)
            xi = tl.load(st + N, mask=row_ok[:, None], other=0.0)
            kv = kk * vv
            y = _chunk_y(kv, xr, xi, toep, wr, wi, dsk, IEEE)
            dq = tl.reshape(tl.sum(tl.reshape(go * y, (BB, HD, HD, T)), axis=2), (BB * HD, T))
            dy = go * qq
            dkv = tl.dot(dy, tl.trans(toep), input_precision=prec) + dsk * dy \
                + tl.dot(gr, tl.trans(vr), input_precision=prec) + tl.dot(gi, tl.trans(vi), input_precision=prec)
            g_toep += tl.dot(tl.trans(kv), dy, input_precision=prec)
            g_wr += tl.dot(tl.trans(xr), dy, input_precision=prec)
            g_wi -= tl.dot(tl.trans(xi), dy, input_precision=prec)
            g_vr += tl.dot(tl.trans(kv), gr, input_precision=prec)
            g_vi += tl.dot(tl.trans(kv), gi, input_precision=prec)
            g_pr += tl.sum(xr * gr + xi * gi, axis=0)
            g_pi += tl.sum(xr * gi - xi * gr, axis=0)
            g_dsk += kv * dy
            gr_in = tl.dot(dy, tl.trans(wr), input_precision=prec) + pr * gr + pi * gi
            gi = -tl.dot(dy, tl.trans(wi), input_precision=prec) - pi * gr + pr * gi
            gr = gr_in
            dk = tl.reshape(tl.sum(tl.reshape(dkv * vv, (BB, HD, HD, T)), axis=2), (BB * HD, T))
            dv = tl.reshape(tl.sum(tl.reshape(dkv * kk, (BB, HD, HD, T)), axis=1), (BB * HD, T))
            om = o_ok[:, None] & (t < L)[None, :]
            tl.store(dq_ptr + o_off[:, None] + t[None, :] * D, dq, mask=om)
            tl.store(dk_ptr + o_off[:, None] + t[None, :] * D, dk, mask=om)
            tl.store(dv_ptr + o_off[:, None] + t[None, :] * D, dv, mask=om)
        part = pid_b * H + h
        tl.store(g_toep_ptr + part * T * T + tt[:, None] * T + tt[None, :], g_toep)
        tl.store(g_wr_ptr + part * N * T + nn[:, None] * T + tt[None, :], g_wr)
        tl.store(g_wi_ptr + part * N * T + nn[:, None] * T + tt[None, :], g_wi)
        tl.store(g_vr_ptr + part * T * N + tt[:, None] * N + nn[None, :], g_vr)
        tl.store(g_vi_ptr + part * T * N + tt[:, None] * N + nn[None, :], g_vi)
        tl.store(g_pr_ptr + part * N + nn, g_pr)
        tl.store(g_pi_ptr + part * N + nn, g_pi)
        tl.store(g_dskip_ptr + part, tl.sum(tl.sum(g_dsk, axis=1), axis=0))


def _block_batch(head_dim: int) -> int:
    """Batch rows per program so that a tile has >= 16 rows (tl.dot's minimum)."""
    return max(1, 16 // (head_dim * head_dim))


_ONE_STAGE: set[tuple] = set()  # (kernel, constexprs, device) that need num_stages=1


def num_warps(backward: bool, head_dim: int) -> int:
    """Warps per program. The chunk matrices, and in the backward their gradient accumulators, live in
    registers: ptxas (sm_90, bf16 inputs) reports at 4 warps 0 / 176 B of spills per thread for the
    head_dim 1 / 8 forward and 904 B / 6.1 KB for the backward; at 8 warps 0 / 0 and 180 B / 2.7 KB."""
    return 8 if backward or head_dim > 1 else 4


def _launch(kernel, grid, *args, **consts) -> None:
    """Launch; where Triton's default software pipelining (3 stages) needs more shared memory than
    the GPU has, launch without it. Compiled for sm_90 (ptxas, tests/kernels/test_flashconv_compile.py): the
    fp32 head_dim-8 backward needed 248 KB at 3 stages and 4 warps (an H100 block has 227 KB), 104 KB at 1."""
    key = (kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), tuple(sorted(consts.items())),
           str(args[0].device))
    if key not in _ONE_STAGE:
        try:
            kernel[grid](*args, **consts)
            return
        except OutOfResources:
            _ONE_STAGE.add(key)
    kernel[grid](*args, **consts, num_stages=1)


@torch.library.custom_op("flashconv::ssm_scan", mutates_args=())
def ssm_scan_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, toep: torch.Tensor, wr: torch.Tensor,
                    wi: torch.Tensor, vr: torch.Tensor, vi: torch.Tensor, pr: torch.Tensor, pi: torch.Tensor,
                    dskip: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused scan as a custom op (opaque to torch.compile, differentiable): (out (B, L, D) fp32,
    the chunk-entering states the backward reads)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, L, D = q.shape
    H, T, N = toep.shape[0], toep.shape[1], wr.shape[1]
    BB = _block_batch(head_dim)
    n_chunks = triton.cdiv(L, T)
    mats = [m.contiguous().float() for m in (toep, wr, wi, vr, vi, pr, pi, dskip)]
    out = torch.empty(B, L, D, device=q.device, dtype=torch.float32)
    states = torch.empty(B, H, head_dim * head_dim, n_chunks, 2, N, device=q.device, dtype=torch.float32)
    grid = (H, triton.cdiv(B, BB))
    _launch(_ssm_fwd, grid, q, k, v, out, states, *mats, B, L, D, H, n_chunks, HD=head_dim, BB=BB, T=T, N=N,
            IEEE=_ieee(q), num_warps=num_warps(False, head_dim))
    return out, states


@ssm_scan_kernel.register_fake
def _(q, k, v, toep, wr, wi, vr, vi, pr, pi, dskip, head_dim):
    B, L, D = q.shape
    H, T, N = toep.shape[0], toep.shape[1], wr.shape[1]
    n_chunks = (L + T - 1) // T
    return (q.new_empty((B, L, D), dtype=torch.float32),
            q.new_empty((B, H, head_dim * head_dim, n_chunks, 2, N), dtype=torch.float32))


def _ieee(q: torch.Tensor) -> bool:
    """fp32 inputs get IEEE dots; bf16/fp16 inputs tf32 (the interpreter has no tf32)."""
    return q.dtype == torch.float32 or INTERPRETED


@torch.library.custom_op("flashconv::ssm_scan_backward", mutates_args=())
def ssm_scan_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, states: torch.Tensor,
                      toep: torch.Tensor, wr: torch.Tensor, wi: torch.Tensor, vr: torch.Tensor, vi: torch.Tensor,
                      pr: torch.Tensor, pi: torch.Tensor, dskip: torch.Tensor, head_dim: int) -> list[torch.Tensor]:
    """[dq, dk, dv (dtypes of q, k, v), then the gradients of the eight chunk matrices (fp32)]."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    mats = [m.contiguous().float() for m in (toep, wr, wi, vr, vi, pr, pi, dskip)]
    B, L, D = q.shape
    H, T, N = toep.shape[0], toep.shape[1], wr.shape[1]
    BB = _block_batch(head_dim)
    programs = triton.cdiv(B, BB)
    n_chunks = states.shape[3]
    dq, dk, dv = (torch.empty(B, L, D, device=q.device, dtype=torch.float32) for _ in range(3))
    parts = [torch.empty(programs, *m.shape, device=q.device, dtype=torch.float32) for m in mats]
    _launch(_ssm_bwd, (H, programs), q, k, v, dout.contiguous(), states.contiguous(), dq, dk, dv, *mats, *parts,
            B, L, D, H, n_chunks, HD=head_dim, BB=BB, T=T, N=N, IEEE=_ieee(q), num_warps=num_warps(True, head_dim))
    return [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *(p.sum(0) for p in parts)]


@ssm_scan_backward.register_fake
def _(dout, q, k, v, states, toep, wr, wi, vr, vi, pr, pi, dskip, head_dim):
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            *(m.new_empty(m.shape, dtype=torch.float32) for m in (toep, wr, wi, vr, vi, pr, pi, dskip))]


def _save_for_scan_backward(ctx, inputs, output) -> None:
    *tensors, head_dim = inputs
    ctx.save_for_backward(*tensors, output[1])
    ctx.head_dim = head_dim
    ctx.mark_non_differentiable(output[1])


def _scan_grads(ctx, dout, _dstates):
    q, k, v, *mats, states = ctx.saved_tensors
    return (*ssm_scan_backward(dout, q, k, v, states, *mats, ctx.head_dim), None)


ssm_scan_kernel.register_autograd(_scan_grads, setup_context=_save_for_scan_backward)


def supported(head_dim: int, modes: int) -> bool:
    """Tiles are powers of two with >= 16 rows and columns (tl.arange, tl.dot)."""
    pow2 = lambda x: x > 0 and x & (x - 1) == 0  # noqa: E731
    return pow2(head_dim) and pow2(modes) and modes >= 16


def h3_ssm_scan(q: torch.Tensor, k_shifted: torch.Tensor, v: torch.Tensor, discrete: Discrete,
                ssm_skip: torch.Tensor, head_dim: int, chunk: int = 64) -> torch.Tensor:
    """q, k' (after the shift SSM), v: (B, L, D) -> (B, L, D) fp32 (see the module docstring)."""
    if not supported(head_dim, discrete[0].shape[1]):
        raise ValueError(f"the fused scan needs head_dim and d_state/2 powers of two, d_state/2 >= 16; got "
                         f"head_dim {head_dim}, d_state/2 {discrete[0].shape[1]}")
    mats = chunk_matrices(discrete, chunk)
    return ssm_scan_kernel(q, k_shifted, v, *mats, ssm_skip.float(), head_dim)[0]


def h3_ssm_reference(q, k_shifted, v, discrete: Discrete, ssm_skip: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The same through torch.fft (flashconv.reference)."""
    from .reference import causal_conv, gate, outer_kv

    kv = outer_kv(k_shifted.transpose(1, 2), v.transpose(1, 2), head_dim)
    y = causal_conv(kv, ssm_kernel(discrete, q.shape[1])[:, None, None, :], ssm_skip.float()[:, None, None, None])
    return gate(q, y)


__all__ = ["chunk_matrices", "ssm_scan_kernel", "h3_ssm_scan", "h3_ssm_reference", "kernels_available", "supported"]
