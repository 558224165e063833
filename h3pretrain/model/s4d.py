"""The S4D baseline of the paper's synthetic tasks: a diagonal SSM alone, without the shift SSM
and the multiplicative gating of H3. Per channel: y = K * u + D ⊙ u, then GELU and an output Linear
(the standard S4 block), with the reference's S4D kernel (S4D-Inv, zero-order hold: `S4DKernel`).
Parameter names follow H3's (`diag_kernel`, `D`, `output_linear`).

Recurrent mode keeps the (B, D, N/2) complex state of the diagonal SSM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import flashconv
from flashconv.reference import causal_conv

from .cache import InferenceCache
from .layers import LayerFactory
from .ssm import S4DKernel


class S4D(nn.Module):
    def __init__(self, d_model: int, *, d_state: int = 64, dt_min: float = 0.001, dt_max: float = 0.1,
                 layer_idx: int = 0, factory: LayerFactory | None = None, init_std: float = 0.02):
        super().__init__()
        factory = factory or LayerFactory()
        if factory.tp_size > 1:  # no input projection, so nothing would hand it a channel shard
            raise ValueError("the S4D baseline mixer does not support tensor parallelism")
        if factory.context is not None:
            raise ValueError("the S4D baseline mixer does not support context parallelism")
        self.layer_idx = layer_idx
        self.diag_kernel = S4DKernel(d_model, d_state, dt_min, dt_max)  # one SSM per channel, A shared
        self.D = nn.Parameter(torch.randn(d_model))
        self.output_linear = factory.linear(d_model, d_model, role="row", init_std=init_std)

    def forward(self, x: torch.Tensor, cache: InferenceCache | None = None) -> torch.Tensor:
        if cache is not None and cache.seqlen_offset > 0:
            state = cache.layers[self.layer_idx]
            y = torch.stack([self._step(x[:, t], state) for t in range(x.shape[1])], dim=1)
        else:
            real = cache.real(x.shape[1]) if cache is not None else None
            if real is not None:  # left padding: zero inputs there keep the state at zero
                x = x * real[..., None].to(x.dtype)
            y = self._conv(x)
            if cache is not None:
                self._write_prompt_state(x, cache.layers[self.layer_idx])
        return self.output_linear(F.gelu(y).to(x.dtype))

    def allocate_state(self, batch_size: int, max_seqlen: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return self.diag_kernel.allocate_state(batch_size)

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        u = x.transpose(1, 2)  # (B, D, L); causal_conv runs in fp32
        return causal_conv(u, self.diag_kernel.kernel(u.shape[-1]), self.D[:, None]).transpose(1, 2)

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def _write_prompt_state(self, x: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        self.diag_kernel.write_state(state, x.transpose(1, 2).float(), self.diag_kernel.discretize())

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def _step(self, u: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """One token: u (B, D) -> (B, D) fp32; state in place."""
        u = u.float()
        return flashconv.ssm_step(state["ssm"], (state["dA"], state["dB"], state["C"]), u, self.D)
