"""Pipeline parallelism: the layers are cut into pp x virtual_pp chunks balanced by training FLOPs
(H3 and attention layers cost differently; the tied head sits on the last chunk), and megatron-core's
schedules (1F1B, or interleaved 1F1B with virtual_pp > 1) run the micro-batches.

Chunk c holds the c-th contiguous run of layers and lives on stage c % pp as its model chunk
c // pp (megatron's interleaved assignment). The first chunk embeds tokens, the last one applies
ln_f, the tied head and the loss; the last stage keeps its own copy of the word embedding, whose
gradient is summed with the first stage's over megatron's embedding group after every backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..model import HybridLM
from ..model.flops import head_train_flops, layer_train_flops
from .context import sequence_length, split_tokens


@dataclass(frozen=True)
class Chunk:
    index: int  # position in the whole model, 0 .. pp * virtual_pp - 1
    stage: int
    virtual: int
    layers: tuple[int, ...]
    cost: float  # training FLOPs per token


def partition(cfg: ModelConfig, pp: int, virtual_pp: int = 1, seq_len: int = 2048) -> list[Chunk]:
    """Contiguous chunks minimising the most expensive one (exact, by dynamic programming)."""
    n_chunks = pp * virtual_pp
    kinds = cfg.layer_kinds()
    if cfg.n_layer < n_chunks:
        raise ValueError(f"{cfg.n_layer} layers cannot fill {pp} stages x {virtual_pp} virtual chunks")
    cost = [layer_train_flops(cfg, kind, seq_len) for kind in kinds]
    head = head_train_flops(cfg)
    prefix = [0.0]
    for c in cost:
        prefix.append(prefix[-1] + c)

    def span(i: int, j: int) -> float:  # layers i..j-1, plus the head if they end the model
        return prefix[j] - prefix[i] + (head if j == cfg.n_layer else 0.0)

    n = cfg.n_layer
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_chunks + 1)]  # best[k][j]: first j layers in k chunks
    cut = [[0] * (n + 1) for _ in range(n_chunks + 1)]
    best[0][0] = 0.0
    for k in range(1, n_chunks + 1):
        for j in range(k, n - (n_chunks - k) + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], span(i, j))
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    bounds, j = [], n
    for k in range(n_chunks, 0, -1):
        bounds.append((cut[k][j], j))
        j = cut[k][j]
    bounds.reverse()
    return [Chunk(index=c, stage=c % pp, virtual=c // pp, layers=tuple(range(i, j)), cost=span(i, j))
            for c, (i, j) in enumerate(bounds)]


def describe(cfg: ModelConfig, chunks: list[Chunk]) -> str:
    kinds = cfg.layer_kinds()
    total = sum(c.cost for c in chunks)
    lines = []
    for c in sorted(chunks, key=lambda c: (c.stage, c.virtual)):
        parts = (["embedding"] if c.index == 0 else []) + \
            [(f"layers {c.layers[0]}-{c.layers[-1]} " if len(c.layers) > 1 else f"layer {c.layers[0]} ") + "".join("A" if kinds[i] == "attention" else "H" for i in c.layers)] + \
            (["ln_f + tied head"] if c.index == len(chunks) - 1 else [])
        lines.append(f"  stage {c.stage} chunk {c.virtual}: {', '.join(parts)} | {c.cost / 1e6:,.1f} MFLOP/token "
                     f"({100 * c.cost / total:.1f}%)")
    return "\n".join(lines)


class StageModule(nn.Module):
    """One model chunk as megatron's schedules want it: `config` (a TransformerConfig) and
    `set_input_tensor`. Activations travel between stages as (L, B, D), megatron's layout."""

    def __init__(self, model: HybridLM, schedule_config, last: bool, seq_first: bool = False):
        from megatron.core.enums import ModelType

        super().__init__()
        self.model = model
        self.config = schedule_config
        self.model_type = ModelType.encoder_or_decoder
        self.last = last
        self.seq_first = seq_first  # sequence parallel: the residual stream is (L/tp, B, D) already
        self.input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, tensor) -> None:
        self.input_tensor = tensor[0] if isinstance(tensor, (list, tuple)) else tensor

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        inputs, targets = split_tokens(tokens)
        if self.model.pre_process:
            out = self.model(inputs)
        else:
            hidden = self.input_tensor if self.seq_first else self.input_tensor.transpose(0, 1)
            out = self.model(None, hidden=hidden)
        if self.last:
            return self.model.loss(out, targets)
        return out if self.seq_first else out.transpose(0, 1).contiguous()


def schedule_config(cfg: ModelConfig, tp: int, pp: int, virtual_pp: int, sequence_parallel: bool = False,
                    finalize_grads=None):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=cfg.n_layer, hidden_size=cfg.d_model, num_attention_heads=cfg.attn_num_heads,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual_pp if virtual_pp > 1 else None,
        pipeline_dtype=torch.float32, params_dtype=torch.float32, use_cpu_initialization=True,
        sequence_parallel=sequence_parallel,
        # gloo pairs batched sends to the same peer out of order (pp = 2 interleaved: next == prev
        # stage), which swapped activations between micro-batches: plain send/recv there.
        batch_p2p_comm=torch.cuda.is_available(), batch_p2p_sync=torch.cuda.is_available(),
        deallocate_pipeline_outputs=False, finalize_model_grads_func=finalize_grads)


def _loss_func(loss: torch.Tensor):
    # The schedule divides `loss` in place by the micro-batches and multiplies it by the CP size
    # (megatron's own losses are sums over the piece / tokens of the whole sequence); ours is the
    # piece's mean and DeepSpeed averages over DP x CP, so the CP factor is taken back here.
    from megatron.core import parallel_state as ps

    return loss / ps.get_context_parallel_world_size(), {"loss": loss.detach().clone()}


def _forward_step(data_iterator, model: StageModule):
    tokens = next(data_iterator)
    return model(tokens), _loss_func


def run_schedule(chunks: list[StageModule], microbatches: list[torch.Tensor], forward_only: bool = False) -> torch.Tensor | float:
    """Forward (and backward) of all micro-batches through the pipeline. Returns the mean loss on the
    last stage, on the device (0.0 elsewhere); gradients accumulate into the parameters' .grad."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron.core import parallel_state as ps

    # megatron wants the whole sequence's length and divides it by CP (and TP with sequence parallel)
    mb, length = microbatches[0].shape[0], sequence_length(microbatches[0], ps.get_context_parallel_world_size())
    iterators = [iter(microbatches) for _ in chunks]
    out = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks, num_microbatches=len(microbatches), seq_length=length, micro_batch_size=mb,
        forward_only=forward_only)
    if not out:
        return 0.0
    return torch.stack([o["loss"].detach().float() for o in out]).mean()


def tie_embedding_grads(chunks: list[StageModule]) -> None:
    """Sums the word-embedding gradient of the first and last stage (megatron's embedding group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return
    for chunk in chunks:
        model = chunk.model
        if hasattr(model.backbone, "embeddings") and (model.pre_process or model.post_process):
            weight = model.backbone.embeddings.word_embeddings.weight
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            dist.all_reduce(weight.grad, group=ps.get_embedding_group())
