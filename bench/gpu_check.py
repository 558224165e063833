"""GPU checks and baseline timings for the model as it stands (torch.fft reference convolution).

    python bench/gpu_check.py --out bench/results/gpu-check.json

1. Correctness on CUDA: convolution mode == recurrent mode (fp32) for head_dim 1 and 8; bf16
   autocast logits close to fp32; CUDA-graph decoding == eager decoding (prompts of 1, 2, 17 and
   100 tokens; H3 steps in torch and as Triton kernels).
2. Training step throughput (fwd+bwd+AdamW, bf16 autocast) at B*L = 16K tokens: hybrid H3 125M vs
   the same shape with attention in every layer (GPT-2-125M-like, SDPA), plus peak memory.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

import flashconv
from h3pretrain.config import preset
from h3pretrain.generate import CUDAGraphDecoder, Decoder
from h3pretrain.model import HybridLM


def tiny_model(head_dim: int, device) -> HybridLM:
    cfg = preset("tiny")
    cfg.ssm_head_dim, cfg.embed_dropout, cfg.attn_dropout = head_dim, 0.0, 0.0
    return HybridLM(cfg).to(device).eval()


def check_modes(device) -> dict:
    out = {}
    for hd in (1, 8):
        model = tiny_model(hd, device)
        ids = torch.randint(0, model.config.vocab_size, (2, 300), device=device)
        with torch.no_grad():
            full = model(ids)
            cache = model.allocate_cache(2, 300)
            parts = [model(ids[:, :100], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(100, 300)]
            stepped = torch.cat(parts, 1)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                low = model(ids).float()
        scale = full.abs().max().item()
        out[f"hd{hd}"] = {"conv_vs_recurrent_max_rel": (stepped - full).abs().max().item() / scale,
                          "bf16_vs_fp32_max_rel": (low - full).abs().max().item() / scale}
    return out


def check_graph_decoding(device) -> dict:
    """Max relative logit difference between CUDA-graph and eager decoding, teacher-forced."""
    out = {}
    for hd in (1, 8):
        model = tiny_model(hd, device)
        ids = torch.randint(0, model.config.vocab_size, (3, 140), device=device)
        for impl in ("reference", "triton"):
            flashconv.set_implementation(impl)
            for prompt in (1, 2, 17, 100):
                logits = []
                for decoder in (Decoder(model, 3, 140), CUDAGraphDecoder(model, 3, 140)):
                    steps = [decoder.prefill(ids[:, :prompt]).clone()]
                    steps += [decoder.step(ids[:, t]).clone() for t in range(prompt, 140)]
                    logits.append(torch.stack(steps, 1))
                scale = logits[0].abs().max().item()
                out[f"hd{hd}/{impl}/prompt{prompt}"] = (logits[1] - logits[0]).abs().max().item() / scale
        flashconv.set_implementation("reference")
    return out


def time_training(cfg, seq_len: int, batch: int, device, steps: int = 10) -> dict:
    torch.manual_seed(0)
    model = HybridLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    return {"seq_len": seq_len, "batch": batch, "step_s": dt, "tokens_per_s": batch * seq_len / dt,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/gpu-check.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
              "command": " ".join(["python", *sys.argv]), "modes": check_modes(device), "training": []}
    print(json.dumps(result["modes"], indent=1), flush=True)
    result["graph_vs_eager_max_rel"] = check_graph_decoding(device)
    print(json.dumps(result["graph_vs_eager_max_rel"], indent=1), flush=True)
    for L in (2048, 8192):
        for name in ("hybrid-h3-125m", "attention-125m"):
            cfg = preset("125m")
            cfg.embed_dropout = cfg.attn_dropout = 0.0
            if name.startswith("attention"):
                cfg.mixer = "attention"
            r = {"model": name, **time_training(cfg, L, 16384 // L, device)}
            result["training"].append(r)
            print(json.dumps(r), flush=True)
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
