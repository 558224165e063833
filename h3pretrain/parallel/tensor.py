"""Tensor parallelism with megatron-core layers behind the model's LayerFactory.

q/k/v, fc1 and the fused Wqkv are column-parallel (each rank computes whole heads), output_linear,
out_proj and fc2 row-parallel (one all-reduce per mixer and per MLP), the word embedding and the tied
head vocab-parallel with megatron's vocab-parallel cross-entropy. The SSM parameters are split on
their channel/head axis (`shard_channels`), so each rank runs the H3 math on its own heads.

Sequence parallel (Korthikanti et al. 2022): the residual stream between the linears (LayerNorms,
dropout, residual adds) is sequence-first (L/t, B, D) and split over the TP ranks; column-parallel
linears all-gather it and hand the mixer batch-first (B, L, C_local), row-parallel linears
reduce-scatter back. The model's code sees batch-first tensors either way. LayerNorm weights and
row-parallel biases then see only their rank's tokens: their gradients are summed over the TP group
(`sum_sequence_parallel_grads`).

Every sharded parameter carries megatron's attributes (`tensor_model_parallel`, `partition_dim`);
ours add `tp_fused` (blocks sharded separately, Wqkv = 3). h3pretrain.checkpoint.canonical uses them to
gather full tensors and to cut any rank's shard out of a full tensor.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..model.layers import LayerFactory


def _normal(std: float):
    return lambda w: nn.init.normal_(w, std=std)


class MegatronLayerFactory(LayerFactory):
    def __init__(self, params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False):
        from megatron.core import parallel_state as ps
        from megatron.core.model_parallel_config import ModelParallelConfig

        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.sequence_parallel = sequence_parallel
        # CPU initialisation: deterministic and GPU-free; h3pretrain.checkpoint.canonical then loads
        # the layout-independent initial weights anyway.
        self.config = ModelParallelConfig(tensor_model_parallel_size=self.tp_size, use_cpu_initialization=True,
                                          params_dtype=params_dtype, perform_initialization=False,
                                          sequence_parallel=sequence_parallel)

    def linear(self, in_features: int, out_features: int, *, role: str, bias: bool = True,
               init_std: float = 0.02, fused: int = 1) -> nn.Module:
        column, row = _layer_classes()
        if role == "column":
            self.local(out_features // fused, "column-parallel output features")
            layer = column(in_features, out_features, config=self.config, init_method=_normal(init_std),
                           bias=bias, gather_output=False)
            self.shard_channels(layer.weight, dim=0)
            if bias:
                self.shard_channels(layer.bias, dim=0)
            for p in layer.parameters():
                p.tp_fused = fused
        elif role == "row":
            self.local(in_features, "row-parallel input features")
            layer = row(in_features, out_features, config=self.config, init_method=_normal(init_std),
                        bias=bias, input_is_parallel=True, skip_bias_add=False)
            self.shard_channels(layer.weight, dim=1)  # the bias is added after the all-reduce: replicated
        else:
            raise ValueError(f"unknown linear role {role!r}")
        return layer

    def embedding(self, num_embeddings: int, dim: int, *, init_std: float = 0.02) -> nn.Module:
        from megatron.core import tensor_parallel as tp

        if num_embeddings % self.tp_size:
            raise ValueError(f"padded vocabulary {num_embeddings} is not divisible by tensor-parallel size "
                             f"{self.tp_size}: raise model.pad_vocab_multiple")
        emb = tp.VocabParallelEmbedding(num_embeddings, dim, init_method=_normal(init_std), config=self.config)
        self.shard_channels(emb.weight, dim=0)
        return emb

    def lm_logits(self, hidden: torch.Tensor, embedding: nn.Module) -> torch.Tensor:
        from megatron.core import tensor_parallel as tp

        if self.sequence_parallel:  # all-gather forward, reduce-scatter backward
            hidden = tp.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True).transpose(0, 1)
        else:
            hidden = tp.copy_to_tensor_model_parallel_region(hidden)  # identity forward, all-reduce backward
        return nn.functional.linear(hidden, embedding.weight)  # this rank's vocabulary slice

    def to_residual(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel as tp

        if not self.sequence_parallel:
            return x
        if x.shape[1] % self.tp_size:
            raise ValueError(f"sequence length {x.shape[1]} is not divisible by tensor-parallel size {self.tp_size} "
                             "(needed for parallel.sequence_parallel)")
        return tp.scatter_to_sequence_parallel_region(x.transpose(0, 1).contiguous())

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel as tp

        return tp.vocab_parallel_cross_entropy(logits.float(), targets).mean()

    def shard_channels(self, param: nn.Parameter, dim: int = 0) -> nn.Parameter:
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        # megatron's layers skip these attributes when perform_initialization=False
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            if hasattr(param, attr):
                delattr(param, attr)
        set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)
        return param


@functools.cache
def _layer_classes():
    """megatron's Column/RowParallelLinear returning one tensor (they return (output, bias), the bias
    already added), batch-first under sequence parallelism. Made on first use: megatron imports slowly."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class Column(ColumnParallelLinear):
        def forward(self, x):
            out = super().forward(x)[0]
            return out.transpose(0, 1) if self.sequence_parallel else out  # (L, B, C) -> (B, L, C)

    class Row(RowParallelLinear):
        def forward(self, x):
            if self.sequence_parallel:  # reduce-scatter along the first dimension: sequence-first
                x = x.transpose(0, 1)
            return super().forward(x)[0]

    return Column, Row


def replicated_under_tp(name: str) -> bool:
    """LayerNorms and the biases of row-parallel layers (added after the all-reduce)."""
    leaf = name.rsplit(".", 2)
    return "norm" in name or "ln_f" in name or (leaf[-1] == "bias" and leaf[-2] in ("output_linear", "out_proj", "fc2"))


def sum_sequence_parallel_grads(model: nn.Module) -> None:
    """Under sequence parallelism, sums the gradients of the replicated parameters over the TP group
    as each is computed (before DeepSpeed accumulates and reduces it over data parallelism)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=group)
        return grad

    for name, p in model.named_parameters():
        if replicated_under_tp(name) and "word_embeddings" not in name:
            p.register_hook(hook)
