"""`h3pretrain prep`: round trip to text, resumability after SIGKILL, bad inputs."""
import json
import os
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

EOS = 2


from conftest import prep_settings as _settings


def _docs(corpus):
    docs = []
    for path in sorted(Path(corpus).glob("*.jsonl.zst")):
        data = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True).read()
        docs += [json.loads(line)["text"] for line in data.decode().splitlines()]
    return docs


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
    with pytest.raises(FileNotFoundError, match="does not exist"):
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
    assert a["complete"] and a["records_read"] == 26
    assert not b["complete"] and b["stopped_at_line"] >= 1
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "a.jsonl.zst: line 11: skipped (invalid_json)" in messages
    assert "a.jsonl.zst: line 15: skipped (invalid_utf8)" in messages
    assert "b.jsonl.zst" in messages and "corrupt_zst" in messages
    # documents: 20 good + the readable part of b + 5 + the txt file
    assert manifest["splits"]["train"]["documents"] >= 26
