"""Causal multi-head attention with a fused Wqkv, no positional encoding by default, optional
rotary embedding on the first `rotary_dim` dims of each head (GPT-NeoX layout, base 10000).

Uses flash-attn when it is importable and the inputs are fp16/bf16 on CUDA, else torch SDPA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import InferenceCache
from .layers import LayerFactory

try:  # optional: a CUDA-only source build
    from flash_attn import flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_func = None


class Rotary(nn.Module):
    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.base = base

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, L, heads, head_dim); rotates x[..., :dim] of token t by angle positions[t] * freq
        (positions (L,), or (B, L) for rows that count from different starts)."""
        # Computed on the fly (no buffer): cheap, and nothing to go stale on meta-device builds.
        inv_freq = 1.0 / self.base ** (torch.arange(0, self.dim, 2, device=x.device, dtype=torch.float32) / self.dim)
        freqs = positions.float()[..., None] * inv_freq  # (L, dim/2) or (B, L, dim/2)
        if freqs.dim() == 2:
            freqs = freqs[None]
        cos, sin = freqs.cos()[:, :, None, :], freqs.sin()[:, :, None, :]
        rot, rest = x[..., : self.dim].float(), x[..., self.dim:]
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        return torch.cat([rotated, rest], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, *, rotary_dim: int = 0, dropout: float = 0.0,
                 layer_idx: int = 0, factory: LayerFactory | None = None, init_std: float = 0.02,
                 out_init_std: float = 0.02):
        super().__init__()
        factory = factory or LayerFactory()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of num_heads {num_heads}")
        self.layer_idx = layer_idx
        self.context = factory.context
        self.head_dim = d_model // num_heads
        self.num_heads = factory.local(num_heads, "attention heads")
        self.dropout = dropout
        self.Wqkv = factory.linear(d_model, 3 * d_model, role="column", init_std=init_std, fused=3)
        self.out_proj = factory.linear(d_model, d_model, role="row", init_std=out_init_std)
        self.rotary = Rotary(rotary_dim) if rotary_dim else None

    def forward(self, x: torch.Tensor, cache: InferenceCache | None = None) -> torch.Tensor:
        qkv = self.Wqkv(x)  # (B, L, 3 * heads * head_dim), whatever layout x has (sequence parallel)
        B, L = qkv.shape[:2]
        # Column layout (three, heads, head_dim): the fused layout of the released checkpoints.
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).unbind(dim=2)
        positions = cache.positions(L) if cache is not None else None
        if self.rotary is not None:
            if positions is None:
                positions = self.context.positions(L, x.device) if self.context else torch.arange(L, device=x.device)
            own = positions if cache is None or cache.start is None else \
                (positions[None, :] - cache.start[:, None]).clamp_min(0)  # each row counts from its first token
            q, k = self.rotary(q, own), self.rotary(k, own)
        dropout = self.dropout if self.training else 0.0
        if self.context is not None:
            y = self.context.attention(q, k, v, dropout)
        elif cache is None:
            y = self._attend(q, k, v, dropout)
        else:
            y = self._attend_cached(q, k, v, cache, positions)
        return self.out_proj(y.reshape(B, L, -1))

    def _attend(self, q, k, v, dropout: float) -> torch.Tensor:
        if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            return flash_attn_func(q, k, v, dropout_p=dropout, causal=True)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           dropout_p=dropout, is_causal=True)
        return y.transpose(1, 2)

    def allocate_state(self, batch_size: int, max_seqlen: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        shape = (batch_size, max_seqlen, self.num_heads, self.head_dim)
        device = self.out_proj.weight.device
        return {"k": torch.zeros(shape, device=device, dtype=dtype), "v": torch.zeros(shape, device=device, dtype=dtype)}

    def _attend_cached(self, q, k, v, cache: InferenceCache, positions: torch.Tensor) -> torch.Tensor:
        state = cache.layers[self.layer_idx]
        L = q.shape[1]
        state["k"].index_copy_(1, positions, k)
        state["v"].index_copy_(1, positions, v)
        if cache.seqlen_offset == 0 and cache.start is None:  # the prompt attends only to itself
            return self._attend(q, k, v, 0.0)
        if cache.static_shapes:
            # the whole cache, masked past each query's position: the shapes never change, so a step
            # can be replayed as a CUDA graph (reading max_seqlen - position keys more than needed)
            keys, values = state["k"], state["v"]
            mask = torch.arange(cache.max_seqlen, device=q.device)[None, :] <= positions[:, None]
        else:
            end = cache.seqlen_offset + L
            keys, values = state["k"][:, :end], state["v"][:, :end]
            # query t sees keys up to seqlen_offset + t; one new token sees them all
            mask = None if L == 1 else torch.ones(L, end, dtype=torch.bool, device=q.device).tril(cache.seqlen_offset)
        if cache.start is not None:  # no row reads its pads' keys (a pad query reads itself: no empty row)
            key_index = torch.arange(keys.shape[1], device=q.device)
            real = key_index[None, :] >= cache.start[:, None]  # (B, keys)
            own = key_index[None, :] == positions[:, None]  # (L, keys)
            causal = mask if mask is not None else torch.ones(L, keys.shape[1], dtype=torch.bool, device=q.device)
            mask = (causal[None] & real[:, None, :]) | own[None]
            mask = mask[:, None]  # (B, 1, L, keys): the same for every head
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                           attn_mask=mask)
        return y.transpose(1, 2)
