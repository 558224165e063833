"""FlashConv benchmark: the H3 mixer's long convolutions, fused Triton kernels vs the
torch.fft reference vs SDPA attention, and whole-model training throughput.

1. Kernels, fwd+bwd of the convolution section (q, k, v -> out) at L = 1K .. 64K with B*L = 16K
   tokens, D = 768, head_dim 1 and 8, bf16 inputs, beside causal SDPA attention (12 heads of 64) on
   the same tokens, and the memory-bandwidth bound (read q, k, v + write out; backward: read q, k,
   v, dout + write dq, dk, dv: 11 B*L*D bf16 values) at the GPU's peak bandwidth.
2. Models, training step (fwd+bwd+AdamW, bf16 autocast) tokens/s and peak memory at L = 2K, 8K,
   32K (B*L = 16K tokens): hybrid H3 125M (flashconv triton, and the reference), GPT-2 125M (all
   attention, SDPA, torch.compile'd), and the ceiling: the same hybrid with both long convolutions
   skipped (mixer = out_proj(q*k*v)).
3. Long sequences (state passing): one 1M-token sequence through the 125m preset's H3 mixer
   (projections, both SSMs, gating, output projection), fwd+bwd, bf16 autocast: time and peak memory.

    python bench/bench_kernels.py                      # GPU: the sizes above
    python bench/bench_kernels.py --tiny               # CPU smoke: toy sizes (the default without CUDA)

Results: bench/results/kernels-<device>.json with the GPU name and the command.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import flashconv
from h3pretrain.config import preset
from h3pretrain.model import HybridLM
from h3pretrain.model.h3 import H3
from h3pretrain.model.ssm import DiagSSMKernel

from common import device_name, sync, write_result  # bench/common.py

PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s (SXM parts)



def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up (compiles Triton kernels)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def conv_case(L: int, tokens: int, D: int, head_dim: int, device, dtype, repeats: int, bandwidth: float | None) -> dict:
    B = max(1, tokens // L)
    H = D // head_dim
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    taps = torch.randn(D, 64, device=device) / 8
    skip = torch.randn(D, device=device)
    diag = DiagSSMKernel(H, 64).to(device)
    D_skip = torch.randn(H, device=device)
    row = {"L": L, "batch": B, "head_dim": head_dim}
    for impl in ("triton", "reference"):
        flashconv.set_implementation(impl)
        row[f"{impl}_runs"] = flashconv.implementation(q.device)

        def step():
            out = flashconv.h3_conv(q, k, v, taps, skip, diag.discretize(), D_skip, head_dim)
            out.backward(torch.ones_like(out))

        try:
            row[f"{impl}_ms"] = 1e3 * timed(step, device, repeats)
        except torch.OutOfMemoryError:
            row[f"{impl}_ms"] = None
        finally:
            flashconv.set_implementation("reference")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    heads = D // 64
    qa, ka, va = (torch.randn(B, heads, L, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def attention():
        out = F.scaled_dot_product_attention(qa, ka, va, is_causal=True)
        out.backward(torch.ones_like(out))

    row["sdpa_ms"] = 1e3 * timed(attention, device, repeats)
    if bandwidth:
        row["bandwidth_bound_ms"] = 1e3 * 11 * B * L * D * torch.finfo(dtype).bits / 8 / bandwidth
        if row["triton_ms"]:
            row["triton_over_bound"] = row["triton_ms"] / row["bandwidth_bound_ms"]
    return row


def build(size: str, mixer: str, device, skip_convs: bool = False) -> HybridLM:
    cfg = preset(size)
    cfg.mixer, cfg.embed_dropout, cfg.attn_dropout = mixer, 0.0, 0.0
    with torch.device(device):
        model = HybridLM(cfg)
    if skip_convs:  # the ceiling: H3's q * k * v without either long convolution
        for block in model.backbone.layers.values():
            if hasattr(block.mixer, "shift_kernel"):
                block.mixer.forward = _no_conv(block.mixer)
    return model


def _no_conv(mixer):
    def forward(x, cache=None):
        return mixer.output_linear(mixer.q_proj(x) * mixer.k_proj(x) * mixer.v_proj(x))
    return forward


def model_case(label: str, model: HybridLM, L: int, tokens: int, device, repeats: int, compile_it: bool) -> dict:
    B = max(1, tokens // L)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = torch.compile(model) if compile_it else model
    ids = torch.randint(0, model.config.vocab_size, (B, L + 1), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with amp:
            logits = fwd(ids[:, :-1])
        loss = model.loss(logits, ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        seconds = timed(step, device, repeats)
    except torch.OutOfMemoryError:
        return {"model": label, "L": L, "batch": B, "tokens_per_s": None, "peak_memory_gb": "OOM"}
    return {"model": label, "L": L, "batch": B, "compiled": compile_it, "tokens_per_s": B * L / seconds,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None}


def long_case(L: int, D: int, device, repeats: int) -> list[dict]:
    """One sequence of L tokens through one H3 mixer (head_dim 1, as the 125m preset), fwd+bwd."""
    torch.manual_seed(0)
    with torch.device(device):
        mixer = H3(D, d_state=64, head_dim=1)
    x = torch.randn(1, L, D, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                    requires_grad=True)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    rows = []
    for impl in ("triton", "reference"):
        flashconv.set_implementation(impl)
        row = {"L": L, "d_model": D, "impl": impl, "runs": flashconv.implementation(device)}

        def step():
            with amp:
                out = mixer(x)
            out.backward(torch.ones_like(out))

        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            row["ms"] = 1e3 * timed(step, device, repeats)
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
        except torch.OutOfMemoryError:
            row["ms"], row["peak_memory_gb"] = None, "OOM"
        finally:
            flashconv.set_implementation("reference")
            x.grad = None
            mixer.zero_grad(set_to_none=True)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes (CPU smoke); the default without CUDA")
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    ap.add_argument("--model-lengths", type=int, nargs="+", default=None)
    ap.add_argument("--tokens", type=int, default=None, help="B*L per point (default 16384)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long-lengths", type=int, nargs="*", default=None,
                    help="sequence lengths for the one-sequence H3 mixer run (default 2^18 2^20; none: skip)")
    ap.add_argument("--skip-models", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type != "cuda"
    lengths = args.lengths or ([64, 256] if tiny else [1024, 2048, 4096, 8192, 16384, 32768, 65536])
    model_lengths = args.model_lengths or ([128] if tiny else [2048, 8192, 32768])
    tokens = args.tokens or (256 if tiny else 16384)
    D, size = (64, "tiny") if tiny else (768, "125m")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = device_name(device)
    bandwidth = next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)
    result = {"device": name, "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
              "date": time.strftime("%Y-%m-%d"), "peak_bandwidth_bytes_per_s": bandwidth, "tokens_per_point": tokens,
              "d_model": D, "kernels": [], "models": []}
    print(f"{name} | tokens per point {tokens} | D {D} | peak bandwidth {bandwidth}", flush=True)
    for head_dim in (1, 8):
        for L in lengths:
            row = conv_case(L, tokens, D, head_dim, device, dtype, args.repeats, bandwidth)
            result["kernels"].append(row)
            fmt = lambda x: f"{x:8.2f}" if x else "     n/a"  # noqa: E731
            print(f"hd {head_dim} L {L:6d} B {row['batch']:3d} | triton ({row['triton_runs']}) {fmt(row['triton_ms'])} ms"
                  f" | torch.fft {fmt(row['reference_ms'])} ms | SDPA {fmt(row['sdpa_ms'])} ms | bound "
                  f"{fmt(row.get('bandwidth_bound_ms'))} ms", flush=True)
    if not args.skip_models:
        for L in model_lengths:
            runs = []
            for label, mixer, impl, skip, compile_it in (
                    ("hybrid-h3-triton", "h3", "triton", False, False),
                    ("hybrid-h3-reference", "h3", "reference", False, False),
                    ("gpt2-sdpa-compiled", "attention", "reference", False, device.type == "cuda"),
                    ("ceiling-no-convs", "h3", "reference", True, False)):
                flashconv.set_implementation(impl)
                try:
                    runs_on = flashconv.implementation(device)
                    r = model_case(label, build(size, mixer, device, skip), L, tokens, device, args.repeats, compile_it)
                finally:
                    flashconv.set_implementation("reference")
                r["flashconv"] = runs_on
                runs.append(r)
                print(f"L {L:6d} {label:22s} {r['tokens_per_s'] or 0:12.0f} tokens/s  peak {r['peak_memory_gb']}",
                      flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            ceiling = runs[-1]["tokens_per_s"]
            for r in runs:
                if ceiling and r["tokens_per_s"]:
                    r["fraction_of_ceiling"] = r["tokens_per_s"] / ceiling
            result["models"] += runs
    long_lengths = args.long_lengths if args.long_lengths is not None else ([4096] if tiny else [1 << 18, 1 << 20])
    result["long"] = []
    for L in long_lengths:
        for r in long_case(L, D, device, max(1, args.repeats - 2)):
            result["long"].append(r)
            print(f"H3 mixer, one sequence of {L} tokens, {r['impl']} ({r['runs']}): fwd+bwd "
                  f"{r['ms'] or 0:.1f} ms, peak {r['peak_memory_gb']}", flush=True)
    write_result(result, args.out, f"bench/results/kernels-{'gpu' if device.type == 'cuda' else 'cpu-smoke'}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
