"""Pile-format text -> SentencePiece tokens -> packed samples -> webdataset tar shards + manifest.

Pipeline (deterministic, so a resumed run writes the same bytes as an uninterrupted one):
  reader (main process) -> batches of raw records -> N worker processes (decode, parse, validate,
  train/val split by document hash, tokenize) -> results in input order -> per-split packer
  (append EOS, cut samples of seq_len + 1 tokens, documents flow across samples) -> shards.

Resume: after every finished shard the packer state (tokens not yet in a finished shard) and the
input position are saved atomically in `.prep-state/`. A re-run with the same arguments continues
from there; a run with other arguments is refused before any work.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import webdataset as wds

from .reader import ReadProblem, file_fingerprint, find_inputs, iter_records, parse_record
from .workers import init_worker, process_batch
from .tokenizer import MIN_VOCAB, TokenizerTrainingError, load_tokenizer, sha256_file, train_tokenizer
from h3pretrain import jsonio
from h3pretrain.errors import UserError

log = logging.getLogger("h3pretrain.prep")
FORMAT = "h3pretrain-shards-v1"
SPLITS = ("train", "val")
STATE_DIR = ".prep-state"
MAX_WARNINGS_PER_REASON = 20


class PrepError(UserError):
    """Refused before any work: bad arguments or an output directory made differently."""


@dataclass
class PrepSettings:
    inputs: list[str]
    out: str
    seq_len: int = 2048
    vocab_size: int = 32000
    tokenizer: str | None = None  # an existing SentencePiece .model or tokenizer.json (or its directory); else one is trained
    tokenizer_sample_mb: float = 200.0
    val_fraction: float = 0.005
    samples_per_shard: int = 8192
    pile_sets: list[str] | None = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    batch_records: int = 64


# ---------------------------------------------------------------------------------------------
# packing and shard writing


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


class Packer:
    """Cuts one split's token stream into samples and writes finished shards."""

    def __init__(self, split: str, out: Path, sample_tokens: int, samples_per_shard: int, dtype: np.dtype,
                 eos_id: int):
        self.split, self.out, self.sample_tokens = split, out, sample_tokens
        self.samples_per_shard, self.dtype, self.eos_id = samples_per_shard, dtype, eos_id
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray) -> bool:
        self.pending.append(tokens)
        self.pending_len += len(tokens)
        wrote = False
        while self.pending_len >= self.samples_per_shard * self.sample_tokens:
            self._write(self.samples_per_shard)
            wrote = True
        return wrote

    def finish(self) -> int:
        """Writes the last (smaller) shard; returns the tokens dropped (less than one sample)."""
        full = self.pending_len // self.sample_tokens
        if full:
            self._write(full)
        dropped, self.pending, self.pending_len = self.pending_len, [], 0
        return dropped

    def pending_tokens(self) -> np.ndarray:
        return np.concatenate(self.pending).astype(self.dtype) if self.pending else np.zeros(0, self.dtype)

    def restore(self, shards: list[dict], pending: np.ndarray) -> None:
        self.shards = shards
        self.pending = [pending.astype(np.uint32)] if len(pending) else []
        self.pending_len = len(pending)

    def _write(self, n_samples: int) -> None:
        flat = np.concatenate(self.pending)
        take, rest = flat[: n_samples * self.sample_tokens], flat[n_samples * self.sample_tokens:]
        self.pending, self.pending_len = ([rest] if len(rest) else []), len(rest)
        samples = take.astype(self.dtype).reshape(n_samples, self.sample_tokens)
        index = len(self.shards)
        first = index * self.samples_per_shard
        name = f"{self.split}-{index:06d}.tar"
        buf = io.BytesIO()
        with wds.TarWriter(buf, encoder=False, mtime=0) as sink:  # fixed mtime: reproducible bytes
            for j, sample in enumerate(samples):
                sink.write({"__key__": f"{first + j:010d}", "tokens.npy": _npy_bytes(sample)})
        data = buf.getvalue()
        tmp = self.out / (name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.out / name)
        self.shards.append({"name": name, "samples": n_samples, "tokens": int(take.size),
                            "documents": int((take == self.eos_id).sum()), "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})


# ---------------------------------------------------------------------------------------------
# the run


def _fingerprint(s: PrepSettings, files: list[Path], tokenizer_sha: str | None) -> dict:
    tok = {"sha256": tokenizer_sha} if s.tokenizer else {"train": {"vocab_size": s.vocab_size,
                                                                    "sample_mb": s.tokenizer_sample_mb}}
    return {"seq_len": s.seq_len, "tokenizer": tok, "val_fraction": s.val_fraction,
            "samples_per_shard": s.samples_per_shard, "pile_sets": sorted(s.pile_sets) if s.pile_sets else None,
            "inputs": [file_fingerprint(f) for f in files]}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: directory has {json.dumps(a)[:200]}, this run asks {json.dumps(b)[:200]}")
    return diffs


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(jsonio.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _tokenizer_sample(files: list[Path], settings: PrepSettings):
    """Up to tokenizer_sample_mb of valid documents, an equal share from each input file."""
    share = settings.tokenizer_sample_mb * 1e6 / len(files)
    sets = frozenset(settings.pile_sets) if settings.pile_sets else None
    for i, path in enumerate(files):
        taken = 0
        for rec in iter_records(path, i):
            if isinstance(rec, ReadProblem):
                continue
            parsed = parse_record(rec, 0.0, sets)
            if parsed.skip is None:
                yield parsed.text
                taken += len(rec.data)
                if taken >= share:
                    break


class _Counted:
    def __init__(self, items):
        self.items, self.count = items, 0

    def __iter__(self):
        for item in self.items:
            self.count += 1
            yield item


class _Warnings:
    def __init__(self):
        self.count = collections.Counter()

    def skip(self, path: Path, index: int, reason: str, kind: str) -> None:
        self.count[reason] += 1
        if self.count[reason] <= MAX_WARNINGS_PER_REASON:
            where = f"line {index + 1}" if kind == "json" else f"chunk {index}"
            log.warning("%s: %s: skipped (%s)%s", path, where, reason,
                        "; further warnings of this kind are not shown"
                        if self.count[reason] == MAX_WARNINGS_PER_REASON else "")


def validate(settings: PrepSettings) -> list[Path]:
    """Every argument checked before anything is written; returns the input files."""
    s = settings
    for flag, value, low in (("--seq-len", s.seq_len, 1), ("--samples-per-shard", s.samples_per_shard, 1),
                             ("--workers", s.workers, 1), ("batch_records", s.batch_records, 1)):
        if not isinstance(value, int) or value < low:
            raise PrepError(f"{flag} {value}: must be an integer >= {low}")
    if not s.tokenizer and not MIN_VOCAB <= s.vocab_size < 2**31:
        raise PrepError(f"--vocab-size {s.vocab_size}: must be at least {MIN_VOCAB} (256 byte pieces, <unk>, <s>, "
                        "</s> and one merge) and below 2^31")
    if not 0.0 <= s.val_fraction < 1.0:
        raise PrepError(f"--val-fraction {s.val_fraction}: must be in [0, 1) (it is the share of documents "
                        "hashed into the val split; 1 would leave no training data)")
    if not s.tokenizer and not s.tokenizer_sample_mb > 0:
        raise PrepError(f"--tokenizer-sample-mb {s.tokenizer_sample_mb}: must be positive")
    if s.pile_sets is not None and not all(isinstance(x, str) and x for x in s.pile_sets):
        raise PrepError(f"--pile-set {s.pile_sets}: names must be non-empty")
    out = Path(s.out)
    if out.exists() and not out.is_dir():
        raise PrepError(f"--out {out}: exists and is not a directory")
    if s.tokenizer and not (Path(s.tokenizer).is_file() or Path(s.tokenizer).is_dir()):
        raise PrepError(f"--tokenizer {s.tokenizer}: no such file (a SentencePiece .model, a tokenizer.json or a "
                        "directory holding one)")
    files = find_inputs(s.inputs)  # errors on a missing path or an unsupported file
    if out.resolve() in [p for f in files for p in f.parents]:
        raise PrepError(f"--out {out}: is inside the inputs ({', '.join(s.inputs)})")
    if all(f.stat().st_size == 0 for f in files):
        raise PrepError(f"every input file is empty (0 bytes): {', '.join(map(str, files[:5]))}")
    return files


def _read_state(out: Path, state_file: Path) -> tuple[dict | None, str | None]:
    """The saved resume state, or why it cannot be used (damaged, or its shards altered)."""
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        for s in SPLITS:
            for shard in state["shards"][s]:
                f = out / shard["name"]
                if not f.is_file() or f.stat().st_size != shard["bytes"]:
                    return None, f"{shard['name']} is missing or has another size than recorded"
            if not (state_file.parent / state["pending"][s]).is_file():
                return None, f"{state['pending'][s]} is missing"
        return state, None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        return None, f"damaged ({type(err).__name__}: {err})"


def prepare(settings: PrepSettings, progress: bool = True) -> dict:
    """Runs (or resumes, or confirms) a preparation; returns the manifest."""
    files = validate(settings)
    out = Path(settings.out)
    tok_path = out / "tokenizer.model"
    given, given_sha = None, None
    if settings.tokenizer:
        given = load_tokenizer(settings.tokenizer)  # refuses a file that is neither kind of tokenizer
        given_sha = sha256_file(given.path)
        tok_path = out / given.file_name
    fingerprint = _fingerprint(settings, files, given_sha)
    recorded = out / "prep.json"
    created = created_dir = False
    if recorded.exists():
        try:
            previous = json.loads(recorded.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PrepError(f"{recorded} is damaged ({err}); use another --out") from None
        diffs = _differences(previous, fingerprint) if isinstance(previous, dict) else ["prep.json is not an object"]
        if diffs:
            raise PrepError(f"{out} was prepared with other settings; use another --out or the same "
                            "arguments: " + "; ".join(diffs))
    else:
        if out.is_dir() and (any(out.glob("*.tar")) or (out / "manifest.json").exists()):
            raise PrepError(f"{out} holds shards from an unknown preparation; use an empty directory")
        created_dir = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        _write_json(recorded, fingerprint)
        created = True

    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)  # left by a kill just after the manifest was renamed
        log.info("%s is complete (manifest.json present): nothing to do", out)
        return json.loads(manifest_path.read_text())
    for f in files:
        if f.stat().st_size == 0:
            log.warning("%s: empty file (0 bytes): nothing to read", f)

    # tokenizer
    for stale in out.glob("spm-*"):  # a training killed mid-way
        shutil.rmtree(stale, ignore_errors=True)
    if given is not None:
        for src, name in given.files():
            dst = out / name
            if not dst.exists() or sha256_file(dst) != sha256_file(src):
                shutil.copyfile(src, str(dst) + ".tmp")
                os.replace(str(dst) + ".tmp", dst)
    elif not tok_path.exists():
        t0 = time.time()
        log.info("training a %d-token BPE tokenizer on up to %.0f MB of documents", settings.vocab_size,
                 settings.tokenizer_sample_mb)
        sample = _Counted(_tokenizer_sample(files, settings))
        try:
            train_tokenizer(sample, tok_path, settings.vocab_size, settings.workers)
        except TokenizerTrainingError as err:
            if created:  # nothing else was written: leave the directory as if this run never happened
                recorded.unlink()
                if created_dir and not any(out.iterdir()):
                    out.rmdir()
            if sample.count == 0:
                raise PrepError(f"no valid document in {', '.join(settings.inputs)} to train the tokenizer on") from None
            raise PrepError(f"--vocab-size {settings.vocab_size}: {err}") from None
        log.info("tokenizer trained in %.1f s -> %s", time.time() - t0, tok_path)
    tok = load_tokenizer(tok_path)
    vocab = tok.vocab_size
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    sample_tokens = settings.seq_len + 1
    packers = {s: Packer(s, out, sample_tokens, settings.samples_per_shard, dtype, tok.eos_id) for s in SPLITS}

    # resume
    state_dir = out / STATE_DIR
    state_dir.mkdir(exist_ok=True)
    stats = {"documents": {s: 0 for s in SPLITS}, "skipped": {}, "records": [0] * len(files),
             "problems": [[] for _ in files]}
    position = (0, 0)
    state_file = state_dir / "state.json"
    state, problem = _read_state(out, state_file) if state_file.exists() else (None, None)
    if problem:
        log.warning("%s: %s: starting the preparation over (it is deterministic: the same shards result)",
                    state_file, problem)
    if state is not None:
        for s in SPLITS:
            packers[s].restore(state["shards"][s], np.load(state_dir / state["pending"][s], allow_pickle=False))
        stats, position = state["stats"], tuple(state["position"])
        stats.setdefault("problems", [[] for _ in files])
        log.info("resuming at input %d record %d (%d train / %d val shards done)", position[0], position[1],
                 len(state["shards"]["train"]), len(state["shards"]["val"]))
    for stale in list(out.glob("*.tmp")) + list(state_dir.glob("*.tmp*")):
        stale.unlink()

    def save_state() -> None:
        tag = f"{len(packers['train'].shards)}-{len(packers['val'].shards)}"
        names = {s: f"pending-{s}-{tag}.npy" for s in SPLITS}
        for s in SPLITS:
            np.save(state_dir / (names[s] + ".tmp.npy"), packers[s].pending_tokens())
            os.replace(state_dir / (names[s] + ".tmp.npy"), state_dir / names[s])
        _write_json(state_file, {"position": list(position), "stats": stats, "pending": names,
                                 "shards": {s: packers[s].shards for s in SPLITS}})
        for old in state_dir.glob("pending-*.npy"):
            if old.name not in names.values():
                old.unlink()

    warn = _Warnings()
    problems: dict[tuple[int, int], ReadProblem] = {}
    skipped = collections.Counter(stats["skipped"])
    sets = frozenset(settings.pile_sets) if settings.pile_sets else None
    t0, tokens_done, docs_done = time.time(), 0, 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit=" doc", unit_scale=True, mininterval=1.0, desc="prep", dynamic_ncols=True)

    def batches():
        batch = []
        for fi in range(position[0], len(files)):
            start = position[1] if fi == position[0] else 0
            for rec in iter_records(files[fi], fi, start):
                if isinstance(rec, ReadProblem):
                    problems[(fi, rec.index)] = rec
                batch.append(rec)
                if len(batch) >= settings.batch_records:
                    yield batch
                    batch = []
        if batch:
            yield batch

    ctx = get_context("spawn")  # fork after torch/threads is unsafe; spawn is the same everywhere
    with ctx.Pool(settings.workers, initializer=init_worker, initargs=(tok.kind, tok_path.read_bytes())) as pool:
        in_flight: deque = deque()
        source = batches()
        exhausted = False
        while in_flight or not exhausted:
            while not exhausted and len(in_flight) < 2 * settings.workers:
                try:
                    in_flight.append(pool.apply_async(process_batch, (next(source), settings.val_fraction, sets)))
                except StopIteration:
                    exhausted = True
            if not in_flight:
                break
            wrote = False
            for fi, index, last_piece, skip, is_val, tokens in in_flight.popleft().get():
                stats["records"][fi] = index + 1
                position = (fi, index + 1)
                if skip is not None:
                    skipped[skip] += 1
                    problem = problems.pop((fi, index), None)
                    if problem is not None:
                        stats["problems"][fi].append({"kind": problem.kind, "line": index + 1, "offset": problem.offset,
                                                      "resumed_at": problem.resumed_at,
                                                      "partial_record_lost": problem.partial_record})
                        log.warning("%s: after line %d: %s", files[fi], index, problem.describe())
                    else:
                        warn.skip(files[fi], index, skip, "txt" if files[fi].name.endswith(".txt") else "json")
                    continue
                split = "val" if is_val else "train"
                if last_piece:
                    tokens = np.append(tokens, np.uint32(tok.eos_id))
                    stats["documents"][split] += 1
                    docs_done += 1
                tokens_done += len(tokens)
                wrote |= packers[split].add(tokens)
            if wrote:
                stats["skipped"] = dict(sorted(skipped.items()))
                save_state()
            if bar is not None:
                elapsed = max(time.time() - t0, 1e-9)
                bar.n = docs_done
                bar.set_postfix_str(f"{tokens_done / elapsed / 1e3:,.0f}k tok/s, "
                                    f"{len(packers['train'].shards)}+{len(packers['val'].shards)} shards", refresh=False)
                bar.refresh()
    if bar is not None:
        bar.close()

    dropped = {s: packers[s].finish() for s in SPLITS}
    stats["skipped"] = dict(sorted(skipped.items()))
    elapsed = time.time() - t0
    manifest = {
        "format": FORMAT,
        "seq_len": settings.seq_len,
        "sample_tokens": sample_tokens,
        "dtype": dtype.name,
        "eos_id": tok.eos_id,
        "tokenizer": {"file": tok_path.name, "kind": tok.kind, "sha256": sha256_file(tok_path), "vocab_size": vocab},
        "val_fraction": settings.val_fraction,
        "pile_sets": sorted(settings.pile_sets) if settings.pile_sets else None,
        "inputs": [{**file_fingerprint(f), "records_read": stats["records"][i],
                    "complete": not stats["problems"][i], "problems": stats["problems"][i]}
                   for i, f in enumerate(files)],
        "skipped": stats["skipped"],
        "splits": {s: {"documents": stats["documents"][s],
                       "samples": sum(x["samples"] for x in packers[s].shards),
                       "tokens": sum(x["tokens"] for x in packers[s].shards),
                       "dropped_tail_tokens": dropped[s],
                       "shards": packers[s].shards} for s in SPLITS},
    }
    _write_json(manifest_path, manifest)
    shutil.rmtree(state_dir, ignore_errors=True)
    log.info("done: %s train samples in %d shards, %s val samples in %d shards; %d documents skipped; "
             "this run %.1f s, %.0f tokens/s", f"{manifest['splits']['train']['samples']:,}",
             len(packers["train"].shards), f"{manifest['splits']['val']['samples']:,}", len(packers["val"].shards),
             sum(skipped.values()), elapsed, tokens_done / max(elapsed, 1e-9))
    return manifest

