"""Process groups: megatron-core `parallel_state` owns TP x CP x DP x PP (order tp-cp-dp-pp: the
tensor-parallel ranks of a group are neighbours, pipeline stages are outermost), on whatever backend
torch.distributed was initialised with (nccl with GPUs, gloo without)."""
from __future__ import annotations

import math

from dataclasses import dataclass

import torch.distributed as dist

from ..config import ConfigError, ModelConfig, ParallelConfig, TrainConfig


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    cp: int = 1
    virtual_pp: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0  # among data-parallel replicas (the ranks of one CP group share it)
    cp_rank: int = 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def speaks_for_stage(self) -> bool:
        """The one rank of its pipeline stage (first TP, DP and CP rank) that counts and writes it."""
        return self.tp_rank == 0 and self.dp_rank == 0 and self.cp_rank == 0

    def shape(self) -> dict[str, int]:
        """The layout without this rank's coordinates (what a checkpoint records)."""
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "cp": self.cp, "virtual_pp": self.virtual_pp}

    def describe(self) -> str:
        return f"TP{self.tp}·PP{self.pp}" + (f"(x{self.virtual_pp} virtual)" if self.virtual_pp > 1 else "") + \
            f"·DP{self.dp}" + (f"·CP{self.cp}" if self.cp > 1 else "")


def check(parallel: ParallelConfig, world: int) -> int:
    """Validates the layout against the world size; returns the data-parallel size."""
    for name in ("tp", "pp", "virtual_pp", "cp"):
        if getattr(parallel, name) < 1:
            raise ConfigError(f"parallel.{name} must be >= 1, not {getattr(parallel, name)}")
    model_parallel = parallel.tp * parallel.pp * parallel.cp
    if world % model_parallel:
        raise ConfigError(f"parallel.tp {parallel.tp} x parallel.pp {parallel.pp} x parallel.cp {parallel.cp} "
                          f"= {model_parallel} does not divide the {world} ranks (the rest is data parallel)")
    if parallel.virtual_pp > 1 and parallel.pp == 1:
        raise ConfigError("parallel.virtual_pp > 1 needs parallel.pp > 1")
    if parallel.sequence_parallel and parallel.tp == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1")
    return world // model_parallel


def local_batch(training: TrainConfig, dp: int) -> int:
    """Sequences per data-parallel rank and step; they must split into whole micro-batches."""
    if training.global_batch % dp or (training.global_batch // dp) % training.micro_batch:
        raise ConfigError(f"train.global_batch {training.global_batch} must split into {dp} data-parallel ranks x "
                          f"micro_batch {training.micro_batch} x an integer number of micro-batches")
    return training.global_batch // dp


def check_model(model: ModelConfig, parallel: ParallelConfig, seq_len: int) -> None:
    """What the model's shape must allow under the layout: whole heads per tensor-parallel rank,
    whole sequence pieces per context-parallel rank, a layer or more per pipeline chunk."""
    errors = []
    if "attention" in model.layer_kinds() and model.attn_num_heads % parallel.tp:
        errors.append(f"model.attn_num_heads {model.attn_num_heads} is not divisible by parallel.tp {parallel.tp}")
    if model.mixer != "attention" and model.ssm_num_heads % parallel.tp:
        errors.append(f"the {model.ssm_num_heads} SSM heads (model.d_model / model.ssm_head_dim) are not divisible "
                      f"by parallel.tp {parallel.tp}")
    if model.padded_vocab_size % parallel.tp:
        errors.append(f"the padded vocabulary {model.padded_vocab_size} is not divisible by parallel.tp {parallel.tp} "
                      "(raise model.pad_vocab_multiple)")
    if parallel.cp > 1 and seq_len % (2 * parallel.cp):
        errors.append(f"the sequence length {seq_len} is not divisible by 2 x parallel.cp = {2 * parallel.cp} "
                      "(each rank holds two chunks of every sequence)")
    if model.n_layer < parallel.pp * parallel.virtual_pp:
        errors.append(f"model.n_layer {model.n_layer} is fewer than parallel.pp x parallel.virtual_pp "
                      f"= {parallel.pp * parallel.virtual_pp} pipeline chunks")
    if errors:
        raise ConfigError("; ".join(errors))


def initialize(parallel: ParallelConfig) -> Layout:
    """Collective. Creates megatron-core's groups (and its CPU redirects when there is no GPU)."""
    from megatron.core import parallel_state as ps

    from . import cpu_redirects

    cpu_redirects.apply()
    dp = check(parallel, dist.get_world_size())
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.virtual_pp if parallel.virtual_pp > 1 else None,
        context_parallel_size=parallel.cp, distributed_timeout_minutes=max(1, math.ceil(parallel.timeout_s / 60)))
    return Layout(tp=parallel.tp, pp=parallel.pp, dp=dp, cp=parallel.cp, virtual_pp=parallel.virtual_pp,
                  tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
                  dp_rank=ps.get_data_parallel_rank(), cp_rank=ps.get_context_parallel_rank())


def zero_group():
    """The ranks that hold the same parameters: data parallel x context parallel. DeepSpeed averages
    gradients and partitions ZeRO state over them."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)


class DeepSpeedMPU:
    """The 'mpu' interface DeepSpeed asks for, answered by megatron-core's groups: ZeRO partitions
    over the data-parallel x context-parallel group (`zero_group`), and gradient norms add up over the
    model-parallel (TP x PP) group."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_group(self):
        return self.ps.get_model_parallel_group()

    def get_model_parallel_rank(self):
        return dist.get_rank(self.ps.get_model_parallel_group())

    def get_model_parallel_world_size(self):
        return dist.get_world_size(self.ps.get_model_parallel_group())

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_data_parallel_group(self):
        return zero_group()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size(with_context_parallel=True)
