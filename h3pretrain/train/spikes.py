"""Loss spikes: the running statistics a step's loss is judged by, and the durable record of the data
a rollback skips.

A spike is a loss above mean + z * std (population std) of the last `size` losses of steps whose
update was applied; nothing is judged until the window is full. Every rank sees the same all-reduced
loss, so every rank takes the same decision without a collective.

A rollback is written to run_dir/skipped_batches.jsonl before it takes effect. A resume from the
checkpoint it rolled back to applies it again (and any later rollback to the same checkpoint), so a
kill anywhere in or after a rollback resumes to the same result as a run that was not killed.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from .. import jsonio


@dataclass(frozen=True)
class Spike:
    loss: float
    mean: float
    std: float
    threshold: float

    def describe(self) -> str:
        return (f"loss {self.loss:.4f} is a spike (window mean {self.mean:.4f}, std {self.std:.4f}, "
                f"threshold {self.threshold:.4f})")

    def metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "window_mean": self.mean, "window_std": self.std, "threshold": self.threshold}


class SpikeWindow:
    def __init__(self, size: int, z: float):
        self.z = z
        self.losses: deque[float] = deque(maxlen=size)

    def check(self, loss: float) -> Spike | None:
        """The spike `loss` is, judged by the window as it is (without it), or None."""
        if len(self.losses) < self.losses.maxlen:
            return None
        n = len(self.losses)
        mean = math.fsum(self.losses) / n
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in self.losses) / n)
        threshold = mean + self.z * std
        return Spike(loss, mean, std, threshold) if loss > threshold else None

    def add(self, loss: float) -> None:
        self.losses.append(loss)

    def state_dict(self) -> list[float]:
        return list(self.losses)

    def load_state_dict(self, losses: list[float]) -> None:
        self.losses.clear()
        self.losses.extend(losses[-self.losses.maxlen:])


def skipped_range(record: dict) -> dict:
    """What status.json and the trainer state keep of a rollback record."""
    return {key: record[key] for key in ("spike_step", "rolled_back_to", "first_batch", "last_batch")}


class SkipLog:
    """run_dir/skipped_batches.jsonl, one record per rollback. Batches are numbered from 0 in the
    run's data order; step n (from 1) trains on batch n - 1 + the batches skipped before it."""

    NAME = "skipped_batches.jsonl"

    def __init__(self, run_dir: Path):
        self.path = run_dir / self.NAME

    def _read(self) -> tuple[list[dict], int]:
        """The complete records, and the byte length they take (a torn last line is not one)."""
        if not self.path.is_file():
            return [], 0
        data = self.path.read_bytes()
        records, good = [], 0
        for line in data.splitlines(keepends=True):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("torn line")
                records.append(json.loads(line))
            except ValueError:
                break
            good += len(line)
        return records, good

    def append(self, record: dict) -> None:
        """Rank 0: durable before the rollback acts on it; a torn line left by a kill is cut first."""
        _, good = self._read()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.truncate(good)
            f.write((jsonio.dumps({**record, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def applicable(self, step: int, offset: int) -> list[dict]:
        """Collective: the rollbacks recorded to the checkpoint of `step` whose data offset there was
        `offset`, in order, each continuing from the one before (rank 0 reads, all ranks get it)."""
        chain = []
        if dist.get_rank() == 0:
            for record in self._read()[0]:
                if record.get("rolled_back_to") == step and record.get("offset_before") == offset:
                    chain.append(record)
                    offset = record["offset_before"] + record["batches"]
        box = [chain]
        dist.broadcast_object_list(box, src=0)
        return box[0]
