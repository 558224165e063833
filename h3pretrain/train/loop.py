"""The training loop: DeepSpeed ZeRO data parallelism, bf16 autocast, exact resume, preemption.

    torchrun --nproc_per_node=N -m h3pretrain.cli train --config launch/configs/tiny.yaml

Exit codes: 0 finished (or already finished); EXIT_PREEMPTED (75) saved after SIGTERM/SIGUSR1,
resume from `latest`; anything else is a failure.
"""
from __future__ import annotations

import datetime
import logging
import math
import os
import queue
import socket
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .. import jsonio
from ..config import Config, ConfigError, save_yaml, to_dict
from ..errors import UserError
from ..data import TokenBatches, TrainingData
from .engine import TrainingEngine
from .lock import RunLock
from .spikes import SkipLog, Spike, SpikeWindow, skipped_range
from .watchdog import Watchdog
from ..quiet import silence_third_party_noise
from ..parallel.pipeline import describe as describe_partition
from ..checkpoint import CheckpointManager
from .kernel_choice import choose_flashconv
from ..model.flops import train_flops_per_token
from .metrics import Tracker, memory_gb, peak_tflops, trim_metrics
from .signals import EXIT_DIVERGED, EXIT_FINISHED, EXIT_PREEMPTED, StopRequest

log = logging.getLogger("h3pretrain.train")


class Stopped(Exception):
    """A stop signal arrived while evaluating or waiting for data."""


class Diverged(Exception):
    """train.max_bad_steps steps in a row had a non-finite loss or gradient norm, or a weight went
    non-finite (a checkpoint of it is never written)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int, torch.device]:
    """Process group from torchrun's (or SLURM-derived) environment; one process works alone.
    timeout_s: of every collective on it (parallel.timeout_s)."""
    silence_third_party_noise()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    import deepspeed

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def any_rank(flag: bool, device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class Prefetcher:
    """Reads the next batches in a thread; waiting for one honours stop requests."""

    def __init__(self, loader: TokenBatches, start: int, stop: StopRequest, depth: int = 2):
        self.loader, self.stop = loader, stop
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self._halt = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(start,), daemon=True)
        self.thread.start()

    def _run(self, position: int) -> None:
        try:
            while not self._halt.is_set():
                item = self.loader.batch_at(position)
                while not self._halt.is_set():
                    try:
                        self.queue.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                position += self.loader.global_batch
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self.queue.put(err)

    def get(self) -> torch.Tensor:
        while True:
            try:
                item = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self.stop.requested:
                    raise Stopped("stop requested while waiting for data") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def close(self) -> None:
        self._halt.set()


def _check_data(cfg: Config, data: TrainingData) -> None:
    for path, m in zip(data.paths, data.manifests):
        if cfg.train.eval_every and cfg.data.eval_split not in m.data["splits"]:
            raise ConfigError(f"data.eval_split {cfg.data.eval_split!r} is not a split of {path} (it has "
                              f"{', '.join(sorted(m.data['splits']))}); or set train.eval_every=0")
    manifest = data.manifest
    vocab = manifest.vocab_size
    if cfg.model.vocab_size != vocab:
        raise ConfigError(f"model.vocab_size is {cfg.model.vocab_size} but the data's tokenizer has {vocab} "
                          f"tokens: set model.vocab_size={vocab}")
    if cfg.data.tokenizer:
        from data_prep.tokenizer import sha256_file, tokenizer_file

        try:
            digest = sha256_file(tokenizer_file(cfg.data.tokenizer))
        except UserError as err:
            raise ConfigError(f"data.tokenizer {cfg.data.tokenizer}: {err}") from None
        if digest != manifest.tokenizer_sha256:
            raise ConfigError(f"data.tokenizer {cfg.data.tokenizer} (sha256 {digest[:12]}...) is not the tokenizer "
                              f"{cfg.data.path} was prepared with (sha256 {manifest.tokenizer_sha256[:12]}...)")


def _data_changes(recorded: dict, now: dict) -> list[str]:
    changes = [f"{key} {recorded.get(key)} -> {now.get(key)}" for key in ("seq_len", "tokenizer_sha256", "weights")
               if recorded.get(key) != now.get(key)]
    for split in sorted(set(recorded.get("shards", {})) | set(now["shards"])):
        old, new = recorded.get("shards", {}).get(split, []), now["shards"].get(split, [])
        if old != new:
            changed = sum(a != b for a, b in zip(old, new)) + abs(len(old) - len(new))
            changes.append(f"{split} shards: {len(old)} -> {len(new)}, {changed} differ")
    return changes


def _check_model_shape(cfg: Config, state: dict, checkpoint: Path) -> None:
    """The checkpoint's model must have this config's parameter shapes (dropout and the like may change)."""
    from ..config import ModelConfig, from_dict
    from ..model import HybridLM

    recorded = state.get("config", {}).get("model")
    if not isinstance(recorded, dict):
        return
    old = from_dict(ModelConfig, recorded, f"{checkpoint}/trainer_state.json:config.model")
    with torch.device("meta"):
        shapes = [{k: tuple(v.shape) for k, v in HybridLM(m).state_dict().items()} for m in (old, cfg.model)]
    if shapes[0] != shapes[1]:
        now = to_dict(cfg.model)
        fields = [f"model.{k} {v} (now {now[k]})" for k, v in to_dict(old).items() if now.get(k) != v]
        raise ConfigError(f"{checkpoint} holds another model shape: {', '.join(fields[:6])}; resume with the run's "
                          "model settings, or start a new run (another train.run_dir)")


class _StartGuard:
    """Rank 0's status.json says `starting` while the slow start-up runs; if the start is refused
    (a UserError) the run directory is left as it was found."""

    def __init__(self, run_dir: Path, rank: int):
        self.run_dir, self.rank = run_dir, rank
        self.status = run_dir / "status.json"
        self.created_dir = not run_dir.exists()
        self.previous = self.status.read_bytes() if self.status.is_file() else None
        self.last: dict = {}
        self.running = False  # set once the first step is under way: from then on a failure is recorded

    def failed(self, err: BaseException) -> None:
        if self.last:
            self.write({**self.last, "state": "failed", "error": f"{type(err).__name__}: {err}"[:500],
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def write(self, status: dict) -> None:
        self.last = status
        if status["state"] == "running":
            self.running = True
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.run_dir / "status.json.tmp"
            tmp.write_text(jsonio.dumps(status, indent=1) + "\n")
            os.replace(tmp, self.status)

    def undo(self) -> None:
        if self.rank != 0:
            return
        if self.previous is not None:
            self.status.write_bytes(self.previous)
        else:
            self.status.unlink(missing_ok=True)
            if self.created_dir and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()


def _rank_times(compute_s: float, data_wait_s: float, device) -> dict[str, float]:
    """Collective (on log steps): the slowest and fastest rank's own step time (compute, up to the
    gradient reduction) and the longest data wait, with which rank, so a slow node shows early."""
    mine = torch.tensor([compute_s, data_wait_s], dtype=torch.float64, device=device)
    every = torch.empty(dist.get_world_size() * 2, dtype=torch.float64, device=device)
    dist.all_gather_into_tensor(every, mine)
    every = every.view(-1, 2)
    compute, wait = every[:, 0].tolist(), every[:, 1].tolist()
    slow = max(range(len(compute)), key=compute.__getitem__)
    fast = min(range(len(compute)), key=compute.__getitem__)
    waits = max(range(len(wait)), key=wait.__getitem__)
    return {"step_time_max_s": compute[slow], "step_time_max_rank": slow, "step_time_min_s": compute[fast],
            "step_time_min_rank": fast, "data_wait_max_s": wait[waits], "data_wait_max_rank": waits}


def _trained_per_source(loader, batches: int, skipped_ranges: list[dict], global_batch: int) -> list[int]:
    """Samples trained on per source in the first `batches` global batches, less those skipped."""
    out = loader.samples_per_source(batches * global_batch)
    for r in skipped_ranges:
        end, start = (loader.samples_per_source(b * global_batch) for b in (r["last_batch"] + 1, r["first_batch"]))
        out = [n - (e - s) for n, e, s in zip(out, end, start)]
    return out


def _say_rollback(record: dict, tracker: Tracker | None, again: bool) -> None:
    """Rank 0 (the one with a tracker): the log line of a rollback about to be made or applied again."""
    if tracker is None:
        return
    what = (f"global batches {record['first_batch']}-{record['last_batch']} ({record['batches']}) skipped; recorded "
            f"in {tracker.run_dir / SkipLog.NAME}")
    if again:
        log.warning("applying the rollback recorded for the spike at step %d: back at step %d, %s",
                    record["spike_step"], record["rolled_back_to"], what)
    else:
        log.warning("step %d: %s: rolling back to %s (step %d), %s", record["spike_step"],
                    Spike(record["loss"], record["window_mean"], record["window_std"], record["threshold"]).describe(),
                    record["checkpoint"], record["rolled_back_to"], what)


def _log_rollback(record: dict, tracker: Tracker | None) -> None:
    """Rank 0: the `rollback` record of metrics.jsonl (and mlflow), at the step the run went back to."""
    if tracker is not None:
        tracker.log(record["rolled_back_to"], {k: record[k] for k in (
            "spike_step", "loss", "window_mean", "window_std", "threshold", "first_batch", "last_batch", "batches")},
            kind="rollback")


def _compile_said(engine: TrainingEngine) -> str:
    if engine.compile_failure:
        return f"off (failed, running eager: {engine.compile_failure})"
    return "on" if engine.compiled else "off"


def train(cfg: Config, stop: StopRequest | None = None) -> int:
    """Trains (or resumes) one run. `stop` is installed by the caller as early as it can be (the CLI
    does so before importing torch), so a preemption during start-up is honoured too."""
    stop = stop or StopRequest().install()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg.validate()
    train_cfg = cfg.train
    run_dir = Path(train_cfg.run_dir)
    data = TrainingData(cfg.data_sources(), [x.name for x in cfg.data.sources], mixture=bool(cfg.data.sources))
    _check_data(cfg, data)
    if train_cfg.resume not in ("auto", "none") and not Path(train_cfg.resume).is_dir():
        raise ConfigError(f"train.resume={train_cfg.resume}: no such checkpoint directory")
    rank = int(os.environ.get("RANK", 0))
    guard = _StartGuard(run_dir, rank)
    lock = RunLock(run_dir) if rank == 0 else None
    if lock:
        lock.acquire()  # refused: RunDirInUse, nothing written
    try:
        started = {"state": "starting", "step": None, "steps": train_cfg.steps,
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if stop.requested:
            guard.write({**started, "state": "preempted", "signal": stop.signal_name})
            return EXIT_PREEMPTED
        guard.write(started)
        return _run(cfg, data, stop, guard)
    except BaseException as err:
        if isinstance(err, UserError) and not guard.running:
            if lock:
                lock.release()
            guard.undo()  # a refused start: the run directory stays as it was
        else:
            guard.failed(err)
        raise
    finally:
        if lock:
            lock.release()


def _run(cfg: Config, data: TrainingData, stop: StopRequest, guard: _StartGuard) -> int:
    train_cfg = cfg.train
    run_dir = Path(train_cfg.run_dir)
    rank, world, device = init_distributed(cfg.parallel.timeout_s)
    seq_len = data.manifest.data["seq_len"]

    def starting_stop() -> None:
        if any_rank(stop.requested, device):
            raise Stopped("stop requested during start-up")

    torch.manual_seed(train_cfg.seed)
    try:
        starting_stop()
        engine = TrainingEngine(cfg, device, seq_len)
        layout = engine.layout
        if rank == 0:
            log.info("layout %s; pipeline partition:\n%s", layout.describe(), describe_partition(cfg.model, engine.chunks))
        kernels = choose_flashconv(cfg, device, seq_len // layout.cp, layout.tp, layout.cp)
        if rank == 0:
            log.info("FlashConv: %s (%s) | torch.compile: %s | recompute: %s", kernels["implementation"],
                     kernels["reason"], _compile_said(engine), train_cfg.recompute)
        starting_stop()
        loader = data.train_batches(global_batch=train_cfg.global_batch, dp_rank=layout.dp_rank, dp_size=layout.dp,
                                    seed=cfg.data.seed)
        ckpt = CheckpointManager(run_dir / "checkpoints", train_cfg.keep_last, train_cfg.hash_checkpoints,
                                 timeout_s=cfg.parallel.timeout_s)
        step, tokens, last_eval = 0, 0, 0
        skipped, bad_in_a_row = 0, 0  # updates not applied (non-finite steps); such steps just now
        offset, skipped_ranges = 0, []  # global batches skipped by rollbacks, and their ranges
        window = SpikeWindow(train_cfg.spike_window, train_cfg.spike_z)
        skip_log = SkipLog(run_dir)
        rollbacks_here = 0  # rollbacks to the newest checkpoint

        def restore(path: Path, state: dict) -> list[dict]:
            """Collective: the run as it was at checkpoint `path`, with the rollbacks recorded to it
            applied (returned)."""
            nonlocal step, tokens, last_eval, skipped, bad_in_a_row, offset, skipped_ranges, rollbacks_here
            skipped, bad_in_a_row = state.get("skipped_updates", 0), state.get("bad_steps_in_a_row", 0)
            engine.load(path, state["step"], ckpt.group, updates=state["step"] - skipped)
            if not engine.state_finite():
                raise ConfigError(f"{path} holds a non-finite weight or optimizer moment: resume from an "
                                  "earlier checkpoint (train.resume=<run>/checkpoints/step-NNNNNNNN)")
            ckpt.restore_rng(path, same_layout=state.get("layout") == layout.shape())
            loader.load_state_dict(state["data"])
            step, tokens = state["step"], state["tokens"]
            last_eval = state.get("last_eval_step", step)
            offset, skipped_ranges = state.get("data_offset_batches", 0), list(state.get("skipped_batches", []))
            window.load_state_dict(state.get("spike_window", []))
            applied = skip_log.applicable(step, offset)
            for record in applied:
                offset = record["offset_before"] + record["batches"]
                skipped_ranges.append(skipped_range(record))
            rollbacks_here = len(applied)
            return applied

        resume_from, reapplied = None, []
        if train_cfg.resume == "auto":
            resume_from = ckpt.find_resumable()
        elif train_cfg.resume != "none":
            resume_from = Path(train_cfg.resume)
            problem = ckpt.verify(resume_from)
            if problem:
                raise ConfigError(f"train.resume={resume_from}: {problem}")
        if resume_from is not None:
            state = ckpt.read_state(resume_from)
            recorded = state.get("data_manifest")
            changes = _data_changes(recorded, data.fingerprint()) if recorded else []
            if changes and not train_cfg.allow_data_change:
                what = f"data.sources ({', '.join(data.paths)})" if data.mixture else f"data.path {data.paths[0]}"
                raise ConfigError(f"{what} differs from the data {resume_from} was trained on "
                                  f"({'; '.join(changes[:4])}); use the run's data, or set "
                                  "train.allow_data_change=true to continue on this data")
            if changes and rank == 0:
                log.warning("continuing on changed data (train.allow_data_change): %s", "; ".join(changes))
            _check_model_shape(cfg, state, resume_from)
            reapplied = restore(resume_from, state)
            if rank == 0:
                was = state.get("layout")
                log.info("resumed from %s at step %d (%s tokens)%s", resume_from, step, f"{tokens:,}",
                         "" if was == layout.shape() else f", resharded from layout {was}")
        starting_stop()
    except Stopped as why:
        if rank == 0:
            log.warning("%s (%s): exiting with %d before the first step", why, stop.signal_name, EXIT_PREEMPTED)
        guard.write({"state": "preempted", "step": None, "steps": train_cfg.steps, "signal": stop.signal_name,
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return EXIT_PREEMPTED

    eval_due = bool(train_cfg.eval_every) and step > 0 and step % train_cfg.eval_every == 0 and last_eval < step
    if rank == 0:  # only once the config has been accepted: a rejected one never replaces the run's
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
        if resume_from is not None and train_cfg.resume != "auto":
            ckpt.set_aside_newer(resume_from)
        moved = trim_metrics(run_dir, step, frozenset({"rollback", *(["eval"] if eval_due else [])}))
        if moved:
            log.info("metrics.jsonl: %d records after step %d (from the continuation that was lost) moved to "
                     "metrics.superseded.jsonl", moved, step)
    tracker = Tracker(cfg, run_dir, train_cfg.steps) if rank == 0 else None
    for record in reapplied:
        _say_rollback(record, tracker, again=True)
        _log_rollback(record, tracker)
    if tracker:
        tracker.log_params({"flashconv.implementation": kernels["implementation"],
                            "flashconv.reason": kernels["reason"], "train.compiled": str(engine.compiled),
                           **({"train.compile_failure": engine.compile_failure} if engine.compile_failure else {})})
    flops_per_token = train_flops_per_token(cfg.model, seq_len)
    peak = peak_tflops(train_cfg.peak_tflops) * 1e12 * world
    n_params = engine.num_parameters()
    if rank == 0:
        log.info("model %s parameters | %d ranks (%s) | ZeRO-%d | %s | global batch %d x %d tokens, micro %d | %s",
                 f"{n_params:,}", world, layout.describe(), train_cfg.zero_stage, engine.optimizer_name, train_cfg.global_batch,
                 seq_len, train_cfg.micro_batch, train_cfg.precision)
    data_fingerprint = data.fingerprint()

    def evaluate_source(path: str) -> float:
        val = TokenBatches(path, split=cfg.data.eval_split, global_batch=train_cfg.micro_batch * layout.dp,
                           dp_rank=layout.dp_rank, dp_size=layout.dp, shuffle=False)
        total = 0.0
        for _ in range(train_cfg.eval_batches):
            if any_rank(stop.requested, device):
                raise Stopped("stop requested during evaluation")
            total += engine.eval_loss(val.next())
        return total / train_cfg.eval_batches  # eval_loss is already the mean over all ranks

    def evaluate() -> dict[str, float]:
        """The loss on the eval split; with a mixture, per source and their mean by weight."""
        engine.train(False)
        losses = [evaluate_source(path) for path in data.paths]
        engine.train(True)
        loss = sum(share * x for share, x in zip(data.shares(), losses))
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if data.mixture:
            out.update({f"loss/{name}": x for name, x in zip(data.names, losses)})
        return out

    def run_eval() -> None:
        nonlocal last_eval
        ev = evaluate()
        last_eval = step
        if rank == 0:
            tracker.log(step, ev, kind="eval")
            per_source = "".join(f" | {k[5:]} {v:.4f}" for k, v in ev.items() if k.startswith("loss/"))
            print(f"eval step {step} | loss {ev['loss']:.4f} | ppl {ev['perplexity']:.2f}{per_source}", flush=True)

    def save(reason: str) -> Path:
        nonlocal rollbacks_here
        state = {"step": step, "tokens": tokens,
                 "data": {**loader.state_dict(), "position": (step + offset) * train_cfg.global_batch},
                 "world_size": world, "layout": layout.shape(), "reason": reason, "config": to_dict(cfg),
                 "last_eval_step": last_eval, "data_manifest": data_fingerprint, "skipped_updates": skipped,
                 "bad_steps_in_a_row": bad_in_a_row, "data_offset_batches": offset,
                 "skipped_batches": skipped_ranges, "spike_window": window.state_dict()}
        if not engine.state_finite():
            raise Diverged(f"step {step}: a weight or optimizer moment is not finite; checkpoint not written")
        covered = tracker.take_pending() if tracker else None
        t0 = time.perf_counter()
        saved_step = step

        def complete() -> None:  # rank 0, once the checkpoint counts (within ckpt.save when synchronous)
            tracker.send(covered)
            log.info("saved checkpoint %s (%s) in %.2f s", ckpt.root / f"step-{saved_step:08d}", reason,
                     time.perf_counter() - t0)

        path = ckpt.save(engine.save, step, state, background=train_cfg.async_checkpoint,
                         on_complete=complete if tracker else None)
        rollbacks_here = 0
        if tracker:  # what the save cost the training thread (with a background write: the copy to host memory)
            tracker.log(step, {"blocked_s": time.perf_counter() - t0,
                               "background": float(train_cfg.async_checkpoint)}, kind="checkpoint")
        return path

    def write_status(state: str, extra: dict | None = None) -> None:
        guard.write({"state": state, "step": step, "steps": train_cfg.steps, "tokens": tokens,
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "flashconv": kernels["implementation"],
                     "compiled": engine.compiled, **({"skipped_batches": skipped_ranges} if skipped_ranges else {}),
                     **({"compile_failure": engine.compile_failure} if engine.compile_failure else {}), **(extra or {})})

    if step >= train_cfg.steps:
        if rank == 0:
            log.info("run already finished (step %d of %d)", step, train_cfg.steps)
        write_status("finished")
        if tracker:
            tracker.close("FINISHED")
        return EXIT_FINISHED

    engine.train(True)
    watchdog = Watchdog(run_dir, rank, train_cfg.hang_timeout_s)
    first_step = step + 1
    prefetch = Prefetcher(loader, (step + offset) * train_cfg.global_batch, stop)

    def rollback(spike: Spike) -> bool:
        """Collective. Back to the newest checkpoint, skipping data through the spike's batch; False
        when there is no checkpoint to go back to."""
        nonlocal prefetch, eval_due
        ckpt.wait()
        target = ckpt.find_resumable()
        state = ckpt.read_state(target) if target is not None else None
        if state is None or state["step"] >= step:
            if rank == 0:
                log.warning("step %d: %s; no checkpoint before it to roll back to: going on", step, spike.describe())
            return False
        if rollbacks_here >= train_cfg.spike_max_rollbacks:
            raise Diverged(f"step {step}: {spike.describe()} after {rollbacks_here} rollbacks to {target} "
                           f"(train.spike_max_rollbacks={train_cfg.spike_max_rollbacks})")
        back_to = state["step"]
        batches = max(train_cfg.spike_skip_batches, step - back_to)
        record = {"spike_step": step, **spike.metrics(), "rolled_back_to": back_to, "checkpoint": target.name,
                  "offset_before": offset, "batches": batches, "first_batch": back_to + offset,
                  "last_batch": back_to + offset + batches - 1}
        if rank == 0:
            skip_log.append(record)
        _say_rollback(record, tracker, again=False)
        prefetch.close()
        restore(target, state)
        eval_due = bool(train_cfg.eval_every) and step % train_cfg.eval_every == 0 and last_eval < step
        if tracker:
            tracker.rewind(step, frozenset({"eval"} if eval_due else ()))
        _log_rollback(record, tracker)
        prefetch = Prefetcher(loader, (step + offset) * train_cfg.global_batch, stop)
        write_status("running")
        return True

    last_saved, last_loss = step, float("nan")
    compile_failure_said = engine.compile_failure
    write_status("running")
    try:
        while step < train_cfg.steps:
            if eval_due:  # the evaluation of this checkpoint's step was cut short by the stop that saved it
                run_eval()
                eval_due = False
            t0 = time.time()
            watchdog.arm(step + 1, first=step + 1 == first_step)  # the data wait counts: a hung read too
            batch = prefetch.get()
            data_wait = time.time() - t0
            lr = engine.lr()  # what this step's optimizer update uses
            result = engine.train_step(batch, flags=(stop.requested,))  # the step's one host sync
            watchdog.disarm()
            last_loss, stop_asked = result.loss, result.flags[0] > 0
            if not math.isfinite(last_loss) or engine.update_skipped():
                what = f"loss {last_loss}" if not math.isfinite(last_loss) else "global gradient norm not finite"
                skipped, bad_in_a_row = skipped + engine.update_skipped(), bad_in_a_row + 1
                if rank == 0:
                    log.warning("step %d: %s: no update applied (%d such step(s) in a row; train.max_bad_steps=%d)",
                                step + 1, what, bad_in_a_row, train_cfg.max_bad_steps)
                if train_cfg.max_bad_steps and bad_in_a_row >= train_cfg.max_bad_steps:
                    step += 1
                    raise Diverged(f"step {step}: {what}, {bad_in_a_row} steps in a row (train.max_bad_steps="
                                   f"{train_cfg.max_bad_steps})")
            else:
                bad_in_a_row = 0
            applied = math.isfinite(last_loss) and not engine.update_skipped()  # what the window judges by
            spike = window.check(last_loss) if train_cfg.spike != "off" and applied else None
            if engine.compile_failure != compile_failure_said:  # train.compile=auto fell back during the run
                compile_failure_said = engine.compile_failure
                write_status("running")
                if tracker:
                    tracker.log_params({"train.compiled": "False", "train.compile_failure": compile_failure_said})
            step += 1
            tokens += train_cfg.global_batch * seq_len
            if spike and train_cfg.spike == "rollback" and rollback(spike):
                last_saved = step
                if stop_asked:
                    raise Stopped("stop requested")
                continue
            if spike:
                if rank == 0:
                    log.warning("step %d: %s (train.spike=%s)", step, spike.describe(), train_cfg.spike)
                    tracker.log(step, spike.metrics(), kind="spike")
            if applied and (spike is None or train_cfg.spike == "warn"):
                window.add(last_loss)
            elapsed = time.time() - t0
            log_step = step % train_cfg.log_every == 0 or step == train_cfg.steps
            ranks = _rank_times(engine.compute_seconds(), data_wait, device) if log_step else {}
            if rank == 0 and log_step:
                tps = train_cfg.global_batch * seq_len / elapsed
                m = {"loss": last_loss, "lr": lr, "grad_norm": engine.grad_norm(),
                     "tokens_per_s": tps, "mfu": tps * flops_per_token / peak if peak else 0.0,
                     "memory_gb": memory_gb(), "tokens": tokens, "data_batch": step - 1 + offset, **ranks}
                if data.mixture:  # tokens trained on per source
                    m.update({f"tokens/{name}": n * seq_len for name, n in
                              zip(data.names, _trained_per_source(loader, step + offset, skipped_ranges,
                                                                  train_cfg.global_batch))})
                tracker.log(step, m)
                tracker.progress(step, m)
            if stop_asked:
                raise Stopped("stop requested")
            if train_cfg.eval_every and step % train_cfg.eval_every == 0:
                run_eval()
            if train_cfg.ckpt_every and step % train_cfg.ckpt_every == 0:
                save("periodic")
                last_saved = step
    except Stopped as why:
        watchdog.disarm()
        prefetch.close()
        if rank == 0:
            log.warning("%s (%s): saving step %d and exiting with %d", why, stop.signal_name, step, EXIT_PREEMPTED)
        if last_saved != step:  # (a checkpoint of this step whose evaluation was cut records so: it is redone)
            save(f"signal {stop.signal_name}")
        ckpt.wait()
        write_status("preempted", {"signal": stop.signal_name, "loss": last_loss})
        if tracker:
            tracker.close("KILLED")
        return EXIT_PREEMPTED
    except Diverged as why:
        watchdog.disarm()
        prefetch.close()
        ckpt.wait()  # a checkpoint being written still completes (it holds finite tensors)
        latest = run_dir / "checkpoints" / "latest"
        good = str(run_dir / "checkpoints" / latest.read_text().strip()) if latest.is_file() else "none"
        if rank == 0:
            log.error("%s; the last good checkpoint is %s; exiting with %d (not restarted: it would meet the same "
                      "batches)", why, good, EXIT_DIVERGED)
        write_status("failed", {"error": str(why), "last_good_checkpoint": good, "loss": last_loss})
        if tracker:
            tracker.close("FAILED")
        return EXIT_DIVERGED
    except BaseException:
        watchdog.disarm()
        prefetch.close()
        ckpt.wait()  # a checkpoint being written still completes
        raise
    prefetch.close()
    if last_saved != step:
        save("final")
    ckpt.wait()
    write_status("finished", {"loss": last_loss})
    if tracker:
        tracker.close("FINISHED")
        log.info("done: checkpoints in %s, log %s, mlflow: mlflow ui --backend-store-uri %s",
                 run_dir / "checkpoints", run_dir / "metrics.jsonl", tracker.uri if tracker.client else "(off)")
    stop.uninstall()
    return EXIT_FINISHED
