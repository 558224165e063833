"""Typed configuration: plain dataclasses, presets, YAML round trip and dotted overrides.

    cfg = Config(model=preset("125m"))
    apply_overrides(cfg, ["model.attn_layer_idx=[4, 8]", "model.embed_dropout=0"])
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import UserError


class ConfigError(UserError):
    """A config file or override that does not fit the typed config."""


Mixer = Literal["h3", "attention", "s4d"]
RecomputeMode = Literal["none", "block", "selective"]
CheckpointFormat = Literal["sharded", "gathered"]
MIXERS = typing.get_args(Mixer)
RECOMPUTE_MODES = typing.get_args(RecomputeMode)


@dataclass
class ModelConfig:
    """Shape and initialisation of a hybrid H3 + attention language model (docs/design.md sections 1-3)."""

    vocab_size: int = 50257
    """Tokens in the tokenizer (the data's manifest must agree)."""
    pad_vocab_multiple: int = 8
    """The embedding and head are padded to a multiple of this (GPT-2's 50257 -> 50264)."""
    d_model: int = 768
    """Width of the residual stream."""
    n_layer: int = 12
    """Number of blocks (H3 or attention)."""
    attn_layer_idx: list[int] = field(default_factory=lambda: [6])
    """Indices of the attention layers (0-based); the others are H3 (or S4D) layers."""
    attn_num_heads: int = 12
    """Attention heads per attention layer."""
    attn_rotary_dim: int = 0
    """Rotary embedding on the first `attn_rotary_dim` dims of each attention head (0: none)."""
    mixer: Mixer = "h3"
    """h3: H3 layers with attention at attn_layer_idx; attention: attention in every layer; s4d: the
    diagonal SSM alone (no shift SSM, no gating) with attention at attn_layer_idx."""
    ssm_d_state: int = 64
    """State size N of both SSMs (the shift SSM's taps; 2 x the diagonal SSM's complex modes)."""
    ssm_head_dim: int = 1
    """H3 head dimension: channels per SSM head (1 in every released model)."""
    ssm_dt_min: float = 0.001
    """Smallest initial step size of the diagonal SSM (log-uniform init)."""
    ssm_dt_max: float = 0.1
    """Largest initial step size of the diagonal SSM."""
    mlp_ratio: int = 4
    """MLP hidden width as a multiple of d_model."""
    embed_dropout: float = 0.1
    """Dropout after the word embedding."""
    resid_dropout: float = 0.0
    """Dropout on each block's output before the residual add."""
    attn_dropout: float = 0.1
    """Dropout on the attention probabilities."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    initializer_range: float = 0.02
    """Std of the normal init of Linear and Embedding weights (out_proj and fc2 scaled by 1/sqrt(2 n_layer))."""

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def ssm_num_heads(self) -> int:
        return self.d_model // self.ssm_head_dim

    def layer_kinds(self) -> list[str]:
        """'h3', 's4d' or 'attention' for each layer."""
        if self.mixer == "attention":
            return ["attention"] * self.n_layer
        return ["attention" if i in self.attn_layer_idx else self.mixer for i in range(self.n_layer)]

    def validate(self) -> None:
        errors = [e for e in [_literal_errors(self, "model.")] if e]
        if self.d_model % self.ssm_head_dim:
            errors.append(f"d_model {self.d_model} is not a multiple of ssm_head_dim {self.ssm_head_dim}")
        if self.ssm_d_state % 2:
            errors.append(f"ssm_d_state {self.ssm_d_state} must be even (d_state/2 complex modes)")
        bad = [i for i in self.attn_layer_idx if not 0 <= i < self.n_layer]
        if bad:
            errors.append(f"attn_layer_idx {bad} outside 0..{self.n_layer - 1}")
        if "attention" in self.layer_kinds():
            if self.d_model % self.attn_num_heads:
                errors.append(f"d_model {self.d_model} is not a multiple of attn_num_heads {self.attn_num_heads}")
            else:
                head = self.d_model // self.attn_num_heads
                if self.attn_rotary_dim % 2 or self.attn_rotary_dim > head:
                    errors.append(f"attn_rotary_dim {self.attn_rotary_dim} must be even and <= head dim {head}")
        if errors:
            raise ConfigError("invalid model config: " + "; ".join(errors))


def _released(d_model: int, n_layer: int, heads: int, attn: list[int], **kw: Any) -> ModelConfig:
    return ModelConfig(d_model=d_model, n_layer=n_layer, attn_num_heads=heads, attn_layer_idx=attn, **kw)


# Shapes of the released H3 checkpoints (docs/design.md section 3) plus a CPU-sized one.
PRESETS: dict[str, typing.Callable[[], ModelConfig]] = {
    "tiny": lambda: ModelConfig(vocab_size=4096, d_model=128, n_layer=4, attn_layer_idx=[2], attn_num_heads=4),
    "125m": lambda: _released(768, 12, 12, [6]),
    "355m": lambda: _released(1024, 24, 16, [8, 16]),
    "1.3b": lambda: _released(2048, 24, 16, [8, 16]),
    "2.7b": lambda: _released(2560, 32, 20, [8, 16, 24], initializer_range=math.sqrt(2 / (5 * 2560))),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


@dataclass
class DataSource:
    """One prepared directory of a weighted data mixture."""

    path: str = ""
    """A directory written by `h3pretrain prep` (all sources: one tokenizer, one seq_len)."""
    weight: float = 1.0
    """Its share of every global batch, relative to the other sources' weights."""
    name: str = ""
    """Its label in logs and metrics (tokens seen, evaluation loss); default: the directory's name."""


@dataclass
class DataConfig:
    """The prepared data a run trains on (the output of `h3pretrain prep`)."""

    path: str = "data/shards"
    """A directory written by `h3pretrain prep` (the first source's, with `sources`)."""
    sources: list[DataSource] = field(default_factory=list)
    """A weighted mixture of prepared directories, e.g. Pile subsets prepared with --pile-set:
    each global batch draws from them in proportion to their weights; empty: `path` alone."""
    seed: int = 1234
    """Sample order: a fresh permutation per epoch from (seed, epoch)."""
    eval_split: str = "val"
    """Split of the prepared data used for evaluation during training."""
    tokenizer: str = ""
    """Tokenizer the shards must have been made with: a SentencePiece .model, a tokenizer.json or
    a directory holding one (checked by sha256 against the manifest before training); "" skips the
    check (the shards' own tokenizer file is used)."""


@dataclass
class TrainConfig:
    """One training run: batch, schedule, optimizer, precision, evaluation, checkpoints, tracking."""

    run_dir: str = "checkpoints/run"
    """The run's directory: checkpoints, config.yaml, status.json, metrics.jsonl, mlflow."""
    steps: int = 1000
    """Optimizer steps of the whole run (a resumed run continues to this count)."""
    global_batch: int = 8
    """Sequences per optimizer step, all data-parallel ranks together."""
    micro_batch: int = 4
    """Sequences per forward/backward on one rank (gradient accumulation fills the rest)."""
    lr: float = 6e-4
    """Peak learning rate (after warmup)."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio."""
    warmup_steps: int = 10
    """Steps of linear warmup from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay (the SSM parameters, norms and biases get none)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16 (autocast; parameters, SSMs and optimizer in fp32) or fp32."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile each block (h3pretrain/model/regional.py): true, false or auto (on with CUDA)."""
    recompute: RecomputeMode = "none"
    """Activation recompute per block: none; block (keep only each block's input); selective (keep
    matmul, attention, FFT and FlashConv outputs; recompute norms, GELU, dropout, elementwise)."""
    zero_stage: Literal[1, 2, 3] = 1
    """DeepSpeed ZeRO stage: 1 (optimizer state), 2 (+ gradients), 3 (+ parameters)."""
    optimizer: Literal["auto", "torch", "apex", "deepspeed"] = "auto"
    """The Adam implementation: auto (apex FusedAdam on GPU when installed, else torch AdamW, fused
    on GPU), torch, apex or deepspeed."""
    seed: int = 0
    """Seed of the initial weights and of dropout."""
    log_every: int = 1
    """Log (progress line, metrics.jsonl, mlflow) every this many steps."""
    eval_every: int = 100
    """Evaluate every this many steps (0: never)."""
    eval_batches: int = 8
    """Batches of train.micro_batch sequences per data-parallel rank in one evaluation."""
    ckpt_every: int = 100
    """Write a checkpoint every this many steps (0: only on a signal and at the end)."""
    keep_last: int = 3
    """Good checkpoints to keep (the newest good one and the one just written are always kept)."""
    resume: str = "auto"
    """auto (the newest complete checkpoint, if any), none, or a checkpoint directory."""
    allow_data_change: bool = False
    """A resume refuses data whose manifest differs from the run's (seq_len, tokenizer, shards);
    true continues on the new data anyway (the sample order then differs from the run's)."""
    async_checkpoint: bool = True
    """Write checkpoints in the background: training goes on once the state is in host memory; the
    next save, the end of the run and a stop wait for the write, and a checkpoint counts only once
    it is complete (manifest and `latest` last)."""
    checkpoint_format: CheckpointFormat = "sharded"
    """sharded: every rank writes only its own share (its ZeRO partition of its TP / PP piece) with
    PyTorch Distributed Checkpoint, all ranks in parallel; gathered: one rank per pipeline stage
    writes the stage's full tensors (the earlier format, host memory of a whole stage on every rank
    during a save). Both resume under any layout, and every reader reads both."""
    hash_checkpoints: bool = True
    """Record the sha256 of every checkpoint file in its manifest (readers then check it)."""
    hang_timeout_s: float = 1800.0
    """A step (three times this for the first step of a start) that has not finished after this
    many seconds ends the process: every thread's stack goes to run_dir/hang-<rank>.txt and the
    exit code is 70, which the SLURM script requeues. 0: no watchdog."""
    max_bad_steps: int = 3
    """A step whose loss or global gradient norm is not finite applies no update (DeepSpeed skips
    it; the batch counts as seen); after this many such steps in a row the run stops (exit 65,
    status.json `failed`, the last good checkpoint named). 0: never stop for it."""
    spike: Literal["off", "warn", "rollback"] = "warn"
    """Loss spikes: a step whose loss exceeds mean + spike_z * std of the last spike_window steps'
    losses. warn: logged (a `spike` record in metrics.jsonl and mlflow, a warning line). rollback:
    also reload the newest checkpoint before the spike and skip the next spike_skip_batches
    global batches of data (extended through the spike's own batch), recorded in
    run_dir/skipped_batches.jsonl and status.json; needs ckpt_every > 0."""
    spike_window: int = 100
    """Steps whose losses make the running statistics; detection starts once it is full."""
    spike_z: float = 6.0
    """Standard deviations above the window's mean that make a spike."""
    spike_skip_batches: int = 200
    """Global batches a rollback skips, from the first one after the checkpoint it reloads."""
    spike_max_rollbacks: int = 3
    """Rollbacks to one checkpoint (spikes before the next checkpoint is written) after which the
    run stops as diverged (exit 65) instead of rolling back again."""
    mlflow: bool = True
    """Track the run in mlflow."""
    mlflow_uri: str = ""
    """mlflow tracking URI; empty: a sqlite database inside run_dir."""
    experiment: str = "h3pretrain"
    """The mlflow experiment's name."""
    peak_tflops: float = 0.0
    """Peak bf16 TFLOP/s per device, for MFU; 0: from the GPU's name (none on CPU)."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """DeepSpeed settings merged over the generated DeepSpeed config."""
    deepspeed_json: str = ""
    """A DeepSpeed JSON file, merged after `deepspeed`."""

    def validate(self) -> None:
        errors = [e for e in [_literal_errors(self, "train.")] if e]
        for name in ("steps", "global_batch", "micro_batch", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                errors.append(f"train.{name} must be >= 1, not {getattr(self, name)}")
        for name in ("eval_every", "ckpt_every", "warmup_steps", "max_bad_steps", "hang_timeout_s"):
            if getattr(self, name) < 0:
                errors.append(f"train.{name} must be >= 0, not {getattr(self, name)}")
        if self.eval_every and self.eval_batches < 1:
            errors.append(f"train.eval_batches must be >= 1 when train.eval_every > 0, not {self.eval_batches}")
        if self.spike_window < 2:
            errors.append(f"train.spike_window must be >= 2, not {self.spike_window}")
        if not self.spike_z > 0:
            errors.append(f"train.spike_z must be > 0, not {self.spike_z}")
        if self.spike_skip_batches < 0 or self.spike_max_rollbacks < 1:
            errors.append("train.spike_skip_batches must be >= 0 and train.spike_max_rollbacks >= 1, not "
                          f"{self.spike_skip_batches} and {self.spike_max_rollbacks}")
        if self.spike == "rollback" and not self.ckpt_every:
            errors.append("train.spike=rollback needs checkpoints to roll back to: set train.ckpt_every > 0")
        if not self.lr > 0:
            errors.append(f"train.lr must be > 0, not {self.lr}")
        if errors:
            raise ConfigError("; ".join(errors))


@dataclass
class ParallelConfig:
    """Model-parallel layout; data parallelism takes the remaining ranks (world = tp * pp * cp * dp)."""

    tp: int = 1
    """Tensor-parallel ranks (megatron-core layers; whole attention and SSM heads per rank)."""
    pp: int = 1
    """Pipeline stages."""
    virtual_pp: int = 1
    """Model chunks per stage (interleaved 1F1B when > 1)."""
    cp: int = 1
    """Context parallel: every sequence split into cp pieces, one per rank."""
    sequence_parallel: bool = False
    """Shard the LayerNorm and dropout regions over the sequence (needs tp > 1)."""
    timeout_s: float = 1800.0
    """Every process group's timeout: a collective that waits this long for a lost rank fails
    (and the job with it) instead of waiting forever."""


@dataclass
class SlurmConfig:
    """The sbatch job that `h3pretrain slurm submit` renders (one task per GPU, see h3pretrain/slurm)."""

    nodes: int = 1
    """Nodes of the job."""
    gpus_per_node: int = 8
    """GPUs per node; 0: CPU-only nodes (then set tasks_per_node)."""
    tasks_per_node: int = 0
    """Training processes per node; 0: gpus_per_node (one per GPU)."""
    cpus_per_task: int = 8
    """CPUs per training process (data loading, kernels' host work)."""
    time: str = "24:00:00"
    """Time limit per job (quote it in YAML); a job that runs out of time saves, requeues and resumes."""
    partition: str = ""
    """SLURM partition (empty: the cluster's default)."""
    account: str = ""
    """SLURM account (empty: the user's default)."""
    qos: str = ""
    """SLURM quality of service (empty: the default)."""
    job_name: str = ""
    """The job's name; empty: the run directory's name with an h3- prefix."""
    exclusive: bool = True
    """Ask for whole nodes (--exclusive)."""
    grace_s: int = 300
    """Seconds of warning before the time limit (--signal=B:USR1@grace_s) to finish a step and save."""
    max_restarts: int = 3
    """Failures (not preemptions) requeued at most this many times per job."""
    sbatch: list[str] = field(default_factory=list)
    """Extra #SBATCH options, e.g. "--constraint=h100"."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before training (module load ...)."""


SYNTHETIC_TASKS = ("induction", "assoc_recall")
# The paper's (vocab, input tokens, epochs); the answer is the token after the inputs. Associative
# recall is the reference's vocab-10 setting (safari's `*-vs10` configs: 4 keys, 4 values, 10 pairs),
# where H3 / S4D / attention measure 0.998 / 0.914 / 0.994 against the paper's ~100 / 86.0 / ~100. The
# vocab-20 setting (9 keys, 9 values, 20 pairs, 400 epochs) is
# `--vocab-size 20 --seq-len 42 --epochs 400`.
SYNTHETIC_SHAPE = {"induction": (20, 31, 400), "assoc_recall": (10, 22, 200)}


@dataclass
class SyntheticSettings:
    """`h3pretrain synthetic` (h3pretrain/synthetic.py); defaults are the reference setup."""

    task: Literal["induction", "assoc_recall"] = "induction"
    """induction or assoc_recall."""
    mixer: Mixer = "h3"
    """h3, attention or s4d (as ModelConfig.mixer; no attention layers mixed in)."""
    vocab_size: int = 0
    """Vocabulary of the task; 0: the paper's."""
    seq_len: int = 0
    """Input tokens; 0: the paper's."""
    n_train: int = 5000
    """Distinct training examples."""
    n_test: int = 500
    """Test examples, none of which occurs in training."""
    d_model: int = 32
    """Model width."""
    n_layer: int = 2
    """Number of layers (all of the one mixer)."""
    attn_num_heads: int = 1
    """Attention heads (attention mixer)."""
    attn_rotary: bool = True
    """Rotary embeddings in attention (it has no position embeddings otherwise)."""
    dropout: float = 0.1
    """Embedding and attention dropout."""
    loss: Literal["all", "answer"] = "all"
    """all: next-token loss at every position (the reference); answer: at the answer only."""
    epochs: int = 0
    """Epochs; 0: the paper's (induction 400, assoc_recall 200)."""
    batch_size: int = 32
    """Examples per optimizer step."""
    lr: float = 5e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    warmup_fraction: float = 0.1
    """Share of the steps spent in linear warmup."""
    seed: int = 0
    """Seed of the data and the model."""

    def shape(self) -> tuple[int, int]:
        vocab, length, _ = SYNTHETIC_SHAPE[self.task]
        return self.vocab_size or vocab, self.seq_len or length

    def num_epochs(self) -> int:
        return self.epochs or SYNTHETIC_SHAPE[self.task][2]

    def validate(self) -> None:
        """One line naming each bad setting (as the CLI flag)."""
        errors = []
        if self.task not in SYNTHETIC_SHAPE:
            errors.append(f"--task must be one of {', '.join(SYNTHETIC_SHAPE)}, not {self.task!r}")
        for name in ("n_train", "n_test", "d_model", "n_layer", "batch_size", "attn_num_heads"):
            if getattr(self, name) < 1:
                errors.append(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        for name in ("vocab_size", "seq_len", "epochs"):
            if getattr(self, name) < 0:
                errors.append(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 0 (0: the paper's)")
        if not self.lr > 0:
            errors.append(f"--lr {self.lr}: must be > 0")
        for name in ("dropout", "warmup_fraction"):
            if not 0 <= getattr(self, name) < 1:
                errors.append(f"--{name.replace('_', '-')} {getattr(self, name)}: must be in [0, 1)")
        if self.weight_decay < 0:
            errors.append(f"--weight-decay {self.weight_decay}: must be >= 0")
        if self.loss not in ("all", "answer"):
            errors.append(f"--loss must be all or answer, not {self.loss!r}")
        if errors:
            raise ConfigError("; ".join(errors))


@dataclass
class Config:
    """The whole run's configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model's shape and initialisation."""
    data: DataConfig = field(default_factory=DataConfig)
    """The prepared data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training run."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The model-parallel layout."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """The SLURM job."""

    def data_sources(self) -> list[tuple[str, float]]:
        """(path, weight) of every source: `data.sources`, or `data.path` alone."""
        return [(x.path, x.weight) for x in self.data.sources] or [(self.data.path, 1.0)]

    def validate(self) -> None:
        """Every setting checked in one place (choices, ranges, the model's shape); one ConfigError
        naming each bad setting. A layout is checked against the world size when a run starts."""
        errors = [_literal_errors(section, f"{name}.") for name, section in
                  (("data", self.data), ("parallel", self.parallel), ("slurm", self.slurm))]
        for section in (self.model, self.train):
            try:
                section.validate()
            except ConfigError as err:
                errors.append(str(err))
        for name in ("tp", "pp", "virtual_pp", "cp"):
            if getattr(self.parallel, name) < 1:
                errors.append(f"parallel.{name} must be >= 1, not {getattr(self.parallel, name)}")
        if not self.parallel.timeout_s > 0:
            errors.append(f"parallel.timeout_s must be > 0, not {self.parallel.timeout_s}")
        if not self.data.path and not self.data.sources:
            errors.append("data.path is empty")
        for i, source in enumerate(self.data.sources):
            if not source.path:
                errors.append(f"data.sources[{i}].path is empty")
            if not (source.weight > 0 and math.isfinite(source.weight)):
                errors.append(f"data.sources[{i}].weight must be a positive number, not {source.weight}")
        paths = [str(Path(x.path).resolve()) for x in self.data.sources if x.path]
        if len(set(paths)) < len(paths):
            errors.append("data.sources lists a directory twice (give it one source with the summed weight)")
        s = self.slurm
        for name, low in (("nodes", 1), ("gpus_per_node", 0), ("tasks_per_node", 0), ("cpus_per_task", 1),
                          ("grace_s", 0), ("max_restarts", 0)):
            if getattr(s, name) < low:
                errors.append(f"slurm.{name} must be >= {low}, not {getattr(s, name)}")
        errors = [e for e in errors if e]
        if errors:
            raise ConfigError("; ".join(errors))


def _literal_errors(obj: Any, prefix: str = "") -> str:
    """Choices (Literal fields) of a config built in Python, where nothing coerced them."""
    out = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            out.append(_literal_errors(value, f"{prefix}{f.name}."))
        elif any(typing.get_origin(a) is Literal for a in (tp, *typing.get_args(tp))):
            try:
                _coerce(value, tp, f"{prefix}{f.name}")
            except ConfigError as err:
                out.append(str(err))
    return "; ".join(e for e in out if e)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), by field name."""
    import ast
    import inspect
    import textwrap

    docs, body = {}, ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    for field_node, doc_node in zip(body, body[1:]):
        if (isinstance(field_node, ast.AnnAssign) and isinstance(doc_node, ast.Expr)
                and isinstance(doc_node.value, ast.Constant) and isinstance(doc_node.value.value, str)):
            docs[field_node.target.id] = " ".join(doc_node.value.value.split())
    return docs


def describe(cfg: Any, prefix: str = "") -> list[str]:
    """`section.key = value` and the field's meaning, for every field of a config."""
    lines, docs = [], field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            lines += [f"{prefix}{f.name}: {docs.get(f.name, '')}", *describe(value, f"{prefix}{f.name}.")]
        else:
            lines.append(f"  {prefix}{f.name} = {value!r}\n      {docs.get(f.name, '')}")
    return lines


# ---------------------------------------------------------------------------------------------
# dict / YAML conversion and overrides


def _yaml():
    """PyYAML, imported when a file or override is read (the model code does not need it)."""
    import yaml

    return yaml


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _kind(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(map(str, typing.get_args(tp)))
    return {bool: "true or false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}, not {value!r}")
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where} must be {' or '.join(_kind(a) for a in args if a is not type(None))}, not {value!r}")
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" as a string
            return float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected a string, got the number {value!r} (quote it in YAML: "
                          "an unquoted 12:00:00 reads as 43200)")
    if tp is Any:
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply `a.b.c=value` strings in place; values are parsed as YAML and type-checked."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        path, raw = item.split("=", 1)
        parts = path.strip().split(".")
        obj = cfg
        for p in parts[:-1]:
            if not dataclasses.is_dataclass(obj) or not hasattr(obj, p):
                raise ConfigError(f"override {item!r}: no section {p!r}")
            obj = getattr(obj, p)
        key = parts[-1]
        fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
        if key not in fields:
            raise ConfigError(f"override {item!r}: no key {key!r} (valid: {sorted(fields)})")
        hint = typing.get_type_hints(type(obj))[key]
        quoted = len(raw) > 1 and raw[0] == raw[-1] and raw[0] in "'\""
        # A string field takes the text as given: YAML would read 12:00:00 as 43200 and 1e3 as a float.
        text_only = hint is str or (typing.get_origin(hint) is Literal and all(isinstance(c, str) for c in typing.get_args(hint)))
        value = raw if text_only and not quoted else _yaml().safe_load(raw)
        setattr(obj, key, _coerce(value, hint, path))
    return cfg


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, where: str = "config", env: typing.Mapping[str, str] | None = None) -> Any:
    """`${NAME}` and `${NAME:-default}` in every string of a YAML tree, from the environment."""
    env = os.environ if env is None else env
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}", env) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]", env) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if env.get(name) or (name in env and default is None):
            return env[name]
        if default is None:
            raise ConfigError(f"{where}: environment variable {name} is not set (and {m.group(0)} has no default)")
        return default

    return _ENV_REF.sub(sub, value)


def load_yaml(path: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    yaml = _yaml()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections (model, data, train, ...), "
                          f"not a {type(data).__name__}")
    data = expand_env(data, str(path))
    model = data.get("model")
    if isinstance(model, dict) and "preset" in model:
        # `model: {preset: 125m, ...}` starts from the preset and overrides the given keys.
        model = dict(model)
        base = to_dict(preset(model.pop("preset")))
        base.update(model)
        data = {**data, "model": base}
    cfg = from_dict(Config, data)
    apply_overrides(cfg, list(overrides))
    return cfg


def save_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(_yaml().safe_dump(to_dict(cfg), sort_keys=False))
