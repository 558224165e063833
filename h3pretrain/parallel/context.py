"""Context parallelism: every sequence is split into 2*cp equal chunks and rank r of the
context-parallel group (megatron-core's CP group) holds chunks r and 2cp-1-r, in that order (the
zigzag layout): causal attention then costs every rank the same, and each rank runs every layer on
its two chunks only.

- H3 layers exchange SSM states, not activations: the shift SSM's FIR needs the last N-1 inputs
  k before each chunk (a small all-gather of every chunk's tail), and the diagonal SSM runs on each
  chunk from a zero state, all-gathers the final states, combines them in sequence order and adds
  what each chunk's true entering state contributes (flashconv.state_passing). No rank waits for
  another's compute and any number of heads works.
- Attention layers pass K/V blocks around the ring (parallel.ring_attention): no rank holds more
  than two blocks of keys, and no mask is built.
- Tokens, rotary positions and targets follow the layout (`piece`, `positions`, `split_tokens`);
  the loss of each piece is the mean over its tokens, so their mean over the ranks is that of the
  whole sequence.
The gathers are autograd functions (their backward sums every rank's gradient into the owner),
so the loss on each piece backpropagates exactly; DeepSpeed then averages gradients over DP x CP.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from flashconv.state_passing import Discrete, combine_states, h3_conv_piece

from .ring_attention import ring_attention


def split_tokens(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch as the model takes it -> (inputs, targets): (B, L+1) tokens of whole sequences,
    or (B, chunks, c+1) pieces (`ContextParallel.piece`), each chunk with the token after it."""
    if tokens.dim() == 3:
        return tokens[..., :-1].flatten(1), tokens[..., 1:].flatten(1)
    return tokens[:, :-1], tokens[:, 1:]


def sequence_length(tokens: torch.Tensor, cp: int) -> int:
    """The whole sequence's length, from a micro-batch of pieces (or of whole sequences)."""
    return tokens.shape[1] * (tokens.shape[2] - 1) * cp if tokens.dim() == 3 else tokens.shape[1] - 1


class ContextParallel:
    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.chunks = (self.rank, 2 * self.size - 1 - self.rank)  # in sequence order

    def chunk_slot(self, chunk: int) -> tuple[int, int]:
        """(rank, 0 or 1) that holds `chunk` of the sequence."""
        return (chunk, 0) if chunk < self.size else (2 * self.size - 1 - chunk, 1)

    def positions(self, local_length: int, device) -> torch.Tensor:
        """The sequence positions of this rank's tokens."""
        c = local_length // 2
        return torch.cat([torch.arange(j * c, (j + 1) * c, device=device) for j in self.chunks])

    def piece(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L+1) tokens -> this rank's (B, 2, L/(2cp) + 1): its two chunks, each with the token after
        it (the last target)."""
        L = tokens.shape[1] - 1
        if L % (2 * self.size):
            raise ValueError(f"sequence length {L} is not divisible by 2 x parallel.cp = {2 * self.size}")
        c = L // (2 * self.size)
        return torch.stack([tokens[:, j * c:(j + 1) * c + 1] for j in self.chunks], dim=1)

    def _gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's x (equal shapes) concatenated on `dim` in rank order, differentiable:
        megatron-core's sequence-parallel gather (backward: reduce-scatter) over the CP group.
        torch.distributed.nn's all_gather cannot be used: its gloo backward scatters from group
        ranks as if they were global ones."""
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        return gather_from_sequence_parallel_region(x.movedim(dim, 0).contiguous(), True, self.group).movedim(0, dim)

    def _in_sequence_order(self, gathered: torch.Tensor) -> list[torch.Tensor]:
        """(cp, 2, ...) every rank's two chunks' values -> the 2cp chunks' values in sequence order."""
        return [gathered[rank, slot] for rank, slot in map(self.chunk_slot, range(2 * self.size))]

    # Run eagerly inside compiled blocks (a graph break on each side): traced by dynamo, the
    # collectives below deadlocked two gloo ranks on CPU.
    @torch.compiler.disable
    def h3_conv(self, q, k, v, shift_taps: torch.Tensor, shift_skip: torch.Tensor, discrete: Discrete,
                ssm_skip: torch.Tensor, head_dim: int) -> torch.Tensor:
        B, T, C = q.shape
        c = T // 2
        # the two chunks side by side in the batch: (2, B, c, C) -> (2B, c, C)
        q2, k2, v2 = (x.view(B, 2, c, C).transpose(0, 1).reshape(2 * B, c, C) for x in (q, k, v))
        reach = shift_taps.shape[-1] - 1  # the FIR sees that many inputs back
        tail = min(c, reach)
        tails = self._in_sequence_order(self._gather(k2[:, c - tail:].view(1, 2, B, tail, C), dim=0))
        history = []
        back = -(-reach // tail) if reach else 0  # chunks before one that the FIR reaches into
        for j in self.chunks:  # the inputs before chunk j that the FIR reaches, zeros before the start
            before = tails[0][:, :0]
            if reach:
                before = torch.cat(tails[max(0, j - back):j] + [before], dim=1)[:, -reach:]
            history.append(torch.nn.functional.pad(before, (0, 0, reach - before.shape[1], 0)))
        history = torch.cat(history)  # (2B, reach, C): every rank uses the gathered tails (chunk 2cp-1-r has some)
        dA = discrete[0]

        def entering_state(local: torch.Tensor) -> torch.Tensor:
            real = torch.view_as_real(local)  # (2B, H, d1, d2, n, 2)
            every = self._gather(real.view(1, 2, B, *real.shape[1:]), dim=0)
            states = [torch.view_as_complex(x.contiguous()) for x in self._in_sequence_order(every)]
            entering = combine_states(states, [c] * len(states), dA)
            mine = [states[0] * 0 if entering[j] is None else entering[j] for j in self.chunks]
            return torch.cat(mine)

        y = h3_conv_piece(q2, k2, v2, shift_taps, shift_skip, discrete, ssm_skip, head_dim, history, entering_state)
        return y.view(2, B, c, C).transpose(0, 1).reshape(B, T, C)

    @torch.compiler.disable
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        """q, k, v: (B, T, heads, head_dim) of this piece -> (B, T, heads, head_dim)."""
        y = ring_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.group, dropout)
        return y.transpose(1, 2)
