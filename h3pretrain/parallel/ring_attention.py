"""Causal attention over a sequence split across the context-parallel ranks in the zigzag layout
(rank r holds chunks r and 2cp-1-r of 2cp equal chunks, see parallel.context), without gathering
keys and values: each rank passes its (K, V) block around the ring, one neighbour at a time, and
merges the partial results by their log-sum-exp. A rank holds two K/V blocks at once (the one in
use and the one arriving), never a mask.

With Q = [Q_a; Q_b] (chunks r, 2cp-1-r) and the block of rank s = [K_a; K_b] (chunks s, 2cp-1-s):
- s = r: causal attention of the local piece on itself (its two chunks are in sequence order);
- s < r: all of Q against K_a only, unmasked (K_b lies after both query chunks);
- s > r: Q_b only against all of K, unmasked (Q_a lies before both key chunks).
So every rank does the same work at every ring step. The backward passes the block around again
with its gradient accumulators, which end at their owner; each block's gradients come from the
fused kernel's backward given the merged output and log-sum-exp (the softmax of the whole row).

Block kernels: PyTorch's fused flash-attention ops that return the log-sum-exp (CPU, and CUDA for
bf16/fp16 after a one-time check against the math below); otherwise, and for attention dropout
(which the CPU kernel lacks), an explicit fp32 softmax of the block with a dropout mask drawn from
a per-block seed, so the backward and a recomputation draw the same mask.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import _disable_current_modes

log = logging.getLogger("h3pretrain.parallel")

_CUDA_FUSED_OK: dict[str, bool] = {}
_KV, _DKV = 1, 2  # message tags


# ---- one block --------------------------------------------------------------------------------

def _dropout_keep(shape, p: float, seed: int, device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.rand(shape, generator=gen, device=device) >= p).float() / (1.0 - p)


def _scores(q, k, causal: bool) -> torch.Tensor:
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return s


def math_forward(q, k, v, causal: bool, p: float = 0.0, seed: int = 0):
    """(B, H, Tq, d) x (B, H, Tk, d) -> fp32 output and log-sum-exp (B, H, Tq); `causal` for Tq == Tk."""
    s = _scores(q, k, causal)
    lse = s.logsumexp(-1)
    probs = torch.exp(s - lse[..., None])
    if p:
        probs = probs * _dropout_keep(probs.shape, p, seed, q.device)
    return torch.matmul(probs, v.float()), lse


def math_backward(dout, q, k, v, out, lse, causal: bool, p: float = 0.0, seed: int = 0):
    """Gradients of one block, given the merged `out` and `lse` of its rows (fp32)."""
    s = _scores(q, k, causal)
    probs = torch.exp(s - lse[..., None])
    keep = _dropout_keep(probs.shape, p, seed, q.device) if p else None
    dropped = probs * keep if p else probs
    dout = dout.float()
    dv = torch.matmul(dropped.transpose(-1, -2), dout)
    dprobs = torch.matmul(dout, v.float().transpose(-1, -2))
    if p:
        dprobs = dprobs * keep
    ds = probs * (dprobs - (dout * out.float()).sum(-1, keepdim=True)) / math.sqrt(q.shape[-1])
    return torch.matmul(ds, k.float()), torch.matmul(ds.transpose(-1, -2), q.float()), dv


def _cuda_fused_backward(dout, q, k, v, out, lse, causal):
    none = torch.empty(0, device=q.device, dtype=torch.int64)  # no varlen offsets, no dropout RNG
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout.to(q.dtype).contiguous(), q, k, v, out.to(q.dtype).contiguous(), lse.contiguous(), none, none,
        q.shape[2], k.shape[2], 0.0, causal, none, none)


def _fused_usable(q: torch.Tensor, p: float) -> bool:
    if p:
        return False
    if q.device.type == "cpu":
        return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] > 256:
        return False
    key = f"{q.dtype}"
    if key not in _CUDA_FUSED_OK:  # the op's calling convention differs between releases: check it once
        try:
            t = [torch.randn(1, 2, 32, q.shape[-1], device=q.device, dtype=q.dtype) for _ in range(4)]
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(*t[:3], 0.0, True)[:2]
            ref_out, ref_lse = math_forward(*t[:3], True)
            grads = _cuda_fused_backward(t[3], *t[:3], ref_out, ref_lse, True)
            ref_grads = math_backward(t[3], *t[:3], ref_out, ref_lse, True)
            _CUDA_FUSED_OK[key] = bool(max((a.float() - b).abs().max() for a, b in
                                           zip((out, lse, *grads[:3]), (ref_out, ref_lse, *ref_grads))) < 5e-2)
        except Exception as err:  # noqa: BLE001 - any failure means: use the math blocks
            log.warning("ring attention: the fused CUDA block kernel failed its check (%s): math blocks", err)
            _CUDA_FUSED_OK[key] = False
    return _CUDA_FUSED_OK[key]


def block_forward(q, k, v, causal: bool, p: float, seed: int):
    """-> (output, log-sum-exp), both fp32."""
    if _fused_usable(q, p):
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)[:2]
        return out.float(), lse.float()
    return math_forward(q, k, v, causal, p, seed)


def block_backward(dout, q, k, v, out, lse, causal: bool, p: float, seed: int):
    """(dq, dk, dv) in fp32 of one block, given the merged output and lse of its rows."""
    if _fused_usable(q, p):
        if q.device.type == "cpu":
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout.to(q.dtype).contiguous(), q, k, v, out.to(q.dtype).contiguous(), lse.contiguous(), 0.0, causal)
        else:
            grads = _cuda_fused_backward(dout, q, k, v, out, lse, causal)
        return tuple(g.float() for g in grads[:3])
    return math_backward(dout, q, k, v, out, lse, causal, p, seed)


def merge(out, lse, block_out, block_lse):
    """Two partial softmax results of the same rows -> the result over both (fp32)."""
    new = torch.logaddexp(lse, block_lse)
    return out * torch.exp(lse - new)[..., None] + block_out * torch.exp(block_lse - new)[..., None], new


# ---- the ring ---------------------------------------------------------------------------------

class _Ring:
    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start(self, tensors: list[torch.Tensor], tag: int):
        """Send `tensors` to the next rank, receive the previous rank's; returns wait() -> received.
        Each kind of message has its own tag (gloo may pair same-tag messages out of order)."""
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.next, self.group, tag + i) for i, t in enumerate(tensors)]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group, tag + i) for i, r in enumerate(received)]
        requests = dist.batch_isend_irecv(ops)

        def wait() -> list[torch.Tensor]:
            for request in requests:
                request.wait()
            return received
        return wait

    def source(self, step: int) -> int:
        """The rank whose block this rank holds at ring step `step`."""
        return (self.rank - step) % self.size


def _block_of(ring: _Ring, src: int, T: int):
    """(query rows, key rows, causal) of this rank's queries against rank src's block."""
    half = T // 2
    if src == ring.rank:
        return slice(0, T), slice(0, T), True
    if src < ring.rank:
        return slice(0, T), slice(0, half), False
    return slice(half, T), slice(0, T), False


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, p, seed):
        with _disable_current_modes():  # selective recompute sees the ring as one step: run again whole
            ring = _Ring(group)
            T = q.shape[2]
            kv = torch.stack([k, v]).contiguous()
            out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
            for step in range(ring.size):
                wait = ring.start([kv], tag=_KV) if step < ring.size - 1 else None
                src = ring.source(step)
                rows, cols, causal = _block_of(ring, src, T)
                block_out, block_lse = block_forward(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], causal, p,
                                                        seed + src)
                out[:, :, rows], lse[:, :, rows] = merge(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
                if wait is not None:
                    kv = wait()[0]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.p, ctx.seed = group, p, seed
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        with _disable_current_modes():
            ring = _Ring(ctx.group)
            T = q.shape[2]
            kv = torch.stack([k, v]).contiguous()
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
            dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            for step in range(ring.size):
                wait_kv = ring.start([kv], tag=_KV) if step < ring.size - 1 else None
                src = ring.source(step)
                rows, cols, causal = _block_of(ring, src, T)
                gq, gk, gv = block_backward(dout[:, :, rows], q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                                            out[:, :, rows], lse[:, :, rows], causal, ctx.p, ctx.seed + src)
                dq[:, :, rows] += gq
                dkv[0][:, :, cols] += gk
                dkv[1][:, :, cols] += gv
                if wait_kv is not None:
                    kv = wait_kv()[0]
                # the accumulators travel with their block and end, after one more hop, at its owner
                dkv = ring.start([dkv], tag=_DKV)()[0]
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                   dropout: float = 0.0) -> torch.Tensor:
    """q, k, v: (B, heads, T, head_dim) of this rank's zigzag piece -> (B, heads, T, head_dim)."""
    k, v = k.to(q.dtype), v.to(q.dtype)
    seed = int(torch.randint(0, 2**31 - 1, (), device="cpu")) if dropout else 0
    return _RingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), group, dropout, seed)
