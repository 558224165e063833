"""A layout's plan without GPUs: every pipeline stage built on the meta device, its parameter count,
and an estimate of the memory one GPU of that stage needs.

Memory per GPU (fp32 parameters and gradients, torch autocast bf16 activations, no recomputation):
- weights 4 B + gradients 4 B per local parameter, plus ZeRO-1's fp32 partition copy and Adam's
  exp_avg and exp_avg_sq, 12 B per parameter divided over the DP ranks;
- activations per layer, per token of a micro-batch (s tokens, d = d_model, t = TP size), after
  Korthikanti et al. 2022 (no sequence parallelism): d * (10 + 24 / t) bytes for the norms,
  projections and MLP; attention adds a log-sum-exp per head (flash kernels), or 5 * heads * s / t
  (scores, softmax, dropout mask) where torch's math attention runs (fp32 with dropout: the CPU's
  flash kernel has no dropout); under context parallelism the ring attention adds its own copies
  of q, k, v and its fp32 output, and one attention layer's backward holds two K/V blocks and
  their fp32 gradients at once; an H3 layer adds its two fp32 FFT convolutions: the spectra of
  input and kernel kept for the backward, 2 * (8 + 8) bytes per local channel (d (1 + head_dim)
  / t channels); precision fp32 doubles every bf16 term;
- 1F1B keeps min(pp - stage, micro-batches) micro-batches in flight on a stage (x virtual_pp
  chunks under interleaving, each with its share of layers);
- the last stage's fp32 logits, their log-softmax and the gradients of both, live together when
  the backward starts: 16 * s * vocab / t bytes per micro-batch.
Activation recompute (train.recompute) changes what a layer keeps per token:
- block: only its fp32 input, 4 d bytes; the backward recomputes one layer at a time, so one
  micro-batch of the largest layer's full activations is added once per stage;
- selective: its fp32 input and the kept bf16 outputs (h3pretrain/model/regional.py): an H3 layer
  its q, k, v, output projection, fc1 and fc2 outputs, 2 (4 + 4 + 1) d / t (the FFTs are
  recomputed); an attention layer Wqkv, attention, out_proj, fc1 and fc2 outputs, 2 (3 + 1 + 1 + 4 + 1) d / t,
  and the scores where torch's math attention runs, 2 * heads * s / t (the ring attention is
  recomputed whole: its output is not kept);
  plus one layer's recomputed activations once per stage, as for block.

Checked against bench/results/memory-presets-h100.json (torch.fft H3, one H100, seq 2048): the
activation estimate per sequence, 11.0 GB (1.3b) and 17.1 GB (2.7b), is within 9% of the measured
growth per added sequence (10.1 and 15.7 GB); the measured peak also holds 8-13 GB of transient
buffers (FFT workspaces, casts) that this estimate leaves out. Long context on CPU (fp32, one
sequence, cp = 1, 2, 4): bench/results/context-cpu.json, the estimate beside each rank's measured
growth.
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


def layer_activation_bytes(m: ModelConfig, kind: str, seq_len: int, tp: int, recompute: str, cp: int = 1,
                           precision: str = "bf16") -> float:
    """Bytes one layer keeps for the backward per token of a micro-batch (see the module docstring).
    precision fp32: every bf16 activation term takes 4 bytes instead of 2. cp > 1: attention is the
    ring (parallel.ring_attention), which keeps its inputs, its fp32 output and log-sum-exp, no scores."""
    d = m.d_model
    act = 1.0 if precision == "bf16" else 2.0  # the bf16 terms' factor
    spectra = 2 * 16 * d * (1 + m.ssm_head_dim) / tp
    if recompute == "block":
        return 4 * d
    # torch's math attention (CPU with dropout: its flash kernel has none) keeps the scores; the
    # flash kernels keep a log-sum-exp per head; the ring keeps no scores in any case
    scores = cp == 1 and precision == "fp32" and m.attn_dropout > 0
    if recompute == "selective":
        if kind == "attention":  # the ring is recomputed whole
            kept = 0.0 if cp > 1 else (act * 2 * m.attn_num_heads * seq_len if scores else 4 * m.attn_num_heads)
            return 4 * d + act * 2 * (9 if cp > 1 else 10) * d / tp + kept / tp
        return 4 * d + act * 2 * 9 * d / tp
    per_token = act * d * (10 + 24 / tp)
    if kind == "attention":
        if cp > 1:  # its own copies of q, k, v and its fp32 output
            return per_token + (act * 2 * 3 + 4) * d / tp + 4 * m.attn_num_heads / tp
        return per_token + (act * 5 * m.attn_num_heads * seq_len if scores else 4 * m.attn_num_heads) / tp
    return per_token + spectra


def ring_backward_bytes(m: ModelConfig, tp: int, precision: str = "bf16") -> float:
    """Per token of a piece, during one attention layer's backward under cp > 1: the K/V block in use
    and the one arriving, their fp32 gradient accumulators (in use and arriving) and dq in fp32."""
    act = 2 if precision == "bf16" else 4
    d = m.d_model / tp
    return 2 * 2 * act * d + 2 * 2 * 4 * d + 4 * d


def logits_bytes(m: ModelConfig, tp: int) -> float:
    """Per token on the last stage, at the start of the backward: the fp32 logits, their
    log-softmax and the gradients of both."""
    return 16 * m.padded_vocab_size / tp


def stage_activation_bytes(cfg: Config, layer_kinds: list[str], seq_len: int, tokens: int, last: bool) -> float:
    """One micro-batch's activations on a stage holding `layer_kinds`, `tokens` of it on this rank."""
    m, tp, cp = cfg.model, cfg.parallel.tp, cfg.parallel.cp
    recompute, precision = cfg.train.recompute, cfg.train.precision
    act = sum(layer_activation_bytes(m, k, seq_len, tp, recompute, cp, precision) for k in layer_kinds) * tokens
    if recompute != "none" and layer_kinds:  # one layer's recomputation, live during its backward
        act += max(layer_activation_bytes(m, k, seq_len, tp, "none", cp, precision) for k in layer_kinds) * tokens
    if cp > 1 and "attention" in layer_kinds:
        act += ring_backward_bytes(m, tp, precision) * tokens
    if last:
        act += logits_bytes(m, tp) * tokens
    return act


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
        layer_kinds = [kinds[i] for c in local_chunks for i in c.layers]
        act = stage_activation_bytes(cfg, layer_kinds, seq_len, tokens, any(c.index == last for c in local_chunks))
        plans.append(StagePlan(stage, params, local, state, act * in_flight))
    return chunks, plans, dp


def layer_table(cfg: Config, seq_len: int) -> list[str]:
    """Per-rank activation memory of one micro-batch, per layer kind, under each recompute mode."""
    m, parallel_cfg = cfg.model, cfg.parallel
    tokens = cfg.train.micro_batch * seq_len // parallel_cfg.cp
    kinds = m.layer_kinds()
    lines = [f"activations per rank, one micro-batch ({tokens:,} tokens of {seq_len:,} per rank; GiB; "
             f"{cfg.train.precision}):", f"  {'layer kind':18s} {'none':>9s} {'block':>9s} {'selective':>9s}"]
    for kind in sorted(set(kinds)):
        row = [layer_activation_bytes(m, kind, seq_len, parallel_cfg.tp, mode, parallel_cfg.cp,
                                      cfg.train.precision) * tokens / GiB for mode in ("none", "block", "selective")]
        lines.append(f"  {kind + f' (x{kinds.count(kind)})':18s} " + " ".join(f"{x:9.2f}" for x in row) + "  each")
    if parallel_cfg.cp > 1 and "attention" in kinds:
        lines.append(f"  {'ring backward':18s} {ring_backward_bytes(m, parallel_cfg.tp, cfg.train.precision) * tokens / GiB:9.2f}"
                     "  once, during one attention layer's backward")
    lines.append(f"  {'logits (last)':18s} {logits_bytes(m, parallel_cfg.tp) * tokens / GiB:9.2f}  once, on the last stage")
    return lines


def report(cfg: Config, world: int, seq_len: int, gpu_memory_gb: float = 80.0) -> str:
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
    lines += layer_table(cfg, seq_len)
    need = max(p.total_gib for p in plans) * GiB / 1e9
    logits = logits_bytes(cfg.model, parallel_cfg.tp) * cfg.train.micro_batch * seq_len / parallel_cfg.cp / 1e9
    verdict = "fits" if need <= gpu_memory_gb else "does not fit"
    lines.append(f"{verdict} on GPUs of {gpu_memory_gb:g} GB with train.recompute={cfg.train.recompute}: the largest "
                 f"stage needs {need:.1f} GB (before allocator fragmentation and kernel workspaces), of which the "
                 f"last stage's logits {logits:.1f} GB")
    return "\n".join(lines)
