"""Streaming readers for Pile-format inputs.

Inputs are `*.jsonl.zst` (the Pile), `*.jsonl`, or `*.txt`. A file is never loaded whole:
  - jsonl(.zst): one record per line, {"text": str, "meta": {"pile_set_name": str}};
  - txt: the whole file is one document, read in chunks of about 1 MiB cut at line ends.
The reader only splits raw bytes into records; parsing and validation happen in the tokenizer
workers (`parse_record`), so the main process stays light.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import zstandard

SUFFIXES = (".jsonl.zst", ".jsonl", ".txt")
TXT_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class RawRecord:
    file_index: int
    index: int  # line number (0-based) for jsonl, chunk number for txt
    data: bytes
    kind: str  # "json" | "txt"
    last_piece: bool = True  # False for a txt chunk that is not the file's last
    split_key: bytes = b""  # txt: the split is decided on the file's first chunk


class CorruptInput(Exception):
    def __init__(self, index: int, reason: str):
        super().__init__(reason)
        self.index, self.reason = index, reason


def find_inputs(paths: list[str]) -> list[Path]:
    """Files and directories (searched recursively) -> sorted list of input files."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
        elif p.is_file():
            if not p.name.endswith(SUFFIXES):
                raise ValueError(f"{p}: unsupported input (expected {', '.join(SUFFIXES)})")
            found.append(p)
        else:
            raise FileNotFoundError(f"input path does not exist: {p}")
    if not found:
        raise ValueError(f"no input files ({', '.join(SUFFIXES)}) under {', '.join(paths)}")
    return found


def _lines(stream: io.BufferedIOBase) -> Iterator[bytes]:
    while True:
        line = stream.readline()
        if not line:
            return
        yield line


def iter_records(path: Path, file_index: int, start: int = 0) -> Iterator[RawRecord]:
    """Records of one file from record `start` on. A corrupt zst frame raises CorruptInput
    (carrying the index of the first unreadable line) after the readable lines were yielded."""
    name = path.name
    if name.endswith(".txt"):
        yield from _txt_records(path, file_index, start)
        return
    with open(path, "rb") as raw:
        if name.endswith(".zst"):
            stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
        else:
            stream = raw
        index = 0
        try:
            for line in _lines(stream):
                if index >= start and line.strip():
                    yield RawRecord(file_index, index, line, "json")
                index += 1
        except zstandard.ZstdError as err:
            raise CorruptInput(index, f"corrupt zstd data: {err}") from None


def _txt_records(path: Path, file_index: int, start: int) -> Iterator[RawRecord]:
    with open(path, "rb") as f:
        first = f.readline() + f.read(TXT_CHUNK_BYTES)
        first += f.readline()  # cut at a line end so no UTF-8 sequence is split
        key = hashlib.blake2b(first, digest_size=8).digest()
        chunk, index = first, 0
        while chunk:
            nxt = f.read(TXT_CHUNK_BYTES)
            if nxt:
                nxt += f.readline()
            if index >= start:
                yield RawRecord(file_index, index, chunk, "txt", last_piece=not nxt, split_key=key)
            chunk, index = nxt, index + 1


@dataclass
class Parsed:
    text: str | None
    skip: str | None = None  # reason, when skipped
    is_val: bool = False


def split_is_val(key: bytes, val_fraction: float) -> bool:
    """Stable train/val assignment from a hash of the document."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
    return h < val_fraction * 2**64


def parse_record(rec: RawRecord, val_fraction: float, sets: frozenset[str] | None) -> Parsed:
    try:
        text = rec.data.decode("utf-8")
    except UnicodeDecodeError:
        return Parsed(None, "invalid_utf8")
    if rec.kind == "txt":
        if rec.index == 0 and rec.last_piece and not text.strip():
            return Parsed(None, "empty")
        return Parsed(text, is_val=split_is_val(rec.split_key, val_fraction))
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return Parsed(None, "invalid_json")
    if not isinstance(obj, dict) or "text" not in obj:
        return Parsed(None, "missing_text")
    doc = obj["text"]
    if not isinstance(doc, str):
        return Parsed(None, "non_string_text")
    if sets is not None:
        meta = obj.get("meta")
        name = meta.get("pile_set_name") if isinstance(meta, dict) else None
        if name not in sets:
            return Parsed(None, "filtered_set")
    if not doc.strip():
        return Parsed(None, "empty")
    try:
        encoded = doc.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from "\ud800"-style JSON escapes
        return Parsed(None, "invalid_utf8")
    return Parsed(doc, is_val=split_is_val(encoded, val_fraction))


def file_fingerprint(path: Path) -> dict:
    st = os.stat(path)
    return {"path": str(path), "bytes": st.st_size}
