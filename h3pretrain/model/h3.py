"""The H3 mixer (docs/design.md section 1): q, k, v projections; shift SSM on k; per-head k (x) v;
diagonal SSM; gating by q; output projection.

Convolution mode calls `flashconv.h3_conv`; recurrent mode (generation) keeps O(D*N) state per
layer: the last N inputs of the shift SSM and the complex state of the diagonal SSM.
"""
from __future__ import annotations

import torch
from torch import nn

import flashconv
from flashconv.reference import causal_conv

from .cache import InferenceCache
from .layers import LayerFactory
from .ssm import DiagSSMKernel, ShiftSSMKernel


class H3(nn.Module):
    def __init__(self, d_model: int, *, d_state: int = 64, head_dim: int = 1, dt_min: float = 0.001,
                 dt_max: float = 0.1, layer_idx: int = 0, factory: LayerFactory | None = None,
                 init_std: float = 0.02):
        super().__init__()
        factory = factory or LayerFactory()
        if d_model % head_dim:
            raise ValueError(f"d_model {d_model} is not a multiple of head_dim {head_dim}")
        self.layer_idx = layer_idx
        self.context = factory.context
        self.head_dim = head_dim
        self.d_state = d_state
        self.num_heads = factory.local(d_model // head_dim, "H3 heads")  # this rank's heads
        self.channels = self.num_heads * head_dim
        self.q_proj = factory.linear(d_model, d_model, role="column", init_std=init_std)
        self.k_proj = factory.linear(d_model, d_model, role="column", init_std=init_std)
        self.v_proj = factory.linear(d_model, d_model, role="column", init_std=init_std)
        self.shift_kernel = ShiftSSMKernel(self.channels, d_state)
        self.ssm_k_D = nn.Parameter(torch.randn(self.channels))
        self.diag_kernel = DiagSSMKernel(self.num_heads, d_state, dt_min, dt_max)
        self.D = nn.Parameter(torch.randn(self.num_heads))
        # Not rescaled by depth, unlike out_proj/fc2 (as in the released models).
        self.output_linear = factory.linear(d_model, d_model, role="row", init_std=init_std)
        for name, p in [*self.shift_kernel.named_parameters(), *self.diag_kernel.named_parameters(),
                        ("D", self.D), ("ssm_k_D", self.ssm_k_D)]:
            factory.shard_channels(p, dim=1 if name == "C" else 0)  # C: (1, channels/heads, ...)

    def forward(self, x: torch.Tensor, cache: InferenceCache | None = None) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if cache is not None and cache.seqlen_offset > 0:
            state, positions = cache.layers[self.layer_idx], cache.positions(q.shape[1])
            y = torch.stack([self._step(q[:, t], k[:, t], v[:, t], positions[t], state)
                             for t in range(q.shape[1])], dim=1)
            y = y.to(q.dtype)
        else:
            real = cache.real(q.shape[1]) if cache is not None else None
            if real is not None:  # left padding: zero inputs there keep the states at zero
                k, v = k * real[..., None].to(k.dtype), v * real[..., None].to(v.dtype)
            # q, k, v are (B, L, C) whatever layout x has (sequence parallel)
            conv = self.context.h3_conv if self.context is not None else flashconv.h3_conv
            taps, discrete = self.shift_kernel.taps(), self.diag_kernel.discretize()
            y = conv(q, k, v, taps, self.ssm_k_D, discrete, self.D, self.head_dim)
            if cache is not None:
                self._write_prompt_state(k, v, taps, discrete, cache.layers[self.layer_idx])
        return self.output_linear(y)

    # ---- recurrent mode -------------------------------------------------------------------

    def allocate_state(self, batch_size: int, max_seqlen: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Zeroed recurrent state (see InferenceCache); its size does not depend on max_seqlen."""
        device = self.D.device
        return {"shift": torch.zeros(batch_size, self.channels, self.d_state, device=device),
                "taps": torch.zeros(self.channels, self.d_state, device=device),
                **self.diag_kernel.allocate_state(batch_size, (self.head_dim, self.head_dim))}

    def _kv(self, k_shifted: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per-head outer product; inputs (B, C, ...) -> (B, H, d1, d2, ...)."""
        B, hd, H = k_shifted.shape[0], self.head_dim, self.num_heads
        rest = k_shifted.shape[2:]
        return k_shifted.reshape(B, H, hd, 1, *rest) * v.reshape(B, H, 1, hd, *rest)

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def _write_prompt_state(self, k: torch.Tensor, v: torch.Tensor, taps: torch.Tensor, discrete,
                            state: dict[str, torch.Tensor]) -> None:
        """taps, discrete: the kernels the prompt's convolution used (the steps' constants)."""
        k = k.transpose(1, 2).float()  # (B, C, L)
        v = v.transpose(1, 2).float()
        N, L = self.d_state, k.shape[-1]
        window = k[..., -N:] if L >= N else nn.functional.pad(k, (N - L, 0))  # k_(L-N) .. k_(L-1)
        state["shift"].copy_(window.roll(L % N, dims=-1))  # k_t goes to slot t mod N
        state["taps"].copy_(taps)
        k_shifted = causal_conv(k, taps, self.ssm_k_D[:, None])
        self.diag_kernel.write_state(state, self._kv(k_shifted, v), discrete)

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def _step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor,
              state: dict[str, torch.Tensor]) -> torch.Tensor:
        """One token at `position` (0-dim tensor): q, k, v (B, C) -> (B, C) fp32; state in place."""
        q, k, v = q.float(), k.float(), v.float()
        k_shifted = flashconv.shift_step(state["shift"], state["taps"], self.ssm_k_D, k, position)
        kv = self._kv(k_shifted, v)  # (B, H, d1, d2)
        y = flashconv.ssm_step(state["ssm"], (state["dA"], state["dB"], state["C"]), kv, self.D)
        out = (q.view(*kv.shape[:3], 1) * y).sum(dim=2)  # (B, H, d2)
        return out.reshape(q.shape)
