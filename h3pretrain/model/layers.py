"""Factories for the layers that tensor parallelism shards.

The model builds every Linear and the word embedding through a `LayerFactory`, naming the
Megatron-style role of each: `column` (output dim sharded), `row` (input dim sharded, output
all-reduced) or `embedding` (vocab sharded). The single-device factory returns plain torch modules.
A tensor-parallel factory returns megatron-core's parallel layers behind the same call signature
(input -> output tensor), and reports `tp_size` so that per-channel parameters (the SSMs) are built
for this rank's heads only. The model's math never branches on parallelism, except where a
context-parallel `context` (h3pretrain.parallel.context) holds only a piece of each sequence: the
mixers then hand their sequence-mixing step to it.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class LayerFactory:
    tp_size: int = 1
    tp_rank: int = 0
    sequence_parallel: bool = False
    context = None  # a ContextParallel when each rank holds a piece of every sequence

    def linear(self, in_features: int, out_features: int, *, role: str, bias: bool = True,
               init_std: float = 0.02, fused: int = 1) -> nn.Module:
        """role: 'column' or 'row' (Megatron); plain nn.Linear here. Weight N(0, init_std), bias 0.
        fused: the output is that many equal blocks (Wqkv: 3), each sharded separately under TP."""
        if role not in ("column", "row"):
            raise ValueError(f"unknown linear role {role!r}")
        layer = nn.Linear(in_features, out_features, bias=bias)
        nn.init.normal_(layer.weight, std=init_std)
        if bias:
            nn.init.zeros_(layer.bias)
        return layer

    def embedding(self, num_embeddings: int, dim: int, *, init_std: float = 0.02) -> nn.Module:
        emb = nn.Embedding(num_embeddings, dim)
        nn.init.normal_(emb.weight, std=init_std)
        return emb

    def lm_logits(self, hidden: torch.Tensor, embedding: nn.Module) -> torch.Tensor:
        """Tied LM head on the residual stream: hidden @ embedding.weight^T (vocab-parallel under TP)."""
        return nn.functional.linear(hidden, embedding.weight)

    def to_residual(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding output (B, L, D) -> the residual stream's layout (the same here; under sequence
        parallelism: sequence-first and split over the TP ranks)."""
        return x

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy in fp32 (vocab-parallel under TP)."""
        return nn.functional.cross_entropy(logits.float().flatten(0, -2), targets.flatten())

    def shard_channels(self, param: nn.Parameter, dim: int = 0) -> nn.Parameter:
        """Marks a per-channel/per-head parameter as split over tensor-parallel ranks on `dim`."""
        return param

    def local(self, n: int, what: str) -> int:
        """This rank's share of `n` heads/channels; whole heads per rank."""
        if n % self.tp_size:
            raise ValueError(f"{what} = {n} is not divisible by tensor-parallel size {self.tp_size}")
        return n // self.tp_size


def residual_init_std(base_std: float, n_layer: int) -> float:
    """GPT-2 rescaling of the layers that write into the residual stream (out_proj, fc2)."""
    return base_std / math.sqrt(2 * n_layer)
