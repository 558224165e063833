"""The training engine: this rank's model under any TP x PP x CP x DP layout (built by
h3pretrain.parallel), the optimizer, the LR schedule, the loss, one optimizer step over a batch,
the evaluation loss, and save/load of the layout-independent state (h3pretrain.checkpoint.canonical).

- PP = 1: DeepSpeed's engine runs forward, backward and step per micro-batch (ZeRO 1, 2 or 3).
- PP > 1: megatron-core's schedule runs the micro-batches through the stages (1F1B, interleaved with
  virtual_pp > 1); then the tied embedding's gradient is summed over the embedding group, and
  DeepSpeed reduces gradients over the data-parallel group and steps (ZeRO-1: DeepSpeed does not
  allow ZeRO-2/3 with pipelining).
DeepSpeed sees megatron's groups through DeepSpeedMPU: ZeRO partitions over the DP group and
gradient norms (clipping) add up over TP x PP, counting replicated parameters once.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import canonical, sharded
from ..config import Config, ConfigError
from ..model import HybridLM
from ..model.layers import LayerFactory
from ..model.regional import CompiledBlocks, apply_recompute, compile_wanted
from ..parallel.layout import DeepSpeedMPU, Layout, check_model, initialize, zero_group
from ..parallel.context import split_tokens
from ..parallel.layout import local_batch as batch_per_rank
from ..parallel.pipeline import StageModule, partition, run_schedule, schedule_config, tie_embedding_grads
from .optim import build_optimizer, deepspeed_config

log = logging.getLogger("h3pretrain.train")


@dataclass(frozen=True)
class StepResult:
    loss: float
    """The global mean loss of the step."""
    flags: tuple[float, ...]
    """Each flag the caller passed to train_step, summed over all ranks."""


class StepTimer:
    """Device time between start() and stop(): CUDA events on a GPU (read later, once the step's
    sync has passed them: no sync of its own), the wall clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if self.cuda else None
        self._times = [0.0, 0.0]

    def start(self) -> None:
        self._mark(0)

    def stop(self) -> None:
        self._mark(1)

    def _mark(self, i: int) -> None:
        if self.cuda:
            self._events[i].record()
        else:
            self._times[i] = time.perf_counter()

    def seconds(self) -> float:
        if self.cuda:
            return self._events[0].elapsed_time(self._events[1]) / 1e3
        return self._times[1] - self._times[0]


class TrainingEngine:
    def __init__(self, cfg: Config, device: torch.device, seq_len: int):
        import deepspeed

        self.cfg, self.device = cfg, device
        train_cfg, parallel_cfg = cfg.train, cfg.parallel
        if train_cfg.zero_stage not in (1, 2, 3):
            raise ConfigError(f"train.zero_stage must be 1, 2 or 3, not {train_cfg.zero_stage}")
        if parallel_cfg.pp > 1 and train_cfg.zero_stage != 1:
            raise ConfigError(f"parallel.pp = {parallel_cfg.pp} needs train.zero_stage = 1 (DeepSpeed forbids ZeRO-2/3 "
                             "with pipelining)")
        self.layout: Layout = initialize(parallel_cfg)
        from megatron.core import parallel_state as ps

        self.tp_group = ps.get_tensor_model_parallel_group()
        self.zero_group = zero_group()
        layout = self.layout
        check_model(cfg.model, parallel_cfg, seq_len)
        self.chunks = partition(cfg.model, layout.pp, layout.virtual_pp, seq_len)
        local_chunks = [c for c in self.chunks if c.stage == layout.pp_rank]
        last = len(self.chunks) - 1
        if layout.tp > 1:
            from ..parallel.tensor import MegatronLayerFactory, sum_sequence_parallel_grads

            factory: LayerFactory = MegatronLayerFactory(sequence_parallel=parallel_cfg.sequence_parallel)
        else:
            factory = LayerFactory()
        self.context = None
        if layout.cp > 1:
            from ..parallel.context import ContextParallel

            self.context = factory.context = ContextParallel(ps.get_context_parallel_group())
        self.models: list[HybridLM] = []
        for c in local_chunks:
            kw = dict(layer_ids=list(c.layers), pre_process=c.index == 0, post_process=c.index == last)
            if layout.tp == 1:  # built directly from the per-part seeds
                model = HybridLM(cfg.model, factory, init_seed=train_cfg.seed, **kw)
            else:  # the same full-size weights, then this rank's shards
                full = HybridLM(cfg.model, LayerFactory(), init_seed=train_cfg.seed, **kw).state_dict()
                model = HybridLM(cfg.model, factory, **kw)
                canonical.load([model], full.__getitem__, layout.tp_rank, layout.tp, optimizer_state=False)
                del full
            if parallel_cfg.sequence_parallel:
                sum_sequence_parallel_grads(model)
            if layout.pp > 1 and not kw["pre_process"] and kw["post_process"]:
                model.backbone.embeddings.word_embeddings.weight.ds_pipe_replicated = True
            self.models.append(model.to(device))
        blocks = [block for model in self.models for block in model.backbone.layers.values()]
        apply_recompute(blocks, train_cfg.recompute)
        self.compiling: CompiledBlocks | None = None
        if compile_wanted(train_cfg.compile, device):
            if train_cfg.zero_stage == 3:
                # ZeRO-3 then gathers a block's parameters once, in the block's own pre-forward hook
                # (outside the traced code), instead of per submodule inside the compiled graph.
                from deepspeed.utils.z3_leaf_module import set_z3_leaf_module

                for block in blocks:
                    set_z3_leaf_module(block, True)
            self.compiling = CompiledBlocks(blocks, strict=train_cfg.compile is True)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if train_cfg.precision == "bf16" else nullcontext()
        if self.compiling is not None and not self.compiling.strict and layout.pp == 1:
            self._compile_now(seq_len)  # before DeepSpeed hooks the gradients

        self._timer = StepTimer(device)
        self.local_batch = local_batch = batch_per_rank(train_cfg, layout.dp)
        if layout.pp == 1:
            self.module: nn.Module = self.models[0]
            ds = deepspeed_config(train_cfg, layout.dp, cp=layout.cp)
        else:
            sched = schedule_config(cfg.model, layout.tp, layout.pp, layout.virtual_pp, parallel_cfg.sequence_parallel,
                                    finalize_grads=self._finalize_grads)
            self.stages = [StageModule(m, sched, last=m.post_process, seq_first=parallel_cfg.sequence_parallel)
                           for m in self.models]
            self.module = nn.ModuleList(self.stages)
            # the schedule does the micro-batching: DeepSpeed sees one "micro-batch" per step
            ds = deepspeed_config(train_cfg, layout.dp, micro_batch=local_batch, cp=layout.cp)
            ds["zero_optimization"].setdefault("contiguous_gradients", False)
        optimizer, self.optimizer_name = build_optimizer(self.module, train_cfg)
        self.engine, _, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer, config=ds,
                                                    mpu=DeepSpeedMPU())
        self._last_micro = False
        reduce_gradients = self.engine._backward_epilogue  # the data-parallel gradient reduction

        def timed_epilogue():
            if self._last_micro:
                self._timer.stop()  # this rank's own work ends here; next, the ranks wait for the slowest
            return reduce_gradients()

        self.engine._backward_epilogue = timed_epilogue
        # DeepSpeed's WarmupCosineLR starts at iteration -1 (lr 0) and its linear warmup is 0 at
        # iteration 0: two steps without learning. Step k (1-based) uses iteration k: lr * k / warmup.
        self.engine.lr_scheduler.step(1)
        self._adam = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        _materialize_adam_state(self._adam, getattr(self.engine.optimizer, "fp32_partitioned_groups_flat", None),
                                getattr(self.engine.optimizer, "sub_group_to_group_id", None))
        _set_adam_step(self._adam, 0)
        # DeepSpeed ZeRO-1/2 links each parameter to its optimizer-state fragments once, after the
        # first step of the first param group (stage_1_and_2.py `_lazy_init_hp_params_optimizer_state`),
        # when later groups have no state yet; with the state now in place, link them all.
        if hasattr(self.engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
            self.engine.optimizer._hp_optimizer_states_linked = False
            self.engine.optimizer._lazy_init_hp_params_optimizer_state()

    @property
    def compiled(self) -> bool:
        """The blocks run compiled (False once train.compile=auto fell back to eager)."""
        return self.compiling is not None and self.compiling.active

    @property
    def compile_failure(self) -> str | None:
        return self.compiling.failure if self.compiling is not None else None

    def _compile_now(self, seq_len: int) -> None:
        """Compiles the blocks before the first step with one forward and backward of a dummy
        micro-batch at the training shapes (the real steps then find the graphs compiled), so that a
        compile failure under train.compile=auto is known, and said, before training starts. Every
        rank does the same (the layers' collectives match); the RNG and the gradients are left as
        they were."""
        model = self.models[0]
        ids = self._local(torch.zeros(self.cfg.train.micro_batch, seq_len + 1, dtype=torch.long))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            with self.autocast:
                logits = model(ids[:, :-1])
            model.loss(logits, ids[:, 1:]).backward()
        for p in model.parameters():
            p.grad = None

    # ---- steps ----------------------------------------------------------------------------

    def _finalize_grads(self, *_args, **_kwargs) -> None:
        tie_embedding_grads(self.stages)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        inputs, targets = split_tokens(batch)
        with self.autocast:
            logits = self.engine(inputs)
        return self.models[0].loss(logits, targets)

    def _reduce(self, local: torch.Tensor | float, flags: Sequence[float] = ()) -> tuple[float, tuple[float, ...]]:
        """One all-reduce and one host read: the loss lives on the last stage (every TP, CP and DP rank
        of it), so its mean over those ranks, on every rank; and each flag summed over all ranks."""
        layout = self.layout
        value = torch.as_tensor(local, dtype=torch.float64, device=self.device).reshape(1)
        if not layout.is_last_stage:
            value = torch.zeros_like(value)
        t = torch.cat([value, torch.tensor([float(f) for f in flags], dtype=torch.float64, device=self.device)])
        dist.all_reduce(t)
        loss, *summed = t.tolist()
        return loss / (layout.tp * layout.dp * layout.cp), tuple(summed)

    def _local(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the global batch -> what it computes: its piece of every sequence
        under context parallelism (the loss is then the mean over the piece; DeepSpeed's average over
        DP x CP makes the gradient that of the whole sequence's mean)."""
        batch = batch.to(self.device, non_blocking=True)
        return self.context.piece(batch) if self.context is not None else batch

    def train_step(self, batch: torch.Tensor, before_step=None, flags: Sequence[float] = ()) -> StepResult:
        """One optimizer step on this rank's rows of the global batch. The step reads the device once:
        the losses of its micro-batches stay on the device until one all-reduce that also sums the
        caller's `flags` over all ranks (a stop request rides along at no extra sync).
        before_step(): called with the reduced gradients in place, just before the update."""
        self._timer.start()
        batch = self._local(batch)
        micro = list(batch.split(self.cfg.train.micro_batch))
        if self.layout.pp == 1:
            losses = []
            for i, chunk in enumerate(micro):
                loss = self._loss(chunk)
                self._last_micro = i == len(micro) - 1
                self.engine.backward(loss)  # stops the timer where the gradient reduction begins
                if before_step is not None and i == len(micro) - 1:
                    before_step()
                self.engine.step()
                losses.append(loss.detach())
            local = torch.stack(losses).double().mean()
        else:
            with self.autocast:
                local = run_schedule(self.stages, micro)
            self._timer.stop()
            self.engine.allreduce_gradients()
            if before_step is not None:
                before_step()
            self.engine.step()
        loss, summed = self._reduce(local, flags)
        return StepResult(loss, summed)

    def compute_seconds(self) -> float:
        """This rank's own time in the last step: its forwards and backwards, up to the gradient
        reduction where the data-parallel ranks wait for each other (so a slow rank shows here, not in
        the wall time; with ZeRO-2/3 or pipelining some waiting happens inside it)."""
        return self._timer.seconds()

    @torch.no_grad()
    def eval_loss(self, batch: torch.Tensor) -> float:
        batch = self._local(batch)
        if self.layout.pp == 1:
            local = self._loss(batch)
        else:
            with self.autocast:
                local = run_schedule(self.stages, list(batch.split(self.cfg.train.micro_batch)), forward_only=True)
        return self._reduce(local)[0]

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def state_finite(self) -> bool:
        """Collective: every weight and Adam moment of every rank is finite (checked before a
        checkpoint is written and after one is loaded)."""
        tensors = [p for m in self.models for p in m.parameters()]
        tensors += [p for g in self._adam.param_groups for p in g["params"]]
        for flat in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO-1/2, ZeRO-3
            tensors += list(getattr(self.engine.optimizer, flat, None) or [])
        tensors += [t for state in self._adam.state.values() for t in state.values()
                    if torch.is_tensor(t) and t.is_floating_point()]
        unique = {id(t): t for t in tensors if t.numel()}  # the fp32 partitions are listed twice
        bad = torch.zeros((), dtype=torch.float64, device=self.device)
        for t in unique.values():
            bad += (~torch.isfinite(t.detach())).any()
        dist.all_reduce(bad)
        return not bool(bad)

    def update_skipped(self) -> bool:
        """DeepSpeed applied no update in the last step: the gradients were not finite (it checks them
        on every rank before the optimizer step and skips it, leaving weights and Adam state as they were)."""
        return bool(getattr(self.engine.optimizer, "overflow", False))

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def num_parameters(self) -> int:
        """Parameters of the whole model (all stages and shards), counted once."""
        layout = self.layout
        numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 - ZeRO-3 keeps a parameter's size aside
        local = sum(numel(p) if not canonical.is_tp_sharded(p) else numel(p) * layout.tp
                    for _, p in canonical.named_params(self.models) if not getattr(p, "ds_pipe_replicated", False))
        t = torch.tensor([local if layout.speaks_for_stage else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t)

    # ---- canonical state ------------------------------------------------------------------

    def collect(self, optimizer_state: bool = True, grads: bool = False) -> dict[str, torch.Tensor]:
        """Collective. This stage's full tensors (see canonical.collect)."""
        return canonical.collect(self.models, self.tp_group, self.layout.tp, optimizer_state, grads)

    def save(self, directory: Path):
        """Collective: the state copied to host memory. Returns finish(group) -> the files this rank
        wrote, which writes it (any thread, any time later; collective over `group`). Sharded: every
        rank its own share (h3pretrain.checkpoint.sharded); gathered: the first TP, CP and DP rank
        of each stage its full tensors. Rank 0 also writes the LR scheduler state."""
        import copy

        layout = self.layout
        scheduler = copy.deepcopy(self.engine.lr_scheduler.state_dict()) if dist.get_rank() == 0 else None
        if self.cfg.train.checkpoint_format == "sharded":
            state = sharded.collect_owned(self.models, layout.tp_rank, layout.tp)
            nbytes = sum(box.numel() * box.element_size() for p in state.values() for _, box in p.pieces)

            def write_tensors(group) -> list[Path]:
                return sharded.write(state, directory, group)
        else:
            tensors = self.collect(optimizer_state=True)
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values()) if layout.speaks_for_stage else 0

            def write_tensors(group) -> list[Path]:
                if not layout.speaks_for_stage:
                    return []
                return canonical.write_stage(directory, tensors, layout.pp_rank, layout.pp)

        def finish(group) -> list[Path]:
            written = write_tensors(group)
            if scheduler is not None:
                written.append(canonical.write_scheduler(directory, scheduler))
            return written

        finish.nbytes = nbytes  # what this rank writes
        return finish

    def load(self, directory: Path, step: int, group=None, updates: int | None = None) -> None:
        """Collective (over `group`, default all ranks). Restores weights, Adam state and its step
        count (`updates`: the updates applied, `step` less the skipped ones), and the LR schedule,
        from a checkpoint of either format and any layout."""
        updates = step if updates is None else updates
        layout = self.layout
        if sharded.is_sharded(directory):
            sharded.load_into(self.models, directory, layout.tp_rank, layout.tp, group)
        else:
            canonical.load(self.models, canonical.tensor_source(directory), layout.tp_rank, layout.tp,
                           zero_dp_group=self.zero_group)
        _set_adam_step(self._adam, updates)
        self.engine.skipped_steps = step - updates
        sched = self.engine.lr_scheduler
        sched.load_state_dict(canonical.read_scheduler(directory))
        sched.step(sched.last_batch_iteration)  # load_state_dict leaves the optimizer's lr as it was
        self.engine.global_steps = step


def _set_adam_step(optimizer: torch.optim.Optimizer, step: int) -> None:
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = torch.full_like(state["step"], float(step)) if torch.is_tensor(state["step"]) else step


@torch.no_grad()
def _materialize_adam_state(optimizer: torch.optim.Optimizer, zero3_flat: list | None = None,
                            zero3_group_of: dict | None = None) -> None:
    """Adam creates its state at the first step; a resume must write into it before that. A step
    with zero gradients and lr 0 creates it and leaves every parameter exactly as it was.
    ZeRO-3 keeps the optimizer's param_groups empty between steps (stage3.py `_optimizer_step` puts
    each flat fp32 partition in for its own step): put them in for this one."""
    if zero3_flat is not None:
        saved = [g["params"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["params"] = []
        for i, flat in enumerate(zero3_flat):
            optimizer.param_groups[zero3_group_of[i]]["params"].append(flat)
        try:
            _materialize_adam_state(optimizer)
        finally:
            for g, params in zip(optimizer.param_groups, saved):
                g["params"] = params
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if all(p in optimizer.state and "exp_avg" in optimizer.state[p] for p in params):
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    grads = [p.grad for p in params]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    for p, grad in zip(params, grads):
        p.grad = grad
