"""Long context on CPU: peak memory and step time per context-parallel rank, for the tiny hybrid
(4 layers, attention at layer 2) and the same model with H3 layers only, at L = 8K and 32K tokens
and cp = 1, 2, 4 (one sequence per step, fp32, the training engine on gloo).

    python bench/bench_context.py [--seq-lens 8192,32768] [--cps 1,2,4] [--steps 3]

Each (model, L, cp) runs under torchrun in fresh processes. Per rank: the peak resident set size
(ru_maxrss) over the run, the resident size before the first step (the process with its model,
optimizer and libraries), and the median of its own step times (forward and backward up to the
gradient reduction) over the steps after the first. The losses of every cp are compared with cp = 1.
Results: bench/results/context-cpu.json (and a table on stdout).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "kernels"), str(HERE)]

MODELS = {"hybrid": [2], "h3-only": []}  # attention layers of the 4


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def config(model_name: str, cp: int, steps: int):
    from h3pretrain.config import Config, ParallelConfig, TrainConfig, preset

    model = preset("tiny")
    model.vocab_size, model.attn_layer_idx = 4096, MODELS[model_name]
    model.embed_dropout = model.attn_dropout = 0.0
    train = TrainConfig(global_batch=1, micro_batch=1, lr=1e-3, warmup_steps=1, steps=steps, precision="fp32",
                        compile=False, recompute="none", seed=0)
    return Config(model=model, train=train, parallel=ParallelConfig(cp=cp))


def predicted_gb(model_name: str, seq_len: int, cp: int) -> float:
    """The plan's activation estimate for one rank (h3pretrain.parallel.plan), GB."""
    from h3pretrain.parallel.plan import stage_activation_bytes

    cfg = config(model_name, cp, 1)
    return stage_activation_bytes(cfg, cfg.model.layer_kinds(), seq_len, seq_len // cp, last=True) / 1e9


def worker(out: Path, model_name: str, seq_len: int, cp: int, steps: int) -> None:
    """One rank of one run (under torchrun)."""
    import torch
    import torch.distributed as dist

    from h3pretrain.train.engine import TrainingEngine
    from h3pretrain.train.loop import init_distributed

    rank, world, device = init_distributed()
    cfg = config(model_name, cp, steps)
    model = cfg.model
    engine = TrainingEngine(cfg, device, seq_len)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.vocab_size, (1, seq_len + 1), generator=gen) for _ in range(steps)]
    before = _rss()
    losses, times = [], []
    for batch in batches:
        losses.append(engine.train_step(batch).loss)
        times.append(engine.compute_seconds())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mine = {"rank": rank, "peak_rss_gb": peak / 1e9, "rss_before_first_step_gb": before / 1e9,
            "step_s": statistics.median(times[1:] or times)}
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        out.write_text(json.dumps({"losses": losses, "ranks": every}))


def run(model_name: str, seq_len: int, cp: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // cp)),
                   PYTHONUNBUFFERED="1")
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cp}",
                               __file__, "--worker", str(out), model_name, str(seq_len), str(cp), str(steps)],
                              env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"bench-context: {model_name} L={seq_len} cp={cp} failed:\n{done.stderr[-3000:]}")
        result = json.loads(out.read_text())
        result["wall_s"] = time.perf_counter() - t0
    return result


def replan(path: Path) -> int:
    result = json.loads(path.read_text())
    print(f"{'model':8s} {'L':>6s} {'cp':>2s} | peak growth per rank, GB | plan, GB | plan / measured")
    for row in result["rows"]:
        row["plan_activation_gb"] = predicted_gb(row["model"], row["seq_len"], row["cp"])
        low, high = min(row["growth_gb"]), max(row["growth_gb"])
        print(f"{row['model']:8s} {row['seq_len']:6d} {row['cp']:2d} | {low:.2f}-{high:.2f} | "
              f"{row['plan_activation_gb']:.2f} | {row['plan_activation_gb'] / high:.2f}-{row['plan_activation_gb'] / low:.2f}")
    result["replanned"] = time.strftime("%Y-%m-%d")
    path.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        out, model_name, seq_len, cp, steps = sys.argv[2:7]
        worker(Path(out), model_name, int(seq_len), int(cp), int(steps))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="8192,32768")
    ap.add_argument("--cps", default="1,2,4")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "context-cpu.json"))
    ap.add_argument("--replan", action="store_true",
                    help="measure nothing: recompute the plan's column of --out (after a change to the plan)")
    args = ap.parse_args()
    if args.replan:
        return replan(Path(args.out))
    rows = []
    print(f"{'model':8s} {'L':>6s} {'cp':>2s} | peak RSS per rank, GB | max/min | max / cp=1 | step s per rank | "
          "loss diff vs cp=1 | peak growth over the steps per rank, and the plan's activations", flush=True)
    for model_name in args.models.split(","):
        for seq_len in map(int, args.seq_lens.split(",")):
            base = None
            for cp in map(int, args.cps.split(",")):
                result = run(model_name, seq_len, cp, args.steps)
                peaks = [r["peak_rss_gb"] for r in result["ranks"]]
                base = base or {"peak": max(peaks), "losses": result["losses"]}
                diff = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], base["losses"]))
                growth = [r["peak_rss_gb"] - r["rss_before_first_step_gb"] for r in result["ranks"]]
                row = {"model": model_name, "seq_len": seq_len, "cp": cp, **result,
                       "max_over_min": max(peaks) / min(peaks), "max_over_cp1": max(peaks) / base["peak"],
                       "loss_rel_diff_vs_cp1": diff, "growth_gb": growth,
                       "plan_activation_gb": predicted_gb(model_name, seq_len, cp)}
                rows.append(row)
                step_times = [r["step_s"] for r in result["ranks"]]
                print(f"{model_name:8s} {seq_len:6d} {cp:2d} | {', '.join(f'{p:.2f}' for p in peaks):22s} | "
                      f"{row['max_over_min']:.2f} | {row['max_over_cp1']:.2f} | "
                      f"{', '.join(f'{t:.2f}' for t in step_times)} | {diff:.1e} | growth "
                      f"{min(growth):.2f}-{max(growth):.2f} GB, plan {row['plan_activation_gb']:.2f} GB", flush=True)
    from common import write_result

    write_result({"device": "cpu", "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "dtype": "float32",
                  "model": "tiny preset, vocab 4096, 4 layers (hybrid: attention at layer 2)", "steps": args.steps,
                  "command": " ".join(["python", *sys.argv]), "rows": rows}, args.out, "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
