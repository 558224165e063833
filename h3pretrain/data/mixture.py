"""A weighted mixture of prepared directories as one exact, resumable sample stream.

Every global batch b of G samples draws from the sources in proportion to their weights w_s:
source s gets floor(w_s G) samples, and the remaining slots go to the sources by systematic
sampling over their fractional parts at an offset u_b = frac(u_0 + b·φ) (φ the golden ratio, u_0
from the seed). So a batch holds floor or ceil of w_s G samples of each source, and after N batches
every source's count is within the discrepancy of the golden-ratio sequence, O(log N) samples, of
w_s·G·N: at most 2 over the first 20,000 batches for the weights tests/data/test_mixture.py tries. Slots are shuffled within the batch (seeded by b), so each data-parallel rank's
contiguous slice is mixed too. Each source keeps its own position (samples it has given so far) and
its own epochs: a small source repeats while a large one continues. Everything is a function of
(seed, b), so any batch can be produced again, under any number of data-parallel ranks.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import InputFileError
from .shards import Manifest, SampleOrder, ShardReader

PHI = (math.sqrt(5.0) - 1.0) / 2.0
_BLOCK = 1 << 16  # batches summed at a time when counting a source's position from scratch


class MixtureSchedule:
    """How many samples of each source every global batch takes, and in which slots."""

    def __init__(self, weights: list[float], global_batch: int, seed: int):
        share = np.asarray(weights, dtype=np.float64)
        share = share / share.sum()
        self.global_batch, self.seed = global_batch, seed
        expected = share * global_batch
        self.base = np.floor(expected).astype(np.int64)
        self.rest = int(global_batch - self.base.sum())  # slots left for the fractional parts
        edges = np.concatenate([[0.0], np.cumsum(expected - self.base)])
        edges[-1] = self.rest  # exactly (the fractions add up to it)
        self.edges = edges
        self.u0 = float(np.random.default_rng([seed, 0x6D6978]).random())
        self._known: tuple[int, np.ndarray] = (0, np.zeros(len(share), dtype=np.int64))

    def counts(self, batches: np.ndarray) -> np.ndarray:
        """(n,) batch indices -> (n, sources) samples of each source in those batches."""
        batches = np.asarray(batches, dtype=np.int64)
        if self.rest == 0:
            return np.broadcast_to(self.base, (len(batches), len(self.base))).copy()
        u = np.mod(self.u0 + batches.astype(np.float64) * PHI, 1.0)[:, None]
        # the points u, u + 1, ..., u + rest - 1 that fall in [edges[s], edges[s + 1])
        hits = np.ceil(self.edges[None, :] - u).astype(np.int64)
        return self.base[None, :] + np.diff(hits, axis=1)

    def taken_before(self, batch: int) -> np.ndarray:
        """(sources,) samples each source gave in batches 0 .. batch - 1."""
        known, total = self._known  # (one read: the prefetch thread and the logging thread both ask)
        if batch < known:  # a little behind the furthest batch asked for: step back, keep the cache
            return total - self.counts(np.arange(batch, known)).sum(axis=0)
        for start in range(known, batch, _BLOCK):
            total = total + self.counts(np.arange(start, min(batch, start + _BLOCK))).sum(axis=0)
        self._known = (batch, total)
        return total

    def slots(self, batch: int) -> np.ndarray:
        """(global_batch,) the source of every slot of `batch`, in a seeded order."""
        sources = np.repeat(np.arange(len(self.base)), self.counts(np.array([batch]))[0])
        return np.random.default_rng([self.seed, 0x736C6F74, batch]).permutation(sources)


class MixtureBatches:
    """The batches of one data-parallel rank from a weighted mixture (same interface as
    TokenBatches: `batch_at(position)` with position = samples of all ranks so far)."""

    def __init__(self, sources: list[tuple[str, float]], *, global_batch: int, dp_rank: int = 0, dp_size: int = 1,
                 split: str = "train", seed: int = 0):
        if global_batch % dp_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {dp_size} data-parallel ranks")
        self.manifests = [Manifest.load(path) for path, _ in sources]
        check_same_format([str(p) for p, _ in sources], self.manifests)
        self.manifest = self.manifests[0]
        self.weights = [float(w) for _, w in sources]
        self.readers = [ShardReader(m, split) for m in self.manifests]
        self.orders = [SampleOrder(r.counts, source_seed(seed, s)) for s, r in enumerate(self.readers)]
        self.schedule = MixtureSchedule(self.weights, global_batch, seed)
        self.global_batch, self.dp_rank, self.dp_size, self.seed = global_batch, dp_rank, dp_size, seed
        self.position = 0

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.dp_size

    def _batch_index(self, position: int) -> int:
        if position % self.global_batch:
            raise ValueError(f"position {position} is not at the start of a global batch of {self.global_batch}")
        return position // self.global_batch

    def samples_per_source(self, position: int) -> list[int]:
        """Samples each source has given to the stream before `position`."""
        return self.schedule.taken_before(self._batch_index(position)).tolist()

    def indices(self, position: int) -> list[tuple[int, int]]:
        """(source, sample index in that source) for each of this rank's rows of the batch."""
        b = self._batch_index(position)
        slots = self.schedule.slots(b)
        before = self.schedule.taken_before(b)
        rank = slice(self.dp_rank * self.local_batch, (self.dp_rank + 1) * self.local_batch)
        out = []
        for s in range(len(self.readers)):
            mine = np.flatnonzero(slots == s)  # the source's slots in order: its next samples
            stream = before[s] + np.arange(len(mine))
            out += list(zip(mine.tolist(), [s] * len(mine), self.orders[s].indices(stream).tolist()))
        return [(s, i) for slot, s, i in sorted(out) if rank.start <= slot < rank.stop]

    def batch_at(self, position: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.readers[s][i] for s, i in self.indices(position)]))

    def next(self) -> torch.Tensor:
        batch = self.batch_at(self.position)
        self.position += self.global_batch
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "global_batch": self.global_batch,
                "tokenizer_sha256": self.manifest.tokenizer_sha256, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "global_batch", "tokenizer_sha256", "weights"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise InputFileError(f"data loader state was saved with {key}={state.get(key)!r}, this run has {mine!r}")
        self.position = int(state["position"])


def source_seed(seed: int, source: int) -> int:
    return int(np.random.SeedSequence([seed, source]).generate_state(1)[0])


def check_same_format(paths: list[str], manifests: list[Manifest]) -> None:
    """Sources of one mixture: one tokenizer and one sample length."""
    first = manifests[0]
    for path, m in zip(paths[1:], manifests[1:]):
        if m.tokenizer_sha256 != first.tokenizer_sha256:
            raise InputFileError(f"data.sources: {path} was tokenized with another tokenizer than {paths[0]} "
                                 f"(sha256 {m.tokenizer_sha256[:12]}... vs {first.tokenizer_sha256[:12]}...)")
        if m.sample_tokens != first.sample_tokens:
            raise InputFileError(f"data.sources: {path} has samples of {m.sample_tokens} tokens, {paths[0]} of "
                                 f"{first.sample_tokens} (prep both with the same --seq-len)")


def source_names(paths: list[str], names: list[str]) -> list[str]:
    """A label per source: its given name, else its directory's name (made unique)."""
    out: list[str] = []
    for path, name in zip(paths, names):
        label = re.sub(r"[^A-Za-z0-9_.-]", "_", name or Path(path).resolve().name or "data")  # a valid metric name
        n, unique = 2, label
        while unique in out:
            unique, n = f"{label}_{n}", n + 1
        out.append(unique)
    return out


class TrainingData:
    """The data of a run: one prepared directory (`data.path`), or a weighted mixture of several
    (`data.sources`): their manifests, checked to share a tokenizer and a sample length."""

    def __init__(self, sources: list[tuple[str, float]], names: list[str] | None = None, mixture: bool = False):
        self.paths, self.weights = [p for p, _ in sources], [float(w) for _, w in sources]
        self.manifests = [Manifest.load(p) for p in self.paths]
        check_same_format(self.paths, self.manifests)
        self.names = source_names(self.paths, names or [""] * len(self.paths))
        self.manifest = self.manifests[0]
        self.mixture = mixture or len(self.paths) > 1

    def fingerprint(self) -> dict:
        """What a resumed run must find unchanged (h3pretrain.data.Manifest.fingerprint, per source,
        and the weights of a mixture)."""
        if not self.mixture:
            return self.manifest.fingerprint()
        prints = [m.fingerprint() for m in self.manifests]
        return {"seq_len": prints[0]["seq_len"], "tokenizer_sha256": prints[0]["tokenizer_sha256"],
                "shards": {f"{name}/{split}": shards for name, p in zip(self.names, prints)
                           for split, shards in p["shards"].items()},
                "weights": dict(zip(self.names, self.weights))}

    def train_batches(self, *, global_batch: int, dp_rank: int, dp_size: int, seed: int):
        if not self.mixture:
            from .shards import TokenBatches

            return TokenBatches(self.paths[0], global_batch=global_batch, dp_rank=dp_rank, dp_size=dp_size, seed=seed)
        return MixtureBatches(list(zip(self.paths, self.weights)), global_batch=global_batch, dp_rank=dp_rank,
                              dp_size=dp_size, seed=seed)

    def shares(self) -> list[float]:
        total = sum(self.weights)
        return [w / total for w in self.weights]
