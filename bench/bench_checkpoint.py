"""Checkpoint cost per rank, sharded vs gathered format: bytes written, extra host memory during a
save, time training is blocked (background write vs synchronous), total save and load time.

    python bench/bench_checkpoint.py [--preset 125m] [--out bench/results/checkpoint-cpu.json]

Each layout runs under torchrun with 4 CPU ranks (gloo): one optimizer step of the preset at a short
sequence, then for each format (`train.checkpoint_format`: gathered, then sharded) a synchronous
save, a background save (`train.async_checkpoint`) and a load of it, in the same processes. Extra
RSS is sampled every 2 ms above the RSS before the save. Bytes per rank are the files each rank
writes (rank 0 also writes the metadata, LR schedule, trainer state and manifest).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = [("DP4 ZeRO-1", 1, 1), ("DP4 ZeRO-3", 1, 3), ("TP2xDP2 ZeRO-1", 2, 1), ("TP2xDP2 ZeRO-3", 2, 3)]
FORMATS = ("gathered", "sharded")
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


def _written_by_me(path: Path, rank: int, speaks_for_stage: bool) -> int:
    """Bytes of the files `rank` wrote in checkpoint `path` (one pipeline stage: PP 1)."""
    mine = [path / "rng" / f"rank-{rank:05d}.pt", *(path / "state").glob(f"__{rank}_*.distcp")]
    if speaks_for_stage:
        mine += list((path / "model").glob("*.safetensors")) + list((path / "optim").glob("*.safetensors"))
    if rank == 0:
        mine += [path / name for name in ("lr_scheduler.pt", "trainer_state.json", "manifest.json", "state/.metadata")]
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
    result = {"rank": rank, "parameters": engine.num_parameters()}
    for fmt in FORMATS:
        engine.cfg.train.checkpoint_format = fmt
        ckpt = CheckpointManager(out / f"ckpt-{tp}-{zero}-{fmt}", keep_last=5)
        result[fmt] = {}
        for step, background in ((1, False), (2, True)):
            kind = "background" if background else "synchronous"
            torch.distributed.barrier()
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                path = ckpt.save(engine.save, step, {"step": step}, background=background)
                blocked = time.perf_counter() - t0
                ckpt.wait()
                total = time.perf_counter() - t0
            result[fmt][kind] = {"blocked_s": blocked, "total_s": total, "extra_rss_gb": rss.extra_gb,
                                 "bytes_written": _written_by_me(path, rank, layout.speaks_for_stage)}
        torch.distributed.barrier()
        t0 = time.perf_counter()
        engine.load(path, 2, ckpt.group)
        result[fmt]["load_s"] = time.perf_counter() - t0
        torch.distributed.barrier()
        if rank == 0:
            shutil.rmtree(out / f"ckpt-{tp}-{zero}-{fmt}", ignore_errors=True)
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
    row = {"layout": name, "tp": tp, "zero": zero, "ranks": RANKS, "parameters": ranks[0]["parameters"],
           "wall_s": round(time.time() - t0, 1)}
    for fmt in FORMATS:
        per_rank = [r[fmt]["synchronous"]["bytes_written"] for r in ranks]
        total_bytes = sum(per_rank)
        result = {"total_bytes": total_bytes, "bytes_per_rank": per_rank,
                  "max_bytes_per_rank_over_even_share": max(per_rank) / (total_bytes / RANKS),
                  "load_s": max(r[fmt]["load_s"] for r in ranks)}
        for kind in ("synchronous", "background"):
            result[kind] = {key: max(r[fmt][kind][key] for r in ranks) for key in ("blocked_s", "total_s", "extra_rss_gb")}
        result["blocked_background_over_synchronous"] = result["background"]["blocked_s"] / result["synchronous"]["blocked_s"]
        row[fmt] = result
    return row


def estimate_2_7b(rows: list[dict]) -> dict:
    """Paper estimate for the 2.7B preset on 64 GPUs (TP1 PP1 DP64 ZeRO-1, launch/configs/2.7b.yaml)
    from the measured per-byte costs of the DP4 ZeRO-1 row (this machine's disk and memory copies)."""
    from h3pretrain.config import preset
    from h3pretrain.model import HybridLM
    import torch

    with torch.device("meta"):
        params = HybridLM(preset("2.7b")).num_parameters()
    state = params * 12  # fp32 weight + Adam m + v
    row = next(r for r in rows if r["layout"] == "DP4 ZeRO-1")
    out = {"parameters": params, "state_bytes": state, "ranks": 64, "ranks_per_node": 8, "basis": row["layout"]}
    for fmt in FORMATS:
        r = row[fmt]
        biggest = max(r["bytes_per_rank"])
        write_s_per_byte = r["synchronous"]["total_s"] / biggest  # the slowest rank's write sets the pace
        blocked_s_per_byte = r["background"]["blocked_s"] / biggest
        rss_per_byte = r["synchronous"]["extra_rss_gb"] * 1e9 / (r["total_bytes"] if fmt == "gathered" else biggest)
        per_rank = state if fmt == "gathered" else state / 64  # gathered: one writer with the whole state
        held = state if fmt == "gathered" else state / 64  # gathered: every rank gathers the whole state
        out[fmt] = {"max_bytes_per_rank": per_rank, "extra_host_memory_per_rank_gb": held * rss_per_byte / 1e9,
                    "extra_host_memory_per_node_gb": 8 * held * rss_per_byte / 1e9,
                    "synchronous_save_s": per_rank * write_s_per_byte, "background_blocked_s": per_rank * blocked_s_per_byte}
    return out


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
        for fmt in FORMATS:
            r = row[fmt]
            print(f"{name} {fmt}: {r['total_bytes'] / 1e9:.2f} GB written, max per rank "
                  f"{r['max_bytes_per_rank_over_even_share']:.2f} x the even share | sync blocked "
                  f"{r['synchronous']['blocked_s']:.2f} s, background blocked {r['background']['blocked_s']:.2f} s "
                  f"(total {r['background']['total_s']:.2f} s) | extra RSS {r['synchronous']['extra_rss_gb']:.2f} GB "
                  f"| load {r['load_s']:.2f} s", flush=True)
        rows.append(row)
    estimate = estimate_2_7b(rows)
    print("2.7B on 64 GPUs (estimate): " + "; ".join(
        f"{fmt}: {estimate[fmt]['max_bytes_per_rank'] / 1e9:.1f} GB per rank max, "
        f"{estimate[fmt]['extra_host_memory_per_node_gb']:.0f} GB extra host memory per node, "
        f"blocked {estimate[fmt]['background_blocked_s']:.1f} s" for fmt in FORMATS))
    write_result({"preset": args.preset, "ranks": RANKS, "backend": "gloo (CPU)", "formats": list(FORMATS),
                  "command": "python bench/bench_checkpoint.py", "layouts": rows, "estimate_2.7b_64_gpus": estimate},
                 args.out, str(ROOT / "bench" / "results" / "checkpoint-cpu.json"))


if __name__ == "__main__":
    main()
