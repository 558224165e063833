"""Random access to prepared token shards, and an exact, resumable sample order.

Every sample has a global index in its split. The order of an epoch is a permutation drawn from
(seed, epoch): the shards in a shuffled order, and the samples of each shard shuffled, so reads
stay within one or two shards at a time. Position p of the stream (p = samples consumed by all
data-parallel ranks together) maps to (epoch = p // N, p % N), so any position can be resumed
without replaying anything, and with any number of data-parallel ranks.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ..errors import InputFileError

SUPPORTED_FORMAT = "h3pretrain-shards-v1"


class ShardError(InputFileError):
    """A shard that is missing, truncated or altered; the message names it."""


@dataclass
class Manifest:
    root: Path
    data: dict

    @classmethod
    def load(cls, root: str | Path) -> "Manifest":
        root = Path(root)
        path = root / "manifest.json"
        if not path.is_file():
            raise InputFileError(f"{root} has no manifest.json: run `h3pretrain prep` first "
                                 "(or it was interrupted; re-run it with the same arguments)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ShardError(f"{path} is damaged: {err}") from None
        if not isinstance(data, dict) or data.get("format") != SUPPORTED_FORMAT:
            raise ShardError(f"{path}: unsupported format "
                             f"{data.get('format') if isinstance(data, dict) else type(data).__name__!r}")
        return cls(root, data)

    def fingerprint(self) -> dict:
        """What a resumed run must find unchanged: the sample length, the tokenizer and every shard."""
        return {"seq_len": self.data["seq_len"], "tokenizer_sha256": self.tokenizer_sha256,
                "shards": {split: [[s["name"], s["sha256"]] for s in info["shards"]]
                           for split, info in sorted(self.data["splits"].items())}}

    @property
    def sample_tokens(self) -> int:
        return self.data["sample_tokens"]

    @property
    def tokenizer_sha256(self) -> str:
        return self.data["tokenizer"]["sha256"]

    @property
    def vocab_size(self) -> int:
        return self.data["tokenizer"]["vocab_size"]

    def shards(self, split: str) -> list[dict]:
        if split not in self.data["splits"]:
            raise ShardError(f"no split {split!r} in {self.root} (it has {', '.join(sorted(self.data['splits']))})")
        return self.data["splits"][split]["shards"]


class ShardReader:
    """Reads samples by global index; each shard is checked (size, sha256) when first opened."""

    def __init__(self, manifest: Manifest, split: str = "train", cache_shards: int = 2):
        self.manifest, self.split = manifest, split
        self.shards = manifest.shards(split)
        if not self.shards:
            raise ShardError(f"{manifest.root}: split {split!r} has no samples")
        self.counts = np.array([s["samples"] for s in self.shards])
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self._cache: dict[int, np.ndarray] = {}
        self._cache_order: list[int] = []
        self.cache_shards = cache_shards

    def __len__(self) -> int:
        return int(self.starts[-1])

    def shard_samples(self, shard: int) -> np.ndarray:
        if shard not in self._cache:
            self._cache[shard] = self._load(shard)
            self._cache_order.append(shard)
            if len(self._cache_order) > self.cache_shards:
                self._cache.pop(self._cache_order.pop(0))
        return self._cache[shard]

    def _load(self, shard: int) -> np.ndarray:
        info = self.shards[shard]
        path = self.manifest.root / info["name"]
        if not path.is_file():
            raise ShardError(f"shard {path} is missing")
        data = path.read_bytes()
        if len(data) != info["bytes"]:
            raise ShardError(f"shard {path} is truncated or altered: {len(data)} bytes, manifest says {info['bytes']}")
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise ShardError(f"shard {path} is corrupt: sha256 differs from the manifest")
        out = np.empty((info["samples"], self.manifest.sample_tokens), dtype=np.int64)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(".tokens.npy")]
            if len(members) != info["samples"]:
                raise ShardError(f"shard {path} holds {len(members)} samples, manifest says {info['samples']}")
            for j, m in enumerate(members):
                out[j] = np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False)
        return out

    def __getitem__(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        return self.shard_samples(shard)[index - self.starts[shard]]


class SampleOrder:
    """Global position -> global sample index; a fresh permutation every epoch."""

    def __init__(self, counts: np.ndarray, seed: int, shuffle: bool = True):
        self.counts, self.seed, self.shuffle = np.asarray(counts), seed, shuffle
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.total = int(self.starts[-1])
        self._epoch: int | None = None

    def _prepare(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        n = len(self.counts)
        rng = np.random.default_rng([self.seed, epoch])
        self._shard_order = rng.permutation(n) if self.shuffle else np.arange(n)
        self._order_starts = np.concatenate([[0], np.cumsum(self.counts[self._shard_order])])
        self._inner: dict[int, np.ndarray] = {}
        self._epoch = epoch

    def _within(self, epoch: int, shard: int) -> np.ndarray:
        if shard not in self._inner:
            if len(self._inner) > 8:
                self._inner.clear()
            self._inner[shard] = np.random.default_rng([self.seed, epoch, shard]).permutation(int(self.counts[shard]))
        return self._inner[shard]

    def indices(self, positions: np.ndarray) -> np.ndarray:
        """Vectorised: stream positions -> global sample indices."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty_like(positions)
        epochs, offsets = np.divmod(positions, self.total)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            self._prepare(int(epoch))
            k = np.searchsorted(self._order_starts, offsets[sel], side="right") - 1
            shards = self._shard_order[k]
            within = offsets[sel] - self._order_starts[k]
            if self.shuffle:
                for shard in np.unique(shards):
                    m = shards == shard
                    within[m] = self._within(int(epoch), int(shard))[within[m]]
            out[sel] = self.starts[shards] + within
        return out

    def __call__(self, position: int) -> int:
        return int(self.indices(np.array([position]))[0])


class TokenBatches:
    """The batches of one data-parallel rank.

    Global batch b covers stream positions [b*G, (b+1)*G); rank r of `dp` takes the contiguous
    slice [b*G + r*G/dp, b*G + (r+1)*G/dp). `state_dict()` is the global position, so a resume
    with another `dp` (same G) continues with exactly the samples an uninterrupted run would see.
    """

    def __init__(self, data_dir: str | Path, *, global_batch: int, dp_rank: int = 0, dp_size: int = 1,
                 split: str = "train", seed: int = 0, shuffle: bool = True):
        if global_batch % dp_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {dp_size} data-parallel ranks")
        self.manifest = Manifest.load(data_dir)
        self.reader = ShardReader(self.manifest, split)
        self.order = SampleOrder(self.reader.counts, seed, shuffle)
        self.global_batch, self.dp_rank, self.dp_size = global_batch, dp_rank, dp_size
        self.position = 0

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.dp_size

    @property
    def epoch(self) -> int:
        return self.position // self.order.total

    def indices(self, position: int) -> list[int]:
        start = position + self.dp_rank * self.local_batch
        return self.order.indices(np.arange(start, start + self.local_batch)).tolist()

    def batch_at(self, position: int) -> torch.Tensor:
        """This rank's part of the global batch starting at stream `position`:
        (local_batch, seq_len + 1) int64 tokens; inputs are [:, :-1], targets [:, 1:]."""
        return torch.from_numpy(np.stack([self.reader[i] for i in self.indices(position)]))

    def next(self) -> torch.Tensor:
        batch = self.batch_at(self.position)
        self.position += self.global_batch
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.order.seed, "global_batch": self.global_batch,
                "tokenizer_sha256": self.manifest.tokenizer_sha256}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "global_batch", "tokenizer_sha256"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise ValueError(f"data loader state was saved with {key}={state[key]!r}, this run has {mine!r}")
        self.position = int(state["position"])
