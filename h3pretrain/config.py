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
from typing import Any

from .errors import UserError


class ConfigError(UserError):
    """A config file or override that does not fit the typed config."""


MIXERS = ("h3", "attention", "s4d")
RECOMPUTE_MODES = ("none", "block", "selective")


@dataclass
class ModelConfig:
    """Shape and initialisation of a hybrid H3 + attention language model (docs/design.md sections 1-3)."""

    vocab_size: int = 50257
    pad_vocab_multiple: int = 8
    d_model: int = 768
    n_layer: int = 12
    attn_layer_idx: list[int] = field(default_factory=lambda: [6])
    attn_num_heads: int = 12
    # Rotary embedding on the first `attn_rotary_dim` dims of each attention head (0: none).
    attn_rotary_dim: int = 0
    # "h3": H3 layers with attention at attn_layer_idx; "attention": attention in every layer;
    # "s4d": the diagonal SSM alone (no shift SSM, no gating) with attention at attn_layer_idx.
    mixer: str = "h3"
    ssm_d_state: int = 64
    ssm_head_dim: int = 1
    ssm_dt_min: float = 0.001
    ssm_dt_max: float = 0.1
    mlp_ratio: int = 4
    embed_dropout: float = 0.1
    resid_dropout: float = 0.0
    attn_dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

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
        errors = []
        if self.mixer not in MIXERS:
            errors.append(f"mixer must be one of {', '.join(MIXERS)}, not {self.mixer!r}")
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
class DataConfig:
    path: str = "data/shards"  # a directory written by `h3pretrain prep`
    seed: int = 1234  # sample order: a fresh permutation per epoch from (seed, epoch)
    eval_split: str = "val"
    # SentencePiece model the shards must have been made with (checked by sha256 against the
    # manifest before training); "" skips the check (the shards' own tokenizer.model is used).
    tokenizer: str = ""


@dataclass
class TrainConfig:
    run_dir: str = "checkpoints/run"
    steps: int = 1000
    global_batch: int = 8  # sequences per optimizer step, all data-parallel ranks together
    micro_batch: int = 4  # sequences per forward/backward on one rank (gradient accumulation fills the rest)
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "bf16"  # "bf16" (autocast; parameters, SSMs and optimizer in fp32) or "fp32"
    # torch.compile each block (h3pretrain/model/regional.py): true | false | auto (on with CUDA)
    compile: bool | str = "auto"
    # activation recompute per block: none | block (keep only each block's input) | selective
    # (keep matmul, attention, FFT and FlashConv outputs; recompute norms, GELU, dropout, elementwise)
    recompute: str = "none"
    zero_stage: int = 1
    optimizer: str = "auto"  # auto | torch | apex | deepspeed (fused Adam where available)
    seed: int = 0
    log_every: int = 1
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_last: int = 3
    resume: str = "auto"  # auto (latest complete checkpoint, if any) | none | <checkpoint dir>
    # a resume refuses data whose manifest differs from the run's (seq_len, tokenizer, shards);
    # true continues on the new data anyway (the sample order then differs from the run's)
    allow_data_change: bool = False
    hash_checkpoints: bool = True  # sha256 of every checkpoint file in its manifest
    mlflow: bool = True
    mlflow_uri: str = ""  # default: sqlite database inside run_dir
    experiment: str = "h3pretrain"
    peak_tflops: float = 0.0  # per device, for MFU; 0 = from the GPU name (nothing on CPU)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # merged over the generated DeepSpeed config
    deepspeed_json: str = ""  # a DeepSpeed JSON file, merged after `deepspeed`

    def validate(self) -> None:
        errors = []
        if self.precision not in ("bf16", "fp32"):
            errors.append(f"train.precision must be bf16 or fp32, not {self.precision!r}")
        if self.compile not in (True, False, "auto"):
            errors.append(f"train.compile must be true, false or auto, not {self.compile!r}")
        if self.recompute not in RECOMPUTE_MODES:
            errors.append(f"train.recompute must be none, block or selective, not {self.recompute!r}")
        for name in ("steps", "global_batch", "micro_batch", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                errors.append(f"train.{name} must be >= 1, not {getattr(self, name)}")
        for name in ("eval_every", "ckpt_every", "warmup_steps"):
            if getattr(self, name) < 0:
                errors.append(f"train.{name} must be >= 0, not {getattr(self, name)}")
        if self.eval_every and self.eval_batches < 1:
            errors.append(f"train.eval_batches must be >= 1 when train.eval_every > 0, not {self.eval_batches}")
        if not self.lr > 0:
            errors.append(f"train.lr must be > 0, not {self.lr}")
        if errors:
            raise ConfigError("; ".join(errors))


@dataclass
class ParallelConfig:
    """Model-parallel layout; data parallelism takes the remaining ranks (world = tp * pp * cp * dp)."""

    tp: int = 1  # tensor parallel (megatron-core layers; whole SSM heads per rank)
    pp: int = 1  # pipeline stages
    virtual_pp: int = 1  # model chunks per stage (interleaved 1F1B when > 1)
    cp: int = 1  # context parallel: every sequence split into cp pieces, one per rank
    sequence_parallel: bool = False  # shard LayerNorm/dropout regions over the sequence (needs tp > 1)


@dataclass
class SlurmConfig:
    """The sbatch job that `h3pretrain slurm submit` renders (one task per GPU, see h3pretrain/slurm)."""

    nodes: int = 1
    gpus_per_node: int = 8  # 0: CPU-only nodes (then set tasks_per_node)
    tasks_per_node: int = 0  # training processes per node; 0 = gpus_per_node (one per GPU)
    cpus_per_task: int = 8
    time: str = "24:00:00"  # per job; a job that runs out of time saves, requeues and resumes
    partition: str = ""
    account: str = ""
    qos: str = ""
    job_name: str = ""  # default: the run directory's name (with an h3- prefix)
    exclusive: bool = True
    grace_s: int = 300  # --signal=B:USR1@grace_s: time to finish a step and write a checkpoint
    max_restarts: int = 3  # failures (not preemptions) requeued at most this many times per job
    sbatch: list[str] = field(default_factory=list)  # extra #SBATCH options, e.g. "--constraint=h100"
    setup: list[str] = field(default_factory=list)  # shell lines run before training (module load ...)


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

    task: str = "induction"
    mixer: str = "h3"  # h3 | attention | s4d (ModelConfig.mixer; no attention layers mixed in)
    vocab_size: int = 0  # 0: the paper's
    seq_len: int = 0  # 0: the paper's
    n_train: int = 5000
    n_test: int = 500
    d_model: int = 32
    n_layer: int = 2
    attn_num_heads: int = 1
    attn_rotary: bool = True  # our attention has no position embeddings; rotary gives it positions
    dropout: float = 0.1  # embedding and attention dropout
    loss: str = "all"  # all: next-token loss at every position (the reference); answer: the answer only
    epochs: int = 0  # 0: the paper's (induction 400, assoc_recall 200)
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    seed: int = 0

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
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


# ---------------------------------------------------------------------------------------------
# dict / YAML conversion and overrides


def _yaml():
    """PyYAML, imported when a file or override is read (the model code does not need it)."""
    import yaml

    return yaml


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


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
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
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
        value = raw if hint is str and not quoted else _yaml().safe_load(raw)
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
