"""A layout's plan without GPUs: every pipeline stage built on the meta device, its parameter count,
and an estimate of the memory one GPU of that stage needs.

Memory per GPU (fp32 parameters and gradients, torch autocast bf16 activations, no recomputation):
- weights 4 B + gradients 4 B per local parameter, plus ZeRO-1's fp32 partition copy and Adam's
  exp_avg and exp_avg_sq, 12 B per parameter divided over the DP ranks;
- activations per layer, per token of a micro-batch (s tokens, d = d_model, t = TP size), after
  Korthikanti et al. 2022 (no sequence parallelism): d * (10 + 24 / t) bytes for the norms,
  projections and MLP; attention adds 5 * heads * s / t (scores, softmax, dropout mask);
  an H3 layer adds its two fp32 FFT convolutions: the spectra of input and kernel kept for the
  backward, 2 * (8 + 8) bytes per local channel (d (1 + head_dim) / t channels);
- 1F1B keeps min(pp - stage, micro-batches) micro-batches in flight on a stage (x virtual_pp
  chunks under interleaving, each with its share of layers);
- the last stage's logits and their gradient in fp32: 8 * s * vocab / t bytes per micro-batch.
Activation recompute (train.recompute) changes what a layer keeps per token:
- block: only its fp32 input, 4 d bytes; the backward recomputes one layer at a time, so one
  micro-batch of the largest layer's full activations is added once per stage;
- selective: its fp32 input and the kept bf16 outputs (h3pretrain/model/regional.py): an H3 layer
  its q, k, v, output projection, fc1 and fc2 outputs, 2 (4 + 4 + 1) d / t (the FFTs are
  recomputed); an attention layer Wqkv, attention, out_proj, fc1 and fc2 outputs, 2 (3 + 1 + 1 + 4 + 1) d / t,
  and the bf16 scores of torch's math attention, 2 * heads * s / t (flash kernels keep less);
  plus one layer's recomputed activations once per stage, as for block.

Checked against bench/results/memory-presets-h100.json (torch.fft H3, one H100, seq 2048): the
activation estimate per sequence, 10.8 GB (1.3b) and 17.5 GB (2.7b), is within 11% of the measured
growth per added sequence (10.1 and 15.7 GB); the measured peak also holds 8-13 GB of transient
buffers (FFT workspaces, casts) that this estimate leaves out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config, ConfigError, ModelConfig
from ..model import HybridLM
from .pipeline import Chunk, describe, partition
from .tensor import replicated_under_tp

GiB = 1024**3


@dataclass
class StagePlan:
    stage: int
    params: int  # whole-stage parameters (all TP ranks together)
    params_per_gpu: int
    state_bytes: float
    activation_bytes: float

    @property
    def total_gib(self) -> float:
        return (self.state_bytes + self.activation_bytes) / GiB


def layer_activation_bytes(m: ModelConfig, kind: str, seq_len: int, tp: int, recompute: str) -> float:
    """Bytes one layer keeps for the backward per token of a micro-batch (see the module docstring)."""
    d = m.d_model
    spectra = 2 * 16 * d * (1 + m.ssm_head_dim) / tp
    if recompute == "block":
        return 4 * d
    if recompute == "selective":
        if kind == "attention":
            return 4 * d + 2 * 10 * d / tp + 2 * m.attn_num_heads * seq_len / tp
        return 4 * d + 2 * 9 * d / tp
    per_token = d * (10 + 24 / tp)
    if kind == "attention":
        return per_token + 5 * m.attn_num_heads * seq_len / tp
    return per_token + spectra


def plan(cfg: Config, world: int, seq_len: int) -> tuple[list[Chunk], list[StagePlan], int]:
    """(chunks, per-stage plans, dp size) for `world` GPUs under cfg.parallel."""
    from .layout import check, check_model, local_batch

    parallel_cfg, m, train_cfg = cfg.parallel, cfg.model, cfg.train
    if world < 1:
        raise ConfigError(f"--gpus {world}: must be >= 1")
    if seq_len < 1:
        raise ConfigError(f"--seq-len {seq_len}: must be >= 1")
    cfg.validate()
    dp = check(parallel_cfg, world)
    check_model(m, parallel_cfg, seq_len)
    local_batch(train_cfg, dp)
    chunks = partition(m, parallel_cfg.pp, parallel_cfg.virtual_pp, seq_len)
    last = len(chunks) - 1
    kinds = m.layer_kinds()
    micro_batches = train_cfg.global_batch // dp // train_cfg.micro_batch
    plans = []
    for stage in range(parallel_cfg.pp):
        local_chunks = [c for c in chunks if c.stage == stage]
        params = sharded = 0
        for c in local_chunks:
            with torch.device("meta"):
                model = HybridLM(m, layer_ids=list(c.layers), pre_process=c.index == 0, post_process=c.index == last)
            for name, p in model.named_parameters():  # incl. the last stage's tied-embedding copy
                params += p.numel()
                if not replicated_under_tp(name):
                    sharded += p.numel()
        local = sharded // parallel_cfg.tp + (params - sharded)
        state = local * 8 + local * 12 / (dp * parallel_cfg.cp)  # ZeRO partitions over DP x CP
        in_flight = min(parallel_cfg.pp - stage, micro_batches) if parallel_cfg.pp > 1 else 1
        tokens = train_cfg.micro_batch * seq_len // parallel_cfg.cp  # this rank's piece of each sequence
        act = 0.0
        layer_kinds = [kinds[i] for c in local_chunks for i in c.layers]
        for kind in layer_kinds:
            act += layer_activation_bytes(m, kind, seq_len, parallel_cfg.tp, train_cfg.recompute) * tokens
        if train_cfg.recompute != "none" and layer_kinds:  # one layer's recomputation, live during its backward
            act += max(layer_activation_bytes(m, k, seq_len, parallel_cfg.tp, "none") for k in layer_kinds) * tokens
        for c in local_chunks:
            if c.index == last:
                act += 8 * tokens * m.padded_vocab_size / parallel_cfg.tp
        plans.append(StagePlan(stage, params, local, state, act * in_flight))
    return chunks, plans, dp


def report(cfg: Config, world: int, seq_len: int) -> str:
    chunks, plans, dp = plan(cfg, world, seq_len)
    parallel_cfg = cfg.parallel
    lines = [f"layout TP{parallel_cfg.tp}·PP{parallel_cfg.pp}" + (f"(x{parallel_cfg.virtual_pp} virtual)" if parallel_cfg.virtual_pp > 1 else "") +
             (f"·CP{parallel_cfg.cp}" if parallel_cfg.cp > 1 else "") + f"·DP{dp} on {world} GPUs, micro-batch {cfg.train.micro_batch} x {seq_len} tokens, "
             f"global batch {cfg.train.global_batch}",
             "pipeline partition (training FLOPs per token):", describe(cfg.model, chunks),
             "memory per GPU (estimate; see h3pretrain/parallel/plan.py):"]
    for p in plans:
        lines.append(f"  stage {p.stage}: {p.params:,} parameters, {p.params_per_gpu:,} per GPU | "
                     f"weights+grads+optimizer {p.state_bytes / GiB:.1f} GiB + activations "
                     f"{p.activation_bytes / GiB:.1f} GiB = {p.total_gib:.1f} GiB")
    return "\n".join(lines)
