"""Tokenization throughput of `h3pretrain prep` on the local corpus (make bench-prep), for a
SentencePiece model and for a Hugging Face tokenizer.json (a byte-level BPE, GPT-2's kind, trained
here with the `tokenizers` library), against each library's own single-thread encode speed.

For each tokenizer (vocabulary --vocab-size, trained once on the corpus): the library's batch
encode of every document on one thread, in this process (the ceiling for one worker); then the
whole `prepare` call (read, tokenize, pack, write; worker start-up included) with 1 worker and with
every core. Appends a table to bench/results/prep.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from data_prep.corpus import build
from data_prep.prep import PrepSettings, prepare


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _documents(corpus: Path) -> list[str]:
    import json

    import zstandard

    docs = []
    for path in sorted(corpus.glob("*.jsonl.zst")):
        with zstandard.open(path, "rt", encoding="utf-8") as f:
            docs += [json.loads(line)["text"] for line in f if line.strip()]
    return docs


def _train_hf(docs: list[str], vocab_size: int, out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(docs, trainer)
    tok.add_special_tokens(["<|endoftext|>"])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out / "tokenizer.json"


def library_speed(path: Path, docs: list[str], repeat: int) -> tuple[int, float]:
    """(tokens, seconds) of the library's own batch encode of `docs` x repeat on one thread."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    tok.encode_batch(docs[:50])  # warm-up
    t0 = time.perf_counter()
    tokens = sum(len(ids) for _ in range(repeat) for ids in tok.encode_batch(docs))
    return tokens, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ap.add_argument("--repeat", type=int, default=12, help="read the corpus this many times (a steady state: ~35M tokens)")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--results", type=Path, default=Path("bench/results/prep.md"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.corpus.exists():
        build(args.corpus)
    cores = os.cpu_count() or 1
    docs = _documents(args.corpus)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spm_dir = Path(tmp, "spm")
        prepare(PrepSettings(inputs=[str(args.corpus)], out=str(spm_dir), seq_len=2048, vocab_size=args.vocab_size,
                             tokenizer_sample_mb=50, samples_per_shard=1024), progress=False)
        tokenizers = {"SentencePiece BPE": spm_dir / "tokenizer.model",
                      "tokenizer.json (byte-level BPE)": _train_hf(docs, args.vocab_size, Path(tmp, "hf"))}
        for name, path in tokenizers.items():
            tokens, seconds = library_speed(path, docs, args.repeat)
            ceiling = tokens / seconds
            print(f"{name}: the library alone, one thread: {ceiling:,.0f} tokens/s", flush=True)
            for workers in sorted({1, cores}):
                out = Path(tmp, f"w{workers}")
                t0 = time.perf_counter()
                manifest = prepare(PrepSettings(inputs=[str(args.corpus)] * args.repeat, out=str(out), seq_len=2048,
                                                tokenizer=str(path), samples_per_shard=1024, workers=workers),
                                   progress=False)
                elapsed = time.perf_counter() - t0
                made = sum(manifest["splits"][s]["tokens"] + manifest["splits"][s]["dropped_tail_tokens"]
                           for s in ("train", "val"))
                rows.append((name, ceiling, workers, made, elapsed))
                print(f"  prep, workers={workers}: {made:,} tokens in {elapsed:.2f} s = {made / elapsed:,.0f} tokens/s "
                      f"({made / elapsed / workers:,.0f} per worker, {made / elapsed / workers / ceiling:.0%} of the "
                      "library's one-thread speed)", flush=True)
                shutil.rmtree(out)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"\n## {stamp}: {cpu_model()}, {cores} cores, Python {platform.python_version()}",
             f"command: `{' '.join([Path(sys.executable).name, *sys.argv])}` (make bench-prep); corpus {args.corpus} "
             f"x{args.repeat}, vocab {args.vocab_size}, seq_len 2048; prep: wall time of the whole `prepare` call "
             "(worker start-up included, tokenizer training excluded); library: its batch encode of the same "
             "documents on one thread, in-process",
             "", "| tokenizer | library, 1 thread (tokens/s) | prep workers | tokens | seconds | tokens/s | "
                 "tokens/s per worker | per worker / library |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {c:,.0f} | {w} | {t:,} | {e:.2f} | {t / e:,.0f} | {t / e / w:,.0f} | {t / e / w / c:.0%} |"
              for n, c, w, t, e in rows]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if not args.results.exists():
        args.results.write_text("# `h3pretrain prep` throughput\n")
    with open(args.results, "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
