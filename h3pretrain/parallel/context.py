"""Context parallelism: every sequence is split into `cp` contiguous pieces, one per rank of the
context-parallel group (megatron-core's CP group); each rank runs every layer on its piece only.

- H3 layers exchange SSM states, not activations: the shift SSM's FIR needs the last N-1 inputs
  k before the piece (a small all-gather of every rank's tail), and the diagonal SSM runs on the
  piece from a zero state, all-gathers the final states and adds what the true entering state
  contributes (flashconv.state_passing.h3_conv_piece / combine_states). No rank waits for another's
  compute and any number of heads works.
- Attention layers all-gather K and V; queries stay local with the causal mask aligned to the
  bottom right (query t of rank r sees keys 0 .. r*T + t).
The all-gathers are autograd functions (their backward sums every rank's gradient into the owner),
so the loss on each piece backpropagates exactly; DeepSpeed then averages gradients over DP x CP.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from flashconv.state_passing import Discrete, combine_states, h3_conv_piece

try:  # optional: a CUDA-only source build
    from flash_attn import flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_func = None


class ContextParallel:
    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def offset(self, local_length: int) -> int:
        """Position of this rank's first token in the sequence (pieces are equal)."""
        return self.rank * local_length

    def piece(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L+1) tokens -> this rank's (B, L/cp + 1): its inputs and its targets (one overlap)."""
        L = tokens.shape[1] - 1
        if L % self.size:
            raise ValueError(f"sequence length {L} is not divisible by parallel.cp = {self.size}")
        T = L // self.size
        return tokens[:, self.rank * T:(self.rank + 1) * T + 1]

    def _gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's x (equal shapes) concatenated on `dim` in rank order, differentiable:
        megatron-core's sequence-parallel gather (backward: reduce-scatter) over the CP group.
        torch.distributed.nn's all_gather cannot be used: its gloo backward scatters from group
        ranks as if they were global ones."""
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        return gather_from_sequence_parallel_region(x.movedim(dim, 0).contiguous(), True, self.group).movedim(0, dim)

    # Run eagerly inside compiled blocks (a graph break on each side): traced by dynamo, the
    # collectives below deadlocked two gloo ranks on CPU.
    @torch.compiler.disable
    def h3_conv(self, q, k, v, shift_taps: torch.Tensor, shift_skip: torch.Tensor, discrete: Discrete,
                ssm_skip: torch.Tensor, head_dim: int) -> torch.Tensor:
        T = q.shape[1]
        reach = shift_taps.shape[-1] - 1  # the FIR sees that many inputs back
        tail = min(T, reach)
        # Every rank must use every all-gather's output: their backwards are collectives, run only
        # where the output is part of the graph. Rank 0 therefore takes an empty history and a zero
        # entering state, both cut from the gathered tensors.
        tails = self._gather(k[:, T - tail:], dim=1)  # (B, cp * tail, C)
        history = tails[:, :self.rank * tail][:, -reach:] if self.rank and reach else tails[:, :0]
        dA = discrete[0]

        def entering_state(local: torch.Tensor) -> torch.Tensor:
            states = list(torch.view_as_complex(self._gather(torch.view_as_real(local)[None], dim=0)))
            entering = combine_states(states, [T] * self.size, dA)[self.rank]
            return states[0] * 0 if entering is None else entering

        return h3_conv_piece(q, k, v, shift_taps, shift_skip, discrete, ssm_skip, head_dim, history,
                             entering_state)

    @torch.compiler.disable
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        """q, k, v: (B, T, heads, head_dim) of this piece -> (B, T, heads, head_dim)."""
        T = q.shape[1]
        visible = self.offset(T) + T  # keys after this piece are masked anyway
        keys, values = self._gather(torch.stack([k, v]), dim=2)[:, :, :visible].unbind(0)  # one collective
        if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            return flash_attn_func(q, keys, values, dropout_p=dropout, causal=True)  # bottom-right causal
        # bottom-right causal as a plain boolean mask (torch's CausalBias subclass does not pass
        # through selective recompute's dispatch mode)
        mask = torch.ones(T, visible, dtype=torch.bool, device=q.device).tril(visible - T)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                           attn_mask=mask, dropout_p=dropout)
        return y.transpose(1, 2)
