"""The FLOP model: training FLOPs per token of a model shape (MFU, and the pipeline partitioner's
cost per layer)."""
from __future__ import annotations

import math

from ..config import ModelConfig


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3x forward), no recomputation.

    - every matmul weight (q/k/v/output_linear, Wqkv/out_proj, fc1/fc2, tied LM head):
      2 FLOPs per weight per token forward;
    - attention scores and weighted sum: 2 * 2 * L * d_model per token forward (full L x L,
      the PaLM convention, not discounted for causality);
    - H3 long convolutions, FFT size n = 2L: a real FFT of the input and an inverse FFT,
      2 * 2.5 n log2 n, plus 6 n for the complex product, per channel and sequence, i.e.
      (5 n log2 n + 6 n) / L per channel and token; the shift SSM convolves d_model channels and
      the diagonal SSM H * head_dim^2 = d_model * head_dim channels. Kernel generation and
      elementwise products are ignored (O(d_model) per token).
    """
    return sum(layer_train_flops(cfg, kind, seq_len) for kind in cfg.layer_kinds()) + head_train_flops(cfg)


def layer_train_flops(cfg: ModelConfig, kind: str, seq_len: int) -> float:
    """One layer's share of `train_flops_per_token` (also the pipeline partitioner's cost)."""
    D, L = cfg.d_model, seq_len
    fwd = 2 * (4 * D * D + 2 * D * cfg.mlp_ratio * D)
    if kind == "attention":
        fwd += 4 * L * D
    else:
        n = 2 * L
        fwd += (5 * n * math.log2(n) + 6 * n) / L * (D + D * cfg.ssm_head_dim)
    return 3 * fwd


def head_train_flops(cfg: ModelConfig) -> float:
    """The tied LM head's matmul."""
    return 3 * 2 * cfg.padded_vocab_size * cfg.d_model
