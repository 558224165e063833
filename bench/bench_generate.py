"""Generation throughput: hybrid H3 (recurrent H3 steps + KV cache in its attention layers) vs the
same-size all-attention transformer with a KV cache (H3 paper, Table 9: 1.3B, batch 64, 128 new
tokens after prompts of 512-1536 tokens; hybrid 2.4x at 1536).

    python bench/bench_generate.py --preset 1.3b --prompts 512 1024 2048 --batch 64 --new-tokens 128

Random weights (throughput does not depend on them); bf16 weights with the SSM parameters in fp32;
greedy decoding, no early stop. Both models run the same generation code in two modes: eager, and
with each decode step replayed as one CUDA graph (the paper's benchmark decoded with CUDA graphs;
GPU only). Before timing, the graph's greedy tokens are checked against the eager ones.
tokens/s = batch * new tokens / (prefill + decode); decode tokens/s leaves the prompt out. The
decoder (cache, graph) is built before the clock starts and reused. On CPU it runs at toy size
(`--preset tiny --batch 2 --prompts 64 --new-tokens 8`) so that it can be smoke checked; the results
file records the device either way.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import flashconv
from h3pretrain.config import preset
from h3pretrain.generate import CUDAGraphDecoder, Decoder, generate
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


def measure(model: HybridLM, decoder: Decoder, ids: torch.Tensor, new: int, repeats: int) -> dict:
    """The fastest of `repeats` generations: seconds to the first new token (the prompt) and in all."""
    device = ids.device
    best: tuple[float, float] | None = None
    for _ in range(repeats):
        marks = []

        def first_token(_token: torch.Tensor) -> None:
            if not marks:
                sync(device)
                marks.append(time.perf_counter())

        sync(device)
        t0 = time.perf_counter()
        out = generate(model, ids, new, decoder=decoder, on_token=first_token)
        sync(device)
        t1 = time.perf_counter()
        assert out.shape == (ids.shape[0], ids.shape[1] + new)
        if best is None or t1 - t0 < best[1]:
            best = (marks[0] - t0, t1 - t0)
    prefill, total = best
    batch = ids.shape[0]
    return {"prompt": ids.shape[1], "batch": batch, "new_tokens": new, "seconds": total, "prefill_seconds": prefill,
            "tokens_per_s": batch * new / total,
            "decode_tokens_per_s": batch * (new - 1) / max(total - prefill, 1e-9),
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None}


def agreement(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    """Greedy ids of two ways to generate: the same unless two logits tie within bf16 rounding (and
    one early difference changes everything after it), so the fraction is printed and recorded."""
    agree = (a == b).float().mean().item()
    print(f"  {what}: {agree:.4f} of the greedy tokens agree", flush=True)
    return agree


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--prompts", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per point (the fastest is kept)")
    ap.add_argument("--flashconv", nargs="+", choices=["reference", "triton"], default=None,
                    help="the hybrid's H3 implementations to time (default: both where Triton runs on the GPU)")
    ap.add_argument("--out", default="", help="JSON results file (default: bench/results/generate-<device>.json)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    impls = args.flashconv or (["reference", "triton"] if flashconv.implementation_available(device) else ["reference"])
    name = device_name(device)
    result = {"device": name, "torch": torch.__version__, "preset": args.preset, "dtype": str(dtype),
              "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"), "runs": [],
              "agreement": {}}
    print(f"{name} | {args.preset} | {dtype} | batch {args.batch} | {args.new_tokens} new tokens", flush=True)
    modes = ["eager", "cuda-graph"] if device.type == "cuda" else ["eager"]
    new = args.new_tokens
    check = torch.randint(0, 1000, (args.batch, args.prompts[0]), device=device)  # agreement checks
    for mixer, label in (("h3", "hybrid-h3"), ("attention", "transformer")):
        model = build(args.preset, mixer, device, dtype)
        short = min(new, 32)
        reference_ids = generate(model, check, short)
        for impl in impls if mixer == "h3" else ["reference"]:
            flashconv.set_implementation(impl)
            eager_ids = reference_ids if impl == "reference" else generate(model, check, short)
            if impl != "reference":
                result["agreement"][f"{label}, flashconv {impl} vs reference"] = agreement(
                    eager_ids, reference_ids, f"flashconv {impl} vs reference")
            if "cuda-graph" in modes:
                result["agreement"][f"{label}, flashconv {impl}, cuda-graph vs eager"] = agreement(
                    generate(model, check, short, cuda_graph=True), eager_ids, f"flashconv {impl}, CUDA graph vs eager")
            for prompt in args.prompts:
                ids = torch.randint(0, model.config.vocab_size, (args.batch, prompt), device=device)
                for mode in modes:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    decoder = (CUDAGraphDecoder if mode == "cuda-graph" else Decoder)(model, args.batch, prompt + new)
                    generate(model, ids, min(new, 4), decoder=decoder)  # warm-up
                    run = mode if label == "transformer" else f"{mode}, flashconv {impl}"
                    r = {"model": label, "mode": mode, "flashconv": impl if label != "transformer" else None,
                         "run": run, "parameters": model.num_parameters(),
                         **measure(model, decoder, ids, new, args.repeats)}
                    del decoder
                    result["runs"].append(r)
                    print(f"{label:12s} {run:28s} prompt {prompt:5d}: {r['tokens_per_s']:10.1f} tokens/s "
                          f"(prefill {r['prefill_seconds']:.3f} s, total {r['seconds']:.3f} s, decode "
                          f"{r['decode_tokens_per_s']:.1f} tokens/s)", flush=True)
        flashconv.set_implementation("reference")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    transformer = {(r["mode"], r["prompt"]): r for r in result["runs"] if r["model"] == "transformer"}
    result["speedup"], result["decode_speedup"] = {}, {}
    for r in result["runs"]:
        if r["model"] == "hybrid-h3":
            base = transformer[r["mode"], r["prompt"]]
            result["speedup"].setdefault(r["run"], {})[str(r["prompt"])] = r["tokens_per_s"] / base["tokens_per_s"]
            result["decode_speedup"].setdefault(r["run"], {})[str(r["prompt"])] = (
                r["decode_tokens_per_s"] / base["decode_tokens_per_s"])
    for run, by_prompt in result["speedup"].items():
        print(f"hybrid / transformer, {run}: " + ", ".join(
            f"{p}: {s:.2f}x (decode {result['decode_speedup'][run][p]:.2f}x)" for p, s in by_prompt.items()), flush=True)
    write_result(result, args.out, f"bench/results/generate-{'gpu' if device.type == 'cuda' else 'cpu'}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
