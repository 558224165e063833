"""The training loop: DeepSpeed ZeRO data parallelism, bf16 autocast, exact resume, preemption.

    torchrun --nproc_per_node=N -m h3pretrain.cli train --config launch/configs/tiny.yaml

Exit codes: 0 finished (or already finished); EXIT_PREEMPTED (75) saved after SIGTERM/SIGUSR1,
resume from `latest`; anything else is a failure.
"""
from __future__ import annotations

import hashlib
import json
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

from ..config import Config, ConfigError, save_yaml, to_dict
from ..data import Manifest, TokenBatches
from ..parallel.engine import ParallelModel
from ..quiet import silence_third_party_noise
from ..parallel.pipeline import describe as describe_partition
from .checkpoint import CheckpointManager
from .kernel_choice import choose_flashconv
from .metrics import Tracker, memory_gb, peak_tflops, train_flops_per_token
from .signals import EXIT_FINISHED, EXIT_PREEMPTED, StopRequest

log = logging.getLogger("h3pretrain.train")


class Stopped(Exception):
    """A stop signal arrived while evaluating or waiting for data."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Process group from torchrun's (or SLURM-derived) environment; one process works alone."""
    silence_third_party_noise()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    import deepspeed

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def _any(flag: bool, device) -> bool:
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


def _check_data(cfg: Config, manifest: Manifest) -> None:
    if cfg.train.eval_every and cfg.data.eval_split not in manifest.data["splits"]:
        raise ConfigError(f"data.eval_split {cfg.data.eval_split!r} is not a split of {cfg.data.path} (it has "
                          f"{', '.join(sorted(manifest.data['splits']))}); or set train.eval_every=0")
    vocab = manifest.vocab_size
    if cfg.model.vocab_size != vocab:
        raise ConfigError(f"model.vocab_size is {cfg.model.vocab_size} but the data's tokenizer has {vocab} "
                          f"tokens: set model.vocab_size={vocab}")
    if cfg.data.tokenizer:
        digest = hashlib.sha256(Path(cfg.data.tokenizer).read_bytes()).hexdigest()
        if digest != manifest.tokenizer_sha256:
            raise ConfigError(f"data.tokenizer {cfg.data.tokenizer} (sha256 {digest[:12]}...) is not the tokenizer "
                              f"{cfg.data.path} was prepared with (sha256 {manifest.tokenizer_sha256[:12]}...)")


def train(cfg: Config) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg.train.validate()
    rank, world, device = init_distributed()
    tc = cfg.train
    run_dir = Path(tc.run_dir)
    manifest = Manifest.load(cfg.data.path)
    _check_data(cfg, manifest)
    seq_len = manifest.data["seq_len"]

    torch.manual_seed(tc.seed)
    pm = ParallelModel(cfg, device, seq_len)
    lay = pm.layout
    if rank == 0:
        log.info("layout %s; pipeline partition:\n%s", lay.describe(), describe_partition(cfg.model, pm.chunks))
    kernels = choose_flashconv(cfg, device, seq_len // lay.cp, lay.tp, lay.cp)
    if rank == 0:
        log.info("FlashConv: %s (%s) | torch.compile: %s | recompute: %s", kernels["implementation"],
                 kernels["reason"], "on" if pm.compiled else "off", tc.recompute)

    loader = TokenBatches(cfg.data.path, global_batch=tc.global_batch, dp_rank=lay.dp_rank, dp_size=lay.dp,
                          seed=cfg.data.seed)
    ckpt = CheckpointManager(run_dir / "checkpoints", tc.keep_last, tc.hash_checkpoints)
    step, tokens = 0, 0
    resume_from = None
    if tc.resume == "auto":
        resume_from = ckpt.find_resumable()
    elif tc.resume != "none":
        resume_from = Path(tc.resume)
        problem = ckpt.verify(resume_from) if resume_from.is_dir() else "no such checkpoint directory"
        if problem:
            raise ConfigError(f"train.resume={resume_from}: {problem}")
    if resume_from is not None:
        state = ckpt.read_state(resume_from)
        pm.load(resume_from, state["step"])
        ckpt.restore_rng(resume_from, same_layout=state.get("layout") == lay.shape())
        loader.load_state_dict(state["data"])
        step, tokens = state["step"], state["tokens"]
        if rank == 0:
            was = state.get("layout")
            log.info("resumed from %s at step %d (%s tokens)%s", resume_from, step, f"{tokens:,}",
                     "" if was == lay.shape() else f", resharded from layout {was}")

    if rank == 0:  # only once the config has been accepted: a rejected one never replaces the run's
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
        if resume_from is not None and tc.resume != "auto":
            ckpt.set_aside_newer(resume_from)
    stop = StopRequest().install()
    tracker = Tracker(cfg, run_dir, tc.steps) if rank == 0 else None
    if tracker:
        tracker.log_params({"flashconv.implementation": kernels["implementation"],
                            "flashconv.reason": kernels["reason"], "train.compiled": str(pm.compiled)})
    flops_per_token = train_flops_per_token(cfg.model, seq_len)
    peak = peak_tflops(tc.peak_tflops) * 1e12 * world
    n_params = pm.num_parameters()
    if rank == 0:
        log.info("model %s parameters | %d ranks (%s) | ZeRO-%d | %s | global batch %d x %d tokens, micro %d | %s",
                 f"{n_params:,}", world, lay.describe(), tc.zero_stage, pm.optimizer_name, tc.global_batch,
                 seq_len, tc.micro_batch, tc.precision)

    def evaluate() -> dict[str, float]:
        val = TokenBatches(cfg.data.path, split=cfg.data.eval_split, global_batch=tc.micro_batch * lay.dp,
                           dp_rank=lay.dp_rank, dp_size=lay.dp, shuffle=False)
        pm.train(False)
        total = 0.0
        for _ in range(tc.eval_batches):
            if _any(stop.requested, device):
                raise Stopped("stop requested during evaluation")
            total += pm.eval_loss(val.next())
        pm.train(True)
        loss = total / tc.eval_batches  # eval_loss is already the mean over all ranks
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def save(reason: str) -> Path:
        state = {"step": step, "tokens": tokens, "data": {**loader.state_dict(), "position": step * tc.global_batch},
                 "world_size": world, "layout": lay.shape(), "reason": reason, "config": to_dict(cfg)}
        path = ckpt.save(pm.save, step, state)
        if rank == 0:
            log.info("saved checkpoint %s (%s)", path, reason)
        return path

    def write_status(state: str, extra: dict | None = None) -> None:
        if rank == 0:
            status = {"state": state, "step": step, "steps": tc.steps, "tokens": tokens,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "flashconv": kernels["implementation"],
                      "compiled": pm.compiled, **(extra or {})}
            tmp = run_dir / "status.json.tmp"
            tmp.write_text(json.dumps(status, indent=1) + "\n")
            os.replace(tmp, run_dir / "status.json")

    if step >= tc.steps:
        if rank == 0:
            log.info("run already finished (step %d of %d)", step, tc.steps)
        write_status("finished")
        return EXIT_FINISHED

    pm.train(True)
    prefetch = Prefetcher(loader, step * tc.global_batch, stop)
    last_saved, last_loss = step, float("nan")
    write_status("running")
    try:
        while step < tc.steps:
            t0 = time.time()
            batch = prefetch.get()
            lr = pm.lr()  # what this step's optimizer update uses
            last_loss = pm.train_step(batch)
            step += 1
            tokens += tc.global_batch * seq_len
            grad_norm = pm.grad_norm()
            elapsed = time.time() - t0
            if rank == 0 and (step % tc.log_every == 0 or step == tc.steps):
                tps = tc.global_batch * seq_len / elapsed
                m = {"loss": last_loss, "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_s": tps, "mfu": tps * flops_per_token / peak if peak else 0.0,
                     "memory_gb": memory_gb(), "tokens": tokens}
                tracker.log(step, m)
                tracker.progress(step, m)
            if _any(stop.requested, device):
                raise Stopped("stop requested")
            if tc.eval_every and step % tc.eval_every == 0:
                ev = evaluate()
                if rank == 0:
                    tracker.log(step, ev, kind="eval")
                    print(f"eval step {step} | loss {ev['loss']:.4f} | ppl {ev['perplexity']:.2f}", flush=True)
            if tc.ckpt_every and step % tc.ckpt_every == 0:
                save("periodic")
                last_saved = step
    except Stopped as why:
        prefetch.close()
        if rank == 0:
            log.warning("%s (%s): saving step %d and exiting with %d", why, stop.signal_name, step, EXIT_PREEMPTED)
        if last_saved != step:
            save(f"signal {stop.signal_name}")
        write_status("preempted", {"signal": stop.signal_name, "loss": last_loss})
        if tracker:
            tracker.close("KILLED")
        return EXIT_PREEMPTED
    prefetch.close()
    if last_saved != step:
        save("final")
    write_status("finished", {"loss": last_loss})
    if tracker:
        tracker.close("FINISHED")
        log.info("done: checkpoints in %s, log %s, mlflow: mlflow ui --backend-store-uri %s",
                 run_dir / "checkpoints", run_dir / "metrics.jsonl", tracker.uri if tracker.client else "(off)")
    stop.uninstall()
    return EXIT_FINISHED
