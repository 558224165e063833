"""Streaming readers for Pile-format inputs.

Inputs are `*.jsonl.zst` (the Pile), `*.jsonl`, or `*.txt`. A file is never loaded whole:
  - jsonl(.zst): one record per line, {"text": str, "meta": {"pile_set_name": str}};
  - txt: the whole file is one document, read in chunks of about 1 MiB cut at line ends.
The reader only splits raw bytes into records; parsing and validation happen in the tokenizer
workers (`parse_record`), so the main process stays light.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import zstandard

from h3pretrain.errors import InputFileError

SUFFIXES = (".jsonl.zst", ".jsonl", ".txt")
TXT_CHUNK_BYTES = 1 << 20
ZST_PIECE_BYTES = 1 << 16  # compressed bytes per decoder call: what an error can cost before the redo
ZST_MAGIC = zstandard.FRAME_HEADER


@dataclass(frozen=True)
class RawRecord:
    file_index: int
    index: int  # line number (0-based) for jsonl, chunk number for txt
    data: bytes
    kind: str  # "json" | "txt"
    last_piece: bool = True  # False for a txt chunk that is not the file's last
    split_key: bytes = b""  # txt: the split is decided on the file's first chunk


@dataclass(frozen=True)
class ReadProblem:
    """Part of a file that could not be read. It takes one record slot (`index`), so that
    record numbering, and therefore resume, stays deterministic."""

    file_index: int
    index: int
    kind: str  # "corrupt_zst" | "truncated_zst"
    offset: int  # byte offset in the compressed file where decoding failed
    resumed_at: int | None  # byte offset of the next frame read after it (None: none found)
    partial_record: bool  # a record was cut there and is lost
    detail: str

    def describe(self) -> str:
        lost = "1 partial record lost" if self.partial_record else "no partial record"
        if self.kind == "truncated_zst":
            return f"truncated: the last zstd frame ends early at byte {self.offset} ({lost})"
        after = (f"reading resumes at the next frame, byte {self.resumed_at} ({self.resumed_at - self.offset} "
                 "compressed bytes skipped; the records in them are lost)" if self.resumed_at is not None
                 else "no later frame found: the rest of the file is lost")
        return f"corrupt zstd data at byte {self.offset} ({self.detail}); {lost}; {after}"


def find_inputs(paths: list[str]) -> list[Path]:
    """Files and directories (searched recursively) -> sorted list of input files (absolute)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
        elif p.is_file():
            if not p.name.endswith(SUFFIXES):
                raise InputFileError(f"{p}: unsupported input (expected {', '.join(SUFFIXES)})")
            found.append(p)
        else:
            raise InputFileError(f"input path does not exist: {p}")
    if not found:
        raise InputFileError(f"no input files ({', '.join(SUFFIXES)}) under {', '.join(paths)}")
    return [f.resolve() for f in found]


def _split_lines(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines (with their newline) and the unfinished rest."""
    cut = data.rfind(b"\n") + 1
    return data[:cut].splitlines(keepends=True), data[cut:]


def _next_frame(raw, start: int) -> int | None:
    """Offset of the first zstd frame magic number at or after `start`."""
    raw.seek(start)
    carry, pos = b"", start
    while block := raw.read(ZST_PIECE_BYTES * 16):
        data = carry + block
        hit = data.find(ZST_MAGIC)
        if hit >= 0:
            return pos - len(carry) + hit
        carry = data[-(len(ZST_MAGIC) - 1):]
        pos += len(block)
    return None


def _zst_lines(raw) -> Iterator[bytes | tuple]:
    """Decoded lines of a (multi-frame) zstd file, decoding frame by frame.

    Every byte the decoder produced is kept: on an error the failing piece is decoded again byte
    by byte, so the lines before the damage are yielded. Then reading goes on at the next frame's
    magic number. Damage is yielded in place as ("corrupt_zst"|"truncated_zst", offset, resumed_at,
    partial, detail)."""
    frame_start, fed, pending = 0, 0, b""
    dobj = zstandard.ZstdDecompressor().decompressobj()
    raw.seek(0)
    while True:
        piece = raw.read(ZST_PIECE_BYTES)
        if not piece:
            break
        try:
            out = dobj.decompress(piece)
        except zstandard.ZstdError as err:
            # the piece's output is lost with the exception: redo the frame up to it, then byte by byte
            redo = zstandard.ZstdDecompressor().decompressobj()
            raw.seek(frame_start)
            for done in range(0, fed, ZST_PIECE_BYTES):
                redo.decompress(raw.read(min(ZST_PIECE_BYTES, fed - done)))
            out, failed_at = b"", frame_start + fed
            for i in range(len(piece)):
                try:
                    out += redo.decompress(piece[i:i + 1])
                except zstandard.ZstdError:
                    failed_at = frame_start + fed + i
                    break
            lines, pending = _split_lines(pending + out)
            yield from lines
            resumed = _next_frame(raw, failed_at + 1)
            yield ("corrupt_zst", failed_at, resumed, bool(pending), str(err))
            pending = b""
            if resumed is None:
                return
            raw.seek(resumed)
            frame_start, fed = resumed, 0
            dobj = zstandard.ZstdDecompressor().decompressobj()
            continue
        lines, pending = _split_lines(pending + out)
        yield from lines
        if dobj.eof:  # the frame ended inside this piece: the rest belongs to the next frame(s)
            used = len(piece) - len(dobj.unused_data)
            frame_start, fed = frame_start + fed + used, 0
            raw.seek(frame_start)
            dobj = zstandard.ZstdDecompressor().decompressobj()
        else:
            fed += len(piece)
    if fed:  # a frame was begun and never finished
        yield ("truncated_zst", frame_start + fed, None, bool(pending), "incomplete last frame")
    elif pending:
        yield pending


def _lines(stream) -> Iterator[bytes]:
    while line := stream.readline():
        yield line


def iter_records(path: Path, file_index: int, start: int = 0) -> Iterator[RawRecord | ReadProblem]:
    """Records of one file from record `start` on. Damaged zstd data appears in the stream as a
    ReadProblem (after every record decoded before it); reading continues where it can."""
    name = path.name
    if name.endswith(".txt"):
        yield from _txt_records(path, file_index, start)
        return
    with open(path, "rb") as raw:
        source = _zst_lines(raw) if name.endswith(".zst") else _lines(raw)
        for index, item in enumerate(source):
            if index < start:
                continue
            if isinstance(item, tuple):
                kind, offset, resumed, partial, detail = item
                yield ReadProblem(file_index, index, kind, offset, resumed, partial, detail)
            elif item.strip():
                yield RawRecord(file_index, index, item, "json")


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
    if rec.index == 0 or rec.kind == "json":
        text = text.removeprefix("\ufeff")  # a byte-order mark (also where files were concatenated)
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
    return {"path": str(Path(path).resolve()), "bytes": st.st_size}
