"""The run's outputs: mlflow, a JSONL log, a one-line progress display; peak FLOP/s for MFU."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from .. import jsonio
from ..rundir import mlflow_uri
from ..config import Config, to_dict

log = logging.getLogger("h3pretrain.train")

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0}


def peak_tflops(configured: float) -> float:
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
            if key in name:
                return PEAK_BF16_TFLOPS[key]
    return 0.0


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


def trim_metrics(run_dir: Path, step: int, redone: frozenset[str] = frozenset()) -> int:
    """Before a resume (or a rollback) to `step`: records of later steps, and those of `step` whose
    kind is in `redone` (an evaluation cut short, rollbacks that are applied again), belong to the
    continuation that was lost; they move to metrics.superseded.jsonl so metrics.jsonl holds each
    step once. A torn last line (a kill mid-write) moves with them. Returns the records moved."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    keep, moved = [], []
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            record = json.loads(line)
            later = record["step"] > step or (record["step"] == step and record["kind"] in redone)
        except (ValueError, KeyError, TypeError):
            later = True
        (moved if later else keep).append(line if line.endswith(b"\n") else line + b"\n")
    if moved:
        with open(run_dir / "metrics.superseded.jsonl", "ab") as f:
            f.write(b"".join(moved))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"".join(keep))
        os.replace(tmp, path)
    return len(moved)


class Tracker:
    """Rank 0 only: metrics.jsonl and the progress line at once; mlflow (params once, metrics per
    logged step) when the checkpoint that covers the step is written (`commit`), so that the
    steps a resume redoes are never recorded twice there."""

    def __init__(self, cfg: Config, run_dir: Path, total_steps: int):
        self.run_dir, self.total_steps = run_dir, total_steps
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.t_start = time.time()
        self.client = self.run_id = None
        self.pending: list = []
        # The last step of each kind mlflow holds. A resume from a checkpoint older than that (the
        # newer one was damaged) redoes steps mlflow already has: they are not sent again.
        self.sent_file = run_dir / "mlflow_logged_through.json"
        try:
            self.sent = json.loads(self.sent_file.read_text())
        except (OSError, ValueError):
            self.sent = {}
        self.batch_max: dict[str, int] = {}
        self.uri = None
        if cfg.train.mlflow:
            try:
                import mlflow  # noqa: F401 - optional: the lent GPU machine and slim installs lack it
            except ImportError:
                log.warning("mlflow is not installed: metrics go to %s only (set train.mlflow=false not to ask for it)",
                            run_dir / "metrics.jsonl")
            else:
                self._start_mlflow(cfg)

    def _start_mlflow(self, cfg: Config) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = mlflow_uri(self.run_dir, cfg.train.mlflow_uri)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        id_file = self.run_dir / "mlflow_run_id"
        if id_file.is_file():  # a resumed run continues the same mlflow run
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(cfg.train.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.train.experiment)
        run = self.client.create_run(exp_id, run_name=self.run_dir.name)
        self.run_id = run.info.run_id
        params = _flatten(to_dict(cfg))
        items = [mlflow.entities.Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        id_file.write_text(self.run_id + "\n")

    def log_params(self, params: dict[str, str]) -> None:
        """This session's settings; a resumed run whose value changed (another GPU, another choice)
        keeps the first value as the param and records the new one as a tag."""
        if self.client is None:
            return
        for key, value in params.items():
            try:
                self.client.log_param(self.run_id, key, value[:6000])
            except Exception:  # noqa: BLE001 - mlflow refuses to change a logged param
                self.client.set_tag(self.run_id, key, value[:6000])

    def log(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **metrics}
        self.jsonl.write(jsonio.dumps(record) + "\n")
        self.jsonl.flush()
        if self.client is not None:
            from mlflow.entities import Metric

            if step <= self.sent.get(kind, 0):
                return
            now = int(time.time() * 1000)
            prefix = "" if kind == "train" else f"{kind}/"
            self.pending += [Metric(prefix + k, float(v), now, step) for k, v in metrics.items() if v == v]
            self.batch_max[kind] = step

    def rewind(self, step: int, redone: frozenset[str] = frozenset()) -> int:
        """A rollback to the checkpoint of `step`: later records leave metrics.jsonl (trim_metrics)
        and are not sent to mlflow. Returns the records moved."""
        self.jsonl.close()
        moved = trim_metrics(self.run_dir, step, redone)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self.pending = [m for m in self.pending if m.step <= step]
        self.batch_max = {kind: min(last, step) for kind, last in self.batch_max.items()}
        return moved

    def take_pending(self) -> tuple[list, dict]:
        """What a checkpoint being written now covers; `send` it once the checkpoint is complete."""
        batch = (self.pending, self.batch_max)
        self.pending, self.batch_max = [], {}
        return batch

    def send(self, batch: tuple[list, dict]) -> None:
        """Hand metrics covered by a complete checkpoint to mlflow (any thread)."""
        metrics, through = batch
        if self.client is not None and metrics:
            for i in range(0, len(metrics), 900):
                self.client.log_batch(self.run_id, metrics=metrics[i:i + 900])
            self.sent.update(through)
            tmp = self.sent_file.with_name(self.sent_file.name + ".tmp")
            tmp.write_text(json.dumps(self.sent) + "\n")
            os.replace(tmp, self.sent_file)

    def progress(self, step: int, m: dict[str, float]) -> None:
        elapsed = time.time() - self.t_start
        parts = [f"step {step}/{self.total_steps}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}",
                 f"gnorm {m['grad_norm']:.3f}", f"{m['tokens_per_s'] / 1e3:,.1f}k tok/s"]
        if m.get("mfu", 0) > 0:
            parts.append(f"mfu {100 * m['mfu']:.1f}%")
        parts.append(f"mem {m['memory_gb']:.2f} GB")
        parts.append(f"{elapsed:,.0f}s")
        print(" | ".join(parts), flush=True, file=sys.stdout)

    def close(self, status: str) -> None:
        self.jsonl.close()
        self.pending, self.batch_max = [], {}  # not covered by a checkpoint: a resume redoes these steps
        if self.client is not None:
            self.client.set_terminated(self.run_id, status=status)
