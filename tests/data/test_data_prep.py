"""`h3pretrain prep`: round trip to text, resumability after SIGKILL, bad inputs."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import zstandard

from data_prep.corpus import build
from data_prep.prep import PrepError, PrepSettings, prepare
from data_prep.reader import split_is_val
from h3pretrain.data import Manifest, ShardReader
from h3pretrain.errors import InputFileError

EOS = 2


from conftest import corpus_docs, prep_settings as _settings


_docs = corpus_docs


def _stream(root, split):
    reader = ShardReader(Manifest.load(root), split)
    return np.concatenate([reader.shard_samples(i).ravel() for i in range(len(reader.shards))])


def test_samples_detokenize_to_the_source_documents(corpus, prepared):
    out, manifest = prepared
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    docs = _docs(corpus)
    for split in ("train", "val"):
        expected = [d for d in docs if split_is_val(d.encode(), 0.05) == (split == "val")]
        stream = _stream(out, split)
        ends = np.flatnonzero(stream == EOS)
        pieces = np.split(stream, ends + 1)[:-1]  # full documents only (the tail is cut mid-document)
        assert len(pieces) >= len(expected) - 2 and len(pieces) > 0
        for got, want in zip(pieces, expected):
            assert sp.decode(got[:-1].tolist()) == want
        assert manifest["splits"][split]["documents"] == len(expected)
    assert manifest["splits"]["val"]["samples"] > 0
    assert manifest["dtype"] == "uint16" and manifest["sample_tokens"] == 65
    total_docs = sum(s["documents"] for s in manifest["splits"]["train"]["shards"])
    assert total_docs == len(np.flatnonzero(_stream(out, "train") == EOS))


def test_rerun_is_a_no_op_and_other_settings_are_refused(corpus, prepared, tmp_path):
    out, manifest = prepared
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert prepare(_settings(corpus, out), progress=False) == manifest
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(PrepError, match="seq_len: directory has 64, this run asks 128"):
        prepare(_settings(corpus, out, seq_len=128), progress=False)
    with pytest.raises(PrepError, match="tokenizer"):
        prepare(_settings(corpus, out, vocab_size=2000), progress=False)
    with pytest.raises(InputFileError, match="does not exist"):
        prepare(_settings(tmp_path / "missing", tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()  # refused before any work


def _files(root):
    return {p.name: p.read_bytes() for p in sorted(Path(root).iterdir())}


def _run_cli(corpus, out):
    args = [sys.executable, "-m", "h3pretrain.cli", "prep", str(corpus), "--out", str(out), "--seq-len", "64",
            "--vocab-size", "1000", "--tokenizer-sample-mb", "1", "--val-fraction", "0.05",
            "--samples-per-shard", "16", "--workers", "2", "--quiet"]
    return subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_at_any_point_then_rerun_is_byte_identical(tmp_path):
    corpus = tmp_path / "corpus"
    build(corpus, max_docs=40, files=2)
    ref = tmp_path / "ref"
    assert _run_cli(corpus, ref).wait() == 0
    reference = _files(ref)
    n_shards = sum(name.endswith(".tar") for name in reference)
    assert n_shards > 40
    out = tmp_path / "killed"
    # kill while the tokenizer trains, then after a few, many and most shards
    for when in ("tokenizer", 3, n_shards // 2, n_shards - 5):
        proc = _run_cli(corpus, out)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if when == "tokenizer":
                if any(out.glob("spm-*")):
                    break
            elif len(list(out.glob("train-*.tar"))) >= when:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"finished before the kill point {when}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _run_cli(corpus, out).wait() == 0
    assert _files(out) == reference


def _zst(lines):
    return zstandard.ZstdCompressor().compress(b"".join(lines))


def test_bad_inputs_are_skipped_counted_and_named(tmp_path, caplog):
    good = [json.dumps({"text": f"document number {i} " * 20, "meta": {"pile_set_name": "A"}}).encode() + b"\n"
            for i in range(30)]
    bad = [
        b"{not json\n",
        json.dumps({"meta": {}}).encode() + b"\n",
        json.dumps({"text": 42}).encode() + b"\n",
        json.dumps({"text": "   \n", "meta": {"pile_set_name": "A"}}).encode() + b"\n",
        b'{"text": "caf\xe9 latin-1"}\n',
        json.dumps({"text": "a set we filter out", "meta": {"pile_set_name": "B"}}).encode() + b"\n",
    ]
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.jsonl.zst").write_bytes(_zst(good[:10] + bad + good[10:20]))
    blob = _zst(good[20:] * 50)
    (inputs / "b.jsonl.zst").write_bytes(blob[: len(blob) // 2] + bytes(200) + blob[len(blob) // 2 + 200:])
    (inputs / "c.jsonl").write_bytes(b"".join(good[:5]))
    (inputs / "d.txt").write_text("A plain text document.\n" * 40)
    caplog.set_level("WARNING")
    manifest = prepare(PrepSettings(inputs=[str(inputs)], out=str(tmp_path / "out"), seq_len=16, vocab_size=300,
                                    val_fraction=0.0, samples_per_shard=8, pile_sets=["A"], workers=1),
                       progress=False)
    assert manifest["skipped"] == {"corrupt_zst": 1, "empty": 1, "filtered_set": 1, "invalid_json": 1,
                                   "invalid_utf8": 1, "missing_text": 1, "non_string_text": 1}
    a, b = manifest["inputs"][0], manifest["inputs"][1]
    assert a["complete"] and a["records_read"] == 26 and a["problems"] == []
    assert not b["complete"] and [p["kind"] for p in b["problems"]] == ["corrupt_zst"]
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "a.jsonl.zst: line 11: skipped (invalid_json)" in messages
    assert "a.jsonl.zst: line 15: skipped (invalid_utf8)" in messages
    assert f"b.jsonl.zst: after line 0: corrupt zstd data at byte {b['problems'][0]['offset']}" in messages
    # documents: 20 good + the readable part of b + 5 + the txt file
    assert manifest["splits"]["train"]["documents"] >= 26


def _records(n, start=0):
    def words(i):
        rng = random.Random(i)
        return " ".join("".join(rng.choice("etaoinshrdlucmfw") for _ in range(rng.randint(2, 7))) for _ in range(12))
    return [json.dumps({"text": f"record {i}: {words(i)}"}).encode() + b"\n" for i in range(start, start + n)]


def _prep_small(tmp_path, inputs, **kw):
    settings = dict(inputs=[str(i) for i in inputs], out=str(tmp_path / "out"), seq_len=16, vocab_size=300,
                    val_fraction=0.0, samples_per_shard=8, workers=1, tokenizer_sample_mb=1.0)
    settings.update(kw)
    return prepare(PrepSettings(**settings), progress=False)


def _damage(blob: bytes, start: int, n: int = 24) -> bytes:
    bad = bytearray(blob)
    for j in range(start, start + n):
        bad[j] = 0
    return bytes(bad)


def test_a_corrupt_frame_loses_only_its_own_records_and_reading_resumes_at_the_next(tmp_path, caplog):
    """Eight frames of 25 records; the fourth is damaged. Every record of the other seven frames is
    kept (none lost to a read-ahead buffer), and the warning names the byte offset, not a good line."""
    comp = zstandard.ZstdCompressor()
    frames = [comp.compress(b"".join(_records(25, 25 * f))) for f in range(8)]
    at = sum(map(len, frames[:3]))
    frames[3] = _damage(frames[3], len(frames[3]) // 2)
    path = tmp_path / "multi.jsonl.zst"
    path.write_bytes(b"".join(frames))
    caplog.set_level("WARNING")
    manifest = _prep_small(tmp_path, [path])
    entry = manifest["inputs"][0]
    assert manifest["splits"]["train"]["documents"] == 7 * 25
    assert manifest["skipped"] == {"corrupt_zst": 1}
    assert not entry["complete"]
    [problem] = entry["problems"]
    assert at <= problem["offset"] < at + len(frames[3]) and problem["resumed_at"] == at + len(frames[3])
    assert f"corrupt zstd data at byte {problem['offset']}" in caplog.text
    assert "skipped (invalid_json)" not in caplog.text


def test_records_decoded_before_damage_inside_a_frame_are_kept(tmp_path):
    """One frame of several 128 KiB blocks, damaged in its last block: the blocks before it decode,
    and each of their records is kept (the decoder call that fails is redone byte by byte)."""
    lines = _records(4000)
    blob = zstandard.ZstdCompressor(level=1).compress(b"".join(lines))
    path = tmp_path / "one.jsonl.zst"
    path.write_bytes(_damage(blob, len(blob) - 40, 8))
    manifest = _prep_small(tmp_path, [path])
    kept = manifest["splits"]["train"]["documents"]
    assert manifest["skipped"] == {"corrupt_zst": 1}
    decodable = (sum(map(len, lines)) // 131072) * 131072  # the whole blocks before the damaged last one
    assert kept == b"".join(lines)[:decodable].count(b"\n")
    assert manifest["inputs"][0]["problems"][0]["resumed_at"] is None


def test_a_truncated_zst_is_reported_truncated(tmp_path, caplog):
    comp = zstandard.ZstdCompressor()
    blob = comp.compress(b"".join(_records(30))) + comp.compress(b"".join(_records(30, 30)))
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(blob[:-25])
    caplog.set_level("WARNING")
    manifest = _prep_small(tmp_path, [path])
    entry = manifest["inputs"][0]
    assert not entry["complete"] and [p["kind"] for p in entry["problems"]] == ["truncated_zst"]
    assert manifest["skipped"] == {"truncated_zst": 1}  # not an invalid_json partial line
    assert manifest["splits"]["train"]["documents"] == 30
    assert "truncated" in caplog.text


def test_bom_lines_are_read_and_empty_files_are_named(tmp_path, caplog):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b"".join(_records(3)) + b"\xef\xbb\xbf" + _records(1, 3)[0])
    (tmp_path / "in" / "empty.jsonl.zst").write_bytes(b"")
    (tmp_path / "in" / "bom.txt").write_bytes(b"\xef\xbb\xbf" + b"plain text " * 30)
    caplog.set_level("WARNING")
    manifest = _prep_small(tmp_path, [tmp_path / "in"])
    assert manifest["skipped"] == {}
    assert manifest["splits"]["train"]["documents"] == 5
    assert "empty.jsonl.zst: empty file (0 bytes)" in caplog.text
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    text = sp.decode(_stream(tmp_path / "out", "train").tolist())
    assert "\ufeff" not in text, repr(text[text.index("\ufeff") - 30:][:80])
    assert "plain text " * 20 in text  # the tail shorter than a sample is dropped


@pytest.mark.parametrize("change, named", [
    (dict(vocab_size=10), "--vocab-size 10"),
    (dict(workers=0), "--workers 0"),
    (dict(val_fraction=1.5), "--val-fraction 1.5"),
    (dict(val_fraction=-0.1), "--val-fraction -0.1"),
    (dict(seq_len=0), "--seq-len 0"),
    (dict(samples_per_shard=-1), "--samples-per-shard -1"),
    (dict(tokenizer_sample_mb=0.0), "--tokenizer-sample-mb 0.0"),
    (dict(vocab_size=100000), "--vocab-size 100000"),  # more than the sample can fill: found by sentencepiece
])
def test_bad_prep_arguments_write_nothing_and_the_corrected_command_runs(tmp_path, change, named):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"".join(_records(40)))
    with pytest.raises(PrepError, match=named.replace("-", "\\-").replace(".", "\\.")):
        _prep_small(tmp_path, [path], **change)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert _prep_small(tmp_path, [path])["splits"]["train"]["documents"] == 40


def test_every_input_empty_is_refused(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b"")
    with pytest.raises(PrepError, match="every input file is empty"):
        _prep_small(tmp_path, [tmp_path / "e.jsonl"])
    assert not (tmp_path / "out").exists()


def test_relative_and_absolute_inputs_are_the_same_preparation(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b"".join(_records(40)))
    first = _prep_small(tmp_path, [tmp_path / "in"])
    monkeypatch.chdir(tmp_path)
    assert _prep_small(tmp_path, ["in"]) == first
    assert _prep_small(tmp_path, ["./in/a.jsonl"]) == first


def test_a_state_left_behind_after_the_manifest_is_cleaned_up(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"".join(_records(40)))
    first = _prep_small(tmp_path, [path])
    state = tmp_path / "out" / ".prep-state"
    state.mkdir()
    (state / "state.json").write_text("{}")  # a kill between the manifest's rename and this removal
    assert _prep_small(tmp_path, [path]) == first
    assert not state.exists()


def test_a_damaged_resume_state_starts_over_with_the_same_result(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"".join(_records(300)))
    reference = _prep_small(tmp_path, [path], out=str(tmp_path / "ref"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "prep.json").write_text((tmp_path / "ref" / "prep.json").read_text().replace(str(tmp_path / "ref"), str(out)))
    (out / ".prep-state").mkdir()
    (out / ".prep-state" / "state.json").write_bytes(os.urandom(64))
    again = _prep_small(tmp_path, [path])
    assert again["splits"] == reference["splits"]
