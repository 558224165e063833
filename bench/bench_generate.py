"""Generation throughput: hybrid H3 (recurrent H3 steps + KV cache in its attention layers) vs the
same-size all-attention transformer with a KV cache (H3 paper, Table 9: 1.3B, batch 64, 128 new
tokens after prompts of 512-1536 tokens; hybrid 2.4x at 1536).

    python bench/bench_generate.py --preset 1.3b --prompts 512 1024 2048 --batch 64 --new-tokens 128

Random weights (throughput does not depend on them); bf16 weights with the SSM parameters in fp32;
greedy decoding, no early stop. tokens/s = batch * new tokens / (prefill + decode time). On CPU it
runs at toy size (`--preset tiny --batch 2 --prompts 64 --new-tokens 8`) so that it can be smoke
checked; the results file records the device either way.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from h3pretrain.config import preset
from h3pretrain.generate import generate
from h3pretrain.model import HybridLM
from h3pretrain.model.ssm import DiagSSMKernel, ShiftSSMKernel

from common import device_name, sync, write_result  # bench/common.py


def build(preset_name: str, mixer: str, device: torch.device, dtype: torch.dtype) -> HybridLM:
    cfg = preset(preset_name)
    cfg.mixer, cfg.embed_dropout, cfg.attn_dropout = mixer, 0.0, 0.0
    with torch.device(device):
        model = HybridLM(cfg)
    model.to(dtype)
    for name, p in model.named_parameters():  # SSM parameters stay fp32, as in training
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(owner, (ShiftSSMKernel, DiagSSMKernel)) or name.endswith((".D", "ssm_k_D")):
            p.data = p.data.float()
    return model.eval()



@torch.inference_mode()
def measure(model: HybridLM, batch: int, prompt: int, new: int, device: torch.device, repeats: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    prefill, total = [], []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        model(ids, cache=model.allocate_cache(batch, prompt + new))
        sync(device)
        t1 = time.perf_counter()
        out = generate(model, ids, new)
        sync(device)
        t2 = time.perf_counter()
        assert out.shape == (batch, prompt + new)
        prefill.append(t1 - t0)
        total.append(t2 - t1)
    t_total, t_prefill = min(total), min(prefill)
    return {"prompt": prompt, "batch": batch, "new_tokens": new, "seconds": t_total, "prefill_seconds": t_prefill,
            "tokens_per_s": batch * new / t_total,
            "decode_tokens_per_s": batch * (new - 1) / max(t_total - t_prefill, 1e-9),
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--prompts", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per point (the fastest is kept)")
    ap.add_argument("--out", default="", help="JSON results file (default: bench/results/generate-<device>.json)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = device_name(device)
    result = {"device": name, "torch": torch.__version__, "preset": args.preset, "dtype": str(dtype),
              "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"), "runs": []}
    print(f"{name} | {args.preset} | {dtype} | batch {args.batch} | {args.new_tokens} new tokens", flush=True)
    for mixer, label in (("h3", "hybrid-h3"), ("attention", "transformer")):
        model = build(args.preset, mixer, device, dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        measure(model, args.batch, min(args.prompts), 4, device, 1)  # warm-up
        for prompt in args.prompts:
            r = {"model": label, "parameters": model.num_parameters(),
                 **measure(model, args.batch, prompt, args.new_tokens, device, args.repeats)}
            result["runs"].append(r)
            print(f"{label:12s} prompt {prompt:5d}: {r['tokens_per_s']:10.1f} tokens/s "
                  f"(prefill {r['prefill_seconds']:.3f} s, total {r['seconds']:.3f} s)", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    by = {(r["model"], r["prompt"]): r["tokens_per_s"] for r in result["runs"]}
    result["speedup"] = {str(p): by["hybrid-h3", p] / by["transformer", p] for p in args.prompts}
    print("hybrid / transformer: " + ", ".join(f"{p}: {s:.2f}x" for p, s in result["speedup"].items()), flush=True)
    write_result(result, args.out, f"bench/results/generate-{'gpu' if device.type == 'cuda' else 'cpu'}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
