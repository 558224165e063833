"""Peak memory of one forward+backward under each activation-recompute mode (train.recompute), on
this machine's CPU: the 125m preset at L = 2048, batch 1, fp32, dropout as in training.

    python bench/bench_recompute.py [--preset 125m] [--seq-len 2048] [--batch 1]

Each mode runs in a fresh process; its peak is the growth of the process's maximum resident set
size (ru_maxrss) over the step, after the model and its gradients exist (a first step allocates
them; the measured second step starts from zero gradients kept in place). The plan's activation
estimate (`h3pretrain plan`, which assumes bf16 autocast: its bf16 terms would double here) is
printed beside it for scale.
Results: bench/results/recompute-memory-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "kernels"), str(HERE)]

MODES = ("none", "block", "selective")


def one_mode(preset_name: str, seq_len: int, batch: int, mode: str) -> dict:
    import torch

    from h3pretrain.config import preset
    from h3pretrain.model import HybridLM
    from h3pretrain.model.regional import apply_recompute

    torch.manual_seed(0)
    model = HybridLM(preset(preset_name))
    apply_recompute(model.backbone.layers.values(), mode)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1))

    def step() -> float:
        loss = model.loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        return loss.item()

    step()  # allocates the gradients (and warms the allocator's pools)
    for p in model.parameters():
        p.grad.zero_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    now = _rss()
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "loss": loss, "step_s": seconds, "rss_before_step_gb": now / 1e9,
            "peak_growth_gb": (peak - max(now, 0)) / 1e9, "maxrss_before_gb": before / 1e9}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results" / "recompute-memory-cpu.json"))
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args.preset, args.seq_len, args.batch, args.mode)))
        return 0
    from h3pretrain.config import preset
    from h3pretrain.parallel.plan import layer_activation_bytes

    rows = []
    for mode in MODES:
        done = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--seq-len", str(args.seq_len),
                               "--batch", str(args.batch), "--mode", mode], capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        m = preset(args.preset)
        kinds = m.layer_kinds()
        tokens = args.batch * args.seq_len
        estimate = sum(layer_activation_bytes(m, k, args.seq_len, 1, mode) for k in kinds) * tokens
        if mode != "none":
            estimate += max(layer_activation_bytes(m, k, args.seq_len, 1, "none") for k in kinds) * tokens
        row["plan_activation_estimate_gb"] = (estimate + 8 * tokens * m.padded_vocab_size) / 1e9
        rows.append(row)
        print(f"{mode:9s} peak growth {row['peak_growth_gb']:.2f} GB | step {row['step_s']:.1f} s | loss "
              f"{row['loss']:.6f} | plan (bf16 estimate) {row['plan_activation_estimate_gb']:.2f} GB", flush=True)
    result = {"preset": args.preset, "seq_len": args.seq_len, "batch": args.batch, "dtype": "float32",
              "device": "cpu", "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv]),
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
