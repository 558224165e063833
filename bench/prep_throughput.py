"""Tokenization throughput of `h3pretrain prep` on the local corpus (make bench-prep).

Trains a tokenizer once, then times the tokenize -> pack -> write phase with 1 worker and with
all cores, and appends the result (machine, command, tokens/s, tokens/s per core) to
bench/results/prep.md.
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ap.add_argument("--repeat", type=int, default=4, help="read the corpus this many times (longer steady state)")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--results", type=Path, default=Path("bench/results/prep.md"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.corpus.exists():
        build(args.corpus)
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp, "tok")
        prepare(PrepSettings(inputs=[str(args.corpus)], out=str(tok_dir), seq_len=2048, vocab_size=args.vocab_size,
                             tokenizer_sample_mb=50, samples_per_shard=1024), progress=False)
        for workers in sorted({1, cores}):
            out = Path(tmp, f"w{workers}")
            t0 = time.perf_counter()
            manifest = prepare(PrepSettings(inputs=[str(args.corpus)] * args.repeat, out=str(out), seq_len=2048,
                                            tokenizer=str(tok_dir / "tokenizer.model"), samples_per_shard=1024,
                                            workers=workers), progress=False)
            elapsed = time.perf_counter() - t0
            tokens = sum(manifest["splits"][s]["tokens"] + manifest["splits"][s]["dropped_tail_tokens"]
                         for s in ("train", "val"))
            rows.append((workers, tokens, elapsed))
            print(f"workers={workers}: {tokens:,} tokens in {elapsed:.2f} s = {tokens / elapsed:,.0f} tokens/s "
                  f"({tokens / elapsed / workers:,.0f} per worker)", flush=True)
            shutil.rmtree(out)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"\n## {stamp}: {cpu_model()}, {cores} cores, Python {platform.python_version()}",
             f"command: `{' '.join([Path(sys.executable).name, *sys.argv])}` (make bench-prep); corpus {args.corpus} "
             f"x{args.repeat}, vocab {args.vocab_size}, seq_len 2048; wall time of the whole `prepare` call "
             "(worker start-up included, tokenizer training excluded)",
             "", "| workers | tokens | seconds | tokens/s | tokens/s per worker |", "|---|---|---|---|---|"]
    lines += [f"| {w} | {t:,} | {e:.2f} | {t / e:,.0f} | {t / e / w:,.0f} |" for w, t, e in rows]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if not args.results.exists():
        args.results.write_text("# `h3pretrain prep` throughput\n")
    with open(args.results, "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
