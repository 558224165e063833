"""`make gpu-check`: what a session with one GPU runs first, in at most 9 minutes of wall time.

    make gpu-bundle                              # here, once: the wheels the lent machine lacks (.whl/)
    python bench/gpu_check.py                    # GPU: the sizes below; CPU: toy sizes, a smoke check

Five sections, each in its own process with its own time budget (what a section leaves unused goes
to the next); a section that runs out is stopped and the cases it did not reach are recorded as
skipped, with the reason:
a. correctness: the Triton FlashConv kernels vs the fp32 reference, forward and backward (the
   self-check the trainer runs), L = 1K, 8K, 64K, head_dim 1 and 8, bf16 and fp32; the generation
   step kernels vs their references; CUDA-graph vs eager decoding; convolution vs recurrent mode.
b. kernels: fwd+bwd time of the convolution section (Triton, torch.fft reference) beside causal SDPA
   on the same tokens, L = 1K .. 64K at 16K tokens, against the memory-bandwidth bound from the copy
   bandwidth measured in the same run.
c. models, regionally compiled, 16K tokens per step, bf16 autocast, fused AdamW: hybrid H3 125M
   (Triton FlashConv; the reference in the CPU smoke), the free-conv ceiling (the same hybrid with both long convolutions skipped),
   GPT-2 125M (the same code with mixer=attention), at L = 2K and 8K: tokens/s, ratios, peak
   memory; the 1.3B hybrid at L = 2K: tokens/s and MFU (6 N FLOPs per token over the dense bf16 peak).
d. generation: 1.3B hybrid (Triton steps) vs transformer, batch 64, prompts 512 and 2048, 128 new
   tokens, CUDA-graph decoding.
e. train: the `h3pretrain train` command itself (bench/gpu_check_train.py): prep, the 125m preset
   at L=2048 compiled and eager, a background checkpoint, SIGKILL and resume, export-hf.
Writes bench/results/gpu-check-<gpu>-<date>.json and .md beside it (CPU: gpu-check-cpu-smoke.*).
Sections a-d import only torch, Triton and this repository. The train section needs DeepSpeed,
megatron-core, webdataset and zstandard: where they are missing (the lent machine), the wheels of
`make gpu-bundle` in .whl/ are installed into a temporary folder put on the sections' PYTHONPATH.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "kernels"), str(HERE)]

TOTAL_BUDGET_S = {"gpu": 530, "cpu": 330}
SECTION_BUDGET_S = {"gpu": {"correctness": 70, "kernels": 60, "models": 150, "generation": 60, "train": 180},
                    "cpu": {"correctness": 50, "kernels": 30, "models": 60, "generation": 25, "train": 150}}
SECTIONS = ("correctness", "kernels", "models", "generation", "train")
TRAIN_NEEDS = ("deepspeed", "megatron.core", "webdataset", "zstandard")  # beyond what sections a-d import


# ---- sections (run in a child process; each yields the names it plans, then one row per case) ----

def _sizes(smoke: bool) -> dict:
    if smoke:
        return dict(lengths=[64, 130], tokens=128, d_model=32, model_lengths=[128], small="tiny", large="1.3b",
                    model_tokens=256, batch=2, prompts=[16, 32], new=4, repeats=1)
    return dict(lengths=[1024, 2048, 4096, 8192, 16384, 32768, 65536], tokens=16384, d_model=768,
                model_lengths=[2048, 8192], small="125m", large="1.3b", model_tokens=16384, batch=64,
                prompts=[512, 2048], new=128, repeats=3)


def correctness(device, smoke: bool):
    import torch

    import flashconv

    s = _sizes(smoke)
    lengths = s["lengths"] if smoke else [1024, 8192, 65536]
    cases = [(L, hd, dt) for L in lengths for hd in (1, 8) for dt in ("bfloat16", "float32")]
    names = [f"flashconv L={L} head_dim={hd} {dt}" for L, hd, dt in cases]
    names += ["step kernels", "conv vs recurrent", "cuda-graph vs eager decoding"]
    yield names
    for name, (L, hd, dt) in zip(names, cases):
        r = flashconv.self_check(device, batch=max(1, s["tokens"] // L), length=L, channels=s["d_model"], head_dim=hd,
                                 d_state=64, dtype=getattr(torch, dt))
        yield {"case": name, "passed": r.passed, "max_error": max(r.errors.values(), default=None),
               "tolerance": r.tolerance, "failure": r.failure}
        _free(device)
    yield {"case": "step kernels", **_step_kernels(device, smoke)}
    yield {"case": "conv vs recurrent", **_modes(device)}
    if device.type != "cuda":
        yield {"case": "cuda-graph vs eager decoding", "skipped": "CUDA graphs need a GPU"}
    else:
        errors = _graph_decoding(device)
        yield {"case": "cuda-graph vs eager decoding", "passed": max(errors.values()) < 1e-3,
               "max_error": max(errors.values()), "tolerance": 1e-3, "errors": errors}


def _free(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()


def _step_kernels(device, smoke: bool) -> dict:
    """One decode step of each SSM, Triton kernel vs torch reference, at a 1.3B layer's state size."""
    import torch

    from flashconv import reference, step

    B, C, N, H, n = (2, 40, 16, 5, 8) if smoke else (64, 2048, 64, 2048, 32)
    gen = torch.Generator().manual_seed(0)
    ring = torch.randn(B, C, N, generator=gen).to(device)
    taps, skip, k = (torch.randn(*shape, generator=gen).to(device) for shape in ((C, N), (C,), (B, C)))
    pos = torch.tensor(37, device=device)
    ring_ref = ring.clone()
    shift_err = (step.shift_step(ring, taps, skip, k, pos) - reference.shift_step(ring_ref, taps, skip, k, pos)).abs().max()
    discrete = tuple((torch.randn(H, n, dtype=torch.cfloat, generator=gen) * 0.5).to(device) for _ in range(3))
    state = torch.randn(B, H, n, dtype=torch.cfloat, generator=gen).to(device)
    u, skip_h = torch.randn(B, H, generator=gen).to(device), torch.randn(H, generator=gen).to(device)
    state_ref = state.clone()
    y_ref = reference.ssm_step(state_ref, discrete, u, skip_h)
    ssm_err = ((step.ssm_step(state, discrete, u, skip_h) - y_ref).abs().max() / y_ref.abs().max()).item()
    state_err = ((state - state_ref).abs().max() / state_ref.abs().max()).item()
    worst = max(shift_err.item(), ssm_err, state_err)
    return {"passed": worst < 1e-4, "max_error": worst, "tolerance": 1e-4}


def _tiny_model(head_dim: int, device):
    from h3pretrain.config import preset
    from h3pretrain.model import HybridLM

    cfg = preset("tiny")
    cfg.ssm_head_dim, cfg.embed_dropout, cfg.attn_dropout = head_dim, 0.0, 0.0
    return HybridLM(cfg).to(device).eval()


def _modes(device) -> dict:
    """Convolution mode == recurrent mode (fp32 logits), head_dim 1 and 8."""
    import torch

    worst = 0.0
    for hd in (1, 8):
        model = _tiny_model(hd, device)
        ids = torch.randint(0, model.config.vocab_size, (2, 120), device=device)
        with torch.no_grad():
            full = model(ids)
            cache = model.allocate_cache(2, 120)
            parts = [model(ids[:, :50], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(50, 120)]
        worst = max(worst, ((torch.cat(parts, 1) - full).abs().max() / full.abs().max()).item())
    return {"passed": worst < 1e-4, "max_error": worst, "tolerance": 1e-4}


def _graph_decoding(device) -> dict:
    """Max relative logit difference between CUDA-graph and eager decoding, teacher-forced."""
    import torch

    import flashconv
    from h3pretrain.generate import CUDAGraphDecoder, Decoder

    out = {}
    for hd in (1, 8):
        model = _tiny_model(hd, device)
        ids = torch.randint(0, model.config.vocab_size, (3, 140), device=device)
        for impl in ("reference", "triton"):
            flashconv.set_implementation(impl)
            for prompt in (1, 2, 17, 100):
                logits = []
                for decoder in (Decoder(model, 3, 140), CUDAGraphDecoder(model, 3, 140)):
                    steps = [decoder.prefill(ids[:, :prompt]).clone()]
                    steps += [decoder.step(ids[:, t]).clone() for t in range(prompt, 140)]
                    logits.append(torch.stack(steps, 1))
                out[f"hd{hd}/{impl}/prompt{prompt}"] = ((logits[1] - logits[0]).abs().max() / logits[0].abs().max()).item()
        flashconv.set_implementation("auto")
    return out


def copy_bandwidth(device, smoke: bool) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the fastest of 5."""
    import torch

    from bench_kernels import timed

    x = torch.empty((1 << 22) if smoke else (1 << 28), device=device)  # 16 MB / 1 GB
    y = torch.empty_like(x)
    seconds = timed(lambda: y.copy_(x), device, 5)
    return 2 * x.numel() * x.element_size() / seconds


def kernels(device, smoke: bool):
    import torch

    from bench_kernels import conv_case

    s = _sizes(smoke)
    cases = [(hd, L) for hd in (1, 8) for L in s["lengths"]]
    yield ["copy bandwidth"] + [f"conv L={L} head_dim={hd}" for hd, L in cases]
    bandwidth = copy_bandwidth(device, smoke)
    yield {"case": "copy bandwidth", "bytes_per_s": bandwidth}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for hd, L in cases:
        row = conv_case(L, s["tokens"], s["d_model"], hd, device, dtype, s["repeats"], bandwidth)
        yield {"case": f"conv L={L} head_dim={hd}", **row}
        _free(device)


def _train_model(size: str, mixer: str, device, skip_convs: bool, recompute: str = "none"):
    from bench_kernels import build

    from h3pretrain.model.regional import apply_compile, apply_recompute

    model = build(size, mixer, device, skip_convs)
    blocks = list(model.backbone.layers.values())
    apply_recompute(blocks, recompute)
    apply_compile(blocks)
    return model


def _time_training(model, L: int, tokens: int, device, repeats: int) -> dict:
    import torch

    B = max(1, tokens // L)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, model.config.vocab_size, (B, L + 1), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with amp:
            logits = model(ids[:, :-1])
        model.loss(logits, ids[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from bench_kernels import timed
    from common import sync

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()  # compiles
    sync(device)
    compile_s = time.perf_counter() - t0
    seconds = timed(step, device, repeats)
    return {"L": L, "batch": B, "tokens_per_s": B * L / seconds, "step_s": seconds, "first_step_s": compile_s,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None}


def models(device, smoke: bool):
    import torch

    import flashconv
    from h3pretrain.train.metrics import peak_tflops

    s = _sizes(smoke)
    kinds = (("free-conv-ceiling", "h3", True), ("hybrid-h3", "h3", False), ("gpt2", "attention", False))
    plan = [(f"{label} {s['small']} L={L}", s["small"], mixer, skip, L) for L in s["model_lengths"]
            for label, mixer, skip in kinds]
    plan.append((f"hybrid-h3 {s['large']} L={s['model_lengths'][0]}", s["large"], "h3", False, s["model_lengths"][0]))
    yield [p[0] for p in plan]
    # the interpreter would only make the smoke slow: the correctness section runs the kernels there
    flashconv.set_implementation("triton" if device.type == "cuda" else "reference")
    results = {}
    for name, size, mixer, skip, L in plan:
        if smoke and size == "1.3b":
            yield {"case": name, "skipped": "the 1.3B model runs on the GPU only"}
            continue
        row = {"case": name, "flashconv": flashconv.implementation(device) if mixer == "h3" and not skip else None}
        for recompute in ("none", "selective"):
            try:
                model = _train_model(size, mixer, device, skip, recompute)
                row.update(recompute=recompute, parameters=model.num_parameters(),
                           **_time_training(model, L, s["model_tokens"], device, s["repeats"]))
                break
            except torch.OutOfMemoryError:
                row["oom_without_recompute"] = True
            finally:
                model = None
                _free(device)
        results[name] = row
        ceiling = results.get(f"free-conv-ceiling {size} L={L}")
        if ceiling and row.get("tokens_per_s") and name.startswith("hybrid"):
            row["fraction_of_ceiling"] = row["tokens_per_s"] / ceiling["tokens_per_s"]
        if name.startswith("gpt2"):
            for other in (f"hybrid-h3 {size} L={L}", f"free-conv-ceiling {size} L={L}"):
                if results.get(other, {}).get("tokens_per_s") and row.get("tokens_per_s"):
                    row[f"{other.split()[0]}_over_gpt2"] = results[other]["tokens_per_s"] / row["tokens_per_s"]
        peak = peak_tflops(0.0) * 1e12
        if peak and row.get("tokens_per_s"):
            row["mfu"] = row["tokens_per_s"] * 6 * row["parameters"] / peak
        yield row


def generation(device, smoke: bool):
    import torch

    import flashconv
    from bench_generate import build, measure
    from h3pretrain.generate import CUDAGraphDecoder, Decoder, generate

    s = _sizes(smoke)
    size = "tiny" if smoke else "1.3b"
    plan = [(label, mixer, prompt) for label, mixer in (("hybrid-h3", "h3"), ("transformer", "attention"))
            for prompt in s["prompts"]]
    yield [f"{label} {size} prompt={p}" for label, _, p in plan]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    graph = device.type == "cuda"
    flashconv.set_implementation("triton" if device.type == "cuda" else "reference")
    built, speed = {}, {}
    for label, mixer, prompt in plan:
        model = built.get(mixer) or build(size, mixer, device, dtype)
        built = {mixer: model}
        ids = torch.randint(0, model.config.vocab_size, (s["batch"], prompt), device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        decoder = (CUDAGraphDecoder if graph else Decoder)(model, s["batch"], prompt + s["new"])
        generate(model, ids, min(s["new"], 4), decoder=decoder)  # warm-up (and graph capture)
        row = {"case": f"{label} {size} prompt={prompt}", "mode": "cuda-graph" if graph else "eager",
               **measure(model, decoder, ids, s["new"], 1)}
        del decoder
        speed[label, prompt] = row["tokens_per_s"]
        if label == "transformer" and ("hybrid-h3", prompt) in speed:
            row["hybrid_speedup"] = speed["hybrid-h3", prompt] / row["tokens_per_s"]
        yield row
        _free(device)


def train(device, smoke: bool):
    from gpu_check_train import train as train_section

    yield from train_section(device, smoke)


def sleeper(seconds: float):
    """A stand-in for any section (--test-sleep): plans three cases, reaches one, then sleeps."""
    yield ["first", "second", "third"]
    yield {"case": "first", "passed": True}
    time.sleep(seconds)
    yield {"case": "second", "passed": True}


SECTION_FUNCTIONS = {"correctness": correctness, "kernels": kernels, "models": models, "generation": generation,
                     "train": train}


def run_section(name: str, rows_path: Path, smoke: bool, sleep: float | None = None) -> None:
    if sleep is not None:
        items = sleeper(sleep)
    else:
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(0)
        items = SECTION_FUNCTIONS[name](device, smoke)
    with open(rows_path, "a") as out:
        for i, item in enumerate(items):
            out.write(json.dumps({"plan": item} if i == 0 else item, default=str) + "\n")
            out.flush()
            if i:
                print(f"[{name}] " + json.dumps(item, default=str)[:400], flush=True)


# ---- the parent: budgets, results files --------------------------------------------------------

def _device_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["device"] = torch.cuda.get_device_name() if info["cuda"] else "cpu"
    return info


def _slug(device: str) -> str:
    name = device.lower()
    for key in ("h200", "h100", "a100", "l40s", "a10"):
        if key in name:
            return key
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def bundle_site(needs=TRAIN_NEEDS, wheels_dir: Path = HERE.parent / ".whl") -> tuple[str | None, str]:
    """(a folder for PYTHONPATH or None, what was found): the packages the train section needs,
    from the bundle where this Python lacks them."""
    import importlib.util

    missing = [m for m in needs if importlib.util.find_spec(m.split(".")[0]) is None]
    if not missing:
        return None, "installed"
    wheels = sorted(str(w) for w in wheels_dir.glob("*.whl"))
    if not wheels:
        return None, f"missing {', '.join(missing)} and no bundle in {wheels_dir} (`make gpu-bundle` builds it)"
    site = tempfile.mkdtemp(prefix="gpu-check-site-")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--target", site, *wheels], capture_output=True, text=True)
    if done.returncode != 0:
        return None, f"installing the bundle failed: {done.stderr.strip()[-300:]}"
    return site, f"from the bundle ({len(wheels)} wheels) for {', '.join(missing)}"


def _section(name: str, budget: float, smoke: bool, env: dict, sleep: float | None = None) -> dict:
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "rows.jsonl"
        proc = subprocess.Popen([sys.executable, __file__, "--section", name, "--rows", str(rows_path)]
                                + (["--smoke"] if smoke else []) + ([f"--test-sleep={sleep}"] if sleep is not None else []),
                                env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=budget)
            status = "done" if code == 0 else f"crashed (exit code {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"stopped: its time budget of {budget:.0f} s ran out"
        lines = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []
    planned = lines[0]["plan"] if lines and "plan" in lines[0] else []
    rows = [r for r in lines[1:]]
    reached = {r["case"] for r in rows}
    skipped = [{"case": c, "reason": status} for c in planned if c not in reached]
    if not planned:
        skipped = [{"case": name, "reason": status}]
    return {"status": status, "budget_s": round(budget), "wall_s": round(time.time() - t0, 1), "rows": rows,
            "skipped": skipped}


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return "" if v is None else str(v)


def markdown(result: dict) -> str:
    lines = [f"# gpu-check {result['device']} {result['date']}", "",
             f"torch {result['torch']}, Triton {result['triton']}; wall {result['wall_s']} s of a "
             f"{result['budget_s']} s budget; `{result['command']}`; train packages: {result.get('train_packages')}", ""]
    for name, sec in result["sections"].items():
        lines += [f"## {name}: {sec['status']} ({sec['wall_s']} s of {sec['budget_s']} s)", ""]
        rows = [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in sec["rows"]]
        if rows:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
        for s in sec["skipped"]:
            lines.append(f"- skipped {s['case']}: {s['reason']}")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--budget", type=float, default=None, help="seconds for everything (default 530 GPU, 330 CPU)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                    help="run only these (e.g. a rerun while tuning)")
    ap.add_argument("--section-budgets", nargs="+", default=[], metavar="NAME=SECONDS",
                    help="override a section's time budget")
    ap.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="toy sizes (the default without CUDA)")
    ap.add_argument("--test-sleep", type=float, default=None, help=argparse.SUPPRESS)  # the budget tests
    args = ap.parse_args()
    if args.section:
        run_section(args.section, Path(args.rows), args.smoke, args.test_sleep)
        return 0
    start = time.time()
    info = _device_info()
    smoke = args.smoke or not info["cuda"]
    kind = "cpu" if smoke else "gpu"
    total = args.budget or TOTAL_BUDGET_S[kind]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE.parent / "kernels"),
                                                       os.environ.get("PYTHONPATH", "")]))
    if not info["cuda"]:
        env["TRITON_INTERPRET"] = "1"  # the kernels run in Triton's interpreter at toy sizes
    print(f"gpu-check on {info['device']} ({'smoke, toy sizes' if smoke else 'full sizes'}), budget {total:.0f} s",
          flush=True)
    result = {**info, "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv]),
              "budget_s": total, "smoke": smoke, "sections": {}}
    budgets = dict(SECTION_BUDGET_S[kind])
    for item in args.section_budgets:
        name, _, seconds = item.partition("=")
        if name not in budgets or not seconds.replace(".", "", 1).isdigit():
            ap.error(f"--section-budgets {item!r}: expected NAME=SECONDS with NAME one of {', '.join(SECTIONS)}")
        budgets[name] = float(seconds)
    site, result["train_packages"] = (None, "not needed") if "train" not in args.sections or args.test_sleep is not None else bundle_site()
    if site:
        env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE.parent / "kernels"), site,
                                             os.environ.get("PYTHONPATH", "")])
    unused = 0.0  # what earlier sections left of their budgets
    for name in args.sections:
        left = total - (time.time() - start) - 3
        budget = min(budgets[name] + unused, left)
        if left < 10:
            result["sections"][name] = {"status": "skipped: no time left", "budget_s": 0, "wall_s": 0, "rows": [],
                                        "skipped": [{"case": name, "reason": "no time left in the total budget"}]}
            continue
        if name == "train" and not site and not result["train_packages"].startswith(("installed", "not needed")):
            result["sections"][name] = {"status": f"skipped: {result['train_packages']}", "budget_s": 0, "wall_s": 0,
                                        "rows": [], "skipped": [{"case": name, "reason": result["train_packages"]}]}
            continue
        print(f"== {name} (budget {budget:.0f} s)", flush=True)
        result["sections"][name] = _section(name, budget, smoke, env, args.test_sleep)
        unused = max(0.0, budget - result["sections"][name]["wall_s"])
    result["wall_s"] = round(time.time() - start, 1)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-check-cpu-smoke" if smoke else f"gpu-check-{_slug(info['device'])}-{result['date']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    failed = [r["case"] for s in result["sections"].values() for r in s["rows"] if r.get("passed") is False]
    print(f"-> {out / stem}.json and .md ({result['wall_s']} s)" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
