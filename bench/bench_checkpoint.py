"""Checkpoint cost per rank: bytes written, extra host memory during a save, time training is
blocked (background write vs synchronous), total save and load time.

    python bench/bench_checkpoint.py [--preset 125m] [--out bench/results/checkpoint-cpu.json]

Each layout runs under torchrun with 4 CPU ranks (gloo): one optimizer step of the preset at a short
sequence, then a synchronous save, a background save (`train.async_checkpoint`) and a load of it.
Extra RSS is sampled every 2 ms above the RSS before the save. This measures the present format
(the state of each pipeline stage gathered into full tensors on every rank, written by one rank
per stage), the baseline a sharded format is to be compared against.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = [("DP4 ZeRO-1", 1, 1), ("DP4 ZeRO-3", 1, 3), ("TP2xDP2 ZeRO-1", 2, 1)]
RANKS = 4


class PeakRSS:
    """Peak resident memory above the level at start, sampled in a thread."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def extra_gb(self) -> float:
        return (self.peak - self.base) / 1e9


def _written_by_me(path: Path, rank: int, speaks_for_stage: bool, pp_rank: int, pp: int) -> int:
    from h3pretrain.checkpoint.canonical import stage_file

    mine = [path / "rng" / f"rank-{rank:05d}.pt"]
    if speaks_for_stage:
        mine += [path / sub / stage_file(pp_rank, pp) for sub in ("model", "optim")]
    if rank == 0:
        mine += [path / name for name in ("lr_scheduler.pt", "trainer_state.json", "manifest.json")]
    return sum(f.stat().st_size for f in mine if f.is_file())


def rank_main(out: Path, preset: str, tp: int, zero: int, seq_len: int) -> None:
    import torch

    from h3pretrain.checkpoint import CheckpointManager
    from h3pretrain.config import Config, ParallelConfig, TrainConfig, preset as model_preset
    from h3pretrain.train.engine import TrainingEngine
    from h3pretrain.train.loop import init_distributed

    rank, world, device = init_distributed()
    dp = world // tp
    cfg = Config(model=model_preset(preset), parallel=ParallelConfig(tp=tp),
                 train=TrainConfig(global_batch=dp, micro_batch=1, precision="fp32", zero_stage=zero, steps=10,
                                   compile=False))
    engine = TrainingEngine(cfg, device, seq_len)
    layout = engine.layout
    batch = torch.randint(0, cfg.model.vocab_size, (dp, seq_len + 1), generator=torch.Generator().manual_seed(0))
    engine.train_step(batch.chunk(layout.dp)[layout.dp_rank])
    ckpt = CheckpointManager(out / f"ckpt-{tp}-{zero}", keep_last=5)
    result = {"rank": rank, "parameters": engine.num_parameters()}
    for step, background in ((1, False), (2, True)):
        kind = "background" if background else "synchronous"
        torch.distributed.barrier()
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            path = ckpt.save(engine.save, step, {"step": step}, background=background)
            blocked = time.perf_counter() - t0
            ckpt.wait()
            total = time.perf_counter() - t0
        result[kind] = {"blocked_s": blocked, "total_s": total, "extra_rss_gb": rss.extra_gb,
                        "bytes_written": _written_by_me(path, rank, layout.speaks_for_stage, layout.pp_rank,
                                                        layout.pp)}
    torch.distributed.barrier()
    t0 = time.perf_counter()
    engine.load(path, 2)
    result["load_s"] = time.perf_counter() - t0
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()


def run_layout(name: str, tp: int, zero: int, preset: str, seq_len: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
               __file__, "--rank-main", tmp, "--preset", preset, "--tp", str(tp), "--zero", str(zero),
               "--seq-len", str(seq_len)]
        t0 = time.time()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise SystemExit(f"{name}: torchrun failed\n{done.stderr[-4000:]}")
        ranks = [json.loads((Path(tmp) / f"rank-{r}.json").read_text()) for r in range(RANKS)]
    total_bytes = sum(r["synchronous"]["bytes_written"] for r in ranks)
    row = {"layout": name, "tp": tp, "zero": zero, "ranks": RANKS, "parameters": ranks[0]["parameters"],
           "wall_s": round(time.time() - t0, 1), "total_bytes": total_bytes,
           "bytes_per_rank": [r["synchronous"]["bytes_written"] for r in ranks],
           "max_bytes_per_rank_over_even_share": max(r["synchronous"]["bytes_written"] for r in ranks) /
           (total_bytes / RANKS),
           "load_s": max(r["load_s"] for r in ranks)}
    for kind in ("synchronous", "background"):
        row[kind] = {key: max(r[kind][key] for r in ranks) for key in ("blocked_s", "total_s", "extra_rss_gb")}
    row["blocked_background_over_synchronous"] = row["background"]["blocked_s"] / row["synchronous"]["blocked_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--out", default="")
    ap.add_argument("--rank-main", help=argparse.SUPPRESS)
    ap.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--zero", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_main:
        rank_main(Path(args.rank_main), args.preset, args.tp, args.zero, args.seq_len)
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from common import write_result

    rows = []
    for name, tp, zero in LAYOUTS:
        row = run_layout(name, tp, zero, args.preset, args.seq_len)
        print(f"{name}: {row['total_bytes'] / 1e9:.2f} GB written, max per rank {row['max_bytes_per_rank_over_even_share']:.2f}"
              f" x the even share | sync blocked {row['synchronous']['blocked_s']:.2f} s, background blocked "
              f"{row['background']['blocked_s']:.2f} s (total {row['background']['total_s']:.2f} s) | extra RSS "
              f"{row['synchronous']['extra_rss_gb']:.2f} GB | load {row['load_s']:.2f} s", flush=True)
        rows.append(row)
    write_result({"preset": args.preset, "ranks": RANKS, "backend": "gloo (CPU)", "format": "gathered per stage",
                  "command": "python bench/bench_checkpoint.py", "layouts": rows},
                 args.out, str(ROOT / "bench" / "results" / "checkpoint-cpu.json"))


if __name__ == "__main__":
    main()
