"""Inference cache for recurrent generation, allocated in full before the prompt runs.

Every tensor has a fixed shape and every step updates it in place, so that a decode step can be
captured once as a CUDA graph and replayed (h3pretrain.generate.CUDAGraphDecoder):
- H3 layers: "shift" (B, C, N) ring buffer of the last N inputs of k (k_t in slot t mod N), "ssm"
  (B, H, hd, hd, N/2) complex state, and the step constants "taps" (C, N), "dA", "dB", "C" (H, N/2);
- S4D layers: "ssm" (B, D, N/2) complex and "dA", "dB", "C";
- attention layers: "k", "v" (B, max_seqlen, heads, head_dim).
`position` (a 0-dim long tensor on the model's device) is the index of the next token; the layers
read positions only from it. `start` ((B,) long, None without padding): each row's first real
token in a left-padded batch. The pads before it contribute nothing: H3 and S4D layers take zero
inputs there (their states stay zero), attention never reads their keys, and rotary positions
count from `start`. `seqlen_offset` is the same count on the host: 0 means the next call is
the prompt (convolution mode, which writes the exact states into the cache). `static_shapes`: the
decode steps keep fixed shapes, attention reading the whole cache under a mask (what a CUDA graph
needs); otherwise attention reads the `seqlen_offset` keys written so far.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class InferenceCache:
    batch_size: int
    max_seqlen: int
    position: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    seqlen_offset: int = 0
    static_shapes: bool = False
    layers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    start: torch.Tensor | None = None

    def set_padding(self, attention_mask: torch.Tensor | None) -> None:
        """attention_mask (B, L) of the prompt, 1 for real tokens: left padding only (0s, then 1s)."""
        if attention_mask is None or bool(attention_mask.all()):
            self.start = None
            return
        mask = attention_mask.to(torch.bool)
        if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
            raise ValueError("right padding (a 0 after a 1 in attention_mask) is not supported: pad prompts on the "
                             "left (tokenizer.padding_side = 'left')")
        if not bool(mask[:, -1].all()):
            raise ValueError("every row of attention_mask needs at least one real token")
        self.start = (~mask).sum(dim=1).to(self.position.device)

    def real(self, length: int) -> torch.Tensor | None:
        """(B, length) bool: which of the next `length` positions hold real tokens (None: all)."""
        if self.start is None:
            return None
        return self.positions(length)[None, :] >= self.start[:, None]

    def positions(self, length: int) -> torch.Tensor:
        """(length,) long: the positions of the next `length` tokens."""
        return self.position + torch.arange(length, device=self.position.device)

    def check_room(self, length: int) -> None:
        if self.seqlen_offset + length > self.max_seqlen:
            raise ValueError(f"sequence of {self.seqlen_offset + length} tokens exceeds the cache's "
                             f"max_seqlen {self.max_seqlen}")

    def advance(self, length: int) -> None:
        self.seqlen_offset += length
        self.position += length

    def reset(self) -> None:
        """Ready for a new prompt; the prompt overwrites every state it needs."""
        self.seqlen_offset = 0
        self.position.zero_()

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.layers.values() for t in s.values())
