"""The `train` section of `make gpu-check`: the real `h3pretrain train` command on one device, with
the settings a user gets (bf16, train.compile=auto, H3_FLASHCONV=auto, selective recompute, ZeRO-1,
sharded checkpoints written in the background), then a SIGKILL and a resume, then export-hf.

Cases, in order:
- prep: a small corpus made on the machine (data_prep.corpus), a tokenizer trained on it, shards.
- train compiled: the 125m preset at L=2048 (toy sizes in the smoke) for `steps` steps with a
  background checkpoint every `ckpt_every`: tokens/s and MFU of the compiled step (median after the
  warm-up), the checkpoint's blocked time beside the step time, whether mlflow was there.
- kill and resume: the compiled run again in a new run directory, SIGKILLed a few steps after its
  first checkpoint is complete, resumed by the same command; its losses against the
  uninterrupted run's (bitwise where the kernels are deterministic; else the measured difference).
- export-hf: the uninterrupted run's last checkpoint to a Hugging Face directory; one
  transformers forward (trust_remote_code) on the device against ours on the same tokens.
- train eager: the compiled run's settings with train.compile=false, a few steps: tokens/s and MFU.
"""
from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ["prep", "train compiled", "kill and resume", "export-hf", "train eager"]  # the least needed last


def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(config="launch/configs/tiny.yaml", seq_len=64, vocab=512, docs=60, sample_mb=1.0, steps=8,
                    ckpt_every=4, kill_after=6, eager_steps=4, global_batch=4, micro_batch=2, precision="fp32",
                    tolerance=0.0)
    return dict(config="launch/configs/125m.yaml", seq_len=2048, vocab=8192, docs=4000, sample_mb=8.0, steps=30,
                ckpt_every=10, kill_after=13, eager_steps=10, global_batch=8, micro_batch=8, precision="bf16",
                tolerance=1e-2)


def _records(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    """The last record per step of `kind` (a resumed run logs the steps after its checkpoint again)."""
    out: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line torn by the kill
            if rec.get("kind") == kind:
                out[rec["step"]] = rec
    return out


class Trainer:
    """`h3pretrain train` in a process of its own, with this section's settings."""

    def __init__(self, shards: Path, vocab: int, s: dict, env: dict):
        self.shards, self.vocab, self.s, self.env = shards, vocab, s, env

    def command(self, run_dir: Path, **train) -> list[str]:
        s = self.s
        sets = {"model.vocab_size": self.vocab, "data.path": self.shards, "data.tokenizer": "",
                "train.run_dir": run_dir, "train.steps": s["steps"], "train.global_batch": s["global_batch"],
                "train.micro_batch": s["micro_batch"], "train.precision": s["precision"], "train.warmup_steps": 4,
                "train.log_every": 1, "train.eval_every": 0, "train.ckpt_every": s["ckpt_every"], "train.keep_last": 2,
                "train.compile": "auto", "train.recompute": "selective", "train.zero_stage": 1,
                "train.checkpoint_format": "sharded", "train.async_checkpoint": "true", "train.mlflow_uri": ""}
        sets.update({f"train.{k}": v for k, v in train.items()})
        cmd = [sys.executable, "-m", "h3pretrain.cli", "train", "--config", str(ROOT / s["config"])]
        for key, value in sets.items():
            cmd += ["--set", f"{key}={value}"]
        return cmd

    def start(self, run_dir: Path, **train) -> subprocess.Popen:
        log = open(str(run_dir) + ".log", "ab")
        # in the section's process group: a section stopped at its budget takes its trainer with it
        return subprocess.Popen(self.command(run_dir, **train), cwd=ROOT, env=self.env, stdout=log, stderr=log)

    def run(self, run_dir: Path, **train) -> tuple[int, float]:
        t0 = time.time()
        proc = self.start(run_dir, **train)
        return proc.wait(), time.time() - t0


def _log_tail(run_dir: Path, n: int = 1500) -> str:
    path = Path(str(run_dir) + ".log")
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


def _speed(run_dir: Path, skip: int) -> dict:
    """Median tokens/s, MFU and step time of the steps after the first `skip` (compilation, warm-up)."""
    recs = [r for step, r in sorted(_records(run_dir).items()) if step > skip]
    if not recs:
        return {}
    tps = statistics.median(r["tokens_per_s"] for r in recs)
    out = {"tokens_per_s": tps, "mfu": statistics.median(r["mfu"] for r in recs) or None,
           "steps_timed": len(recs), "memory_gb": max(r["memory_gb"] for r in recs)}
    first = _records(run_dir).get(1)
    if first:
        out["first_step_tokens_per_s"] = first["tokens_per_s"]
    return out


def _status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def train_compiled(t: Trainer, run_dir: Path) -> dict:
    code, wall = t.run(run_dir)
    status, log = _status(run_dir), Path(str(run_dir) + ".log").read_text(errors="replace")
    row = {"case": "train compiled", "passed": code == 0 and status.get("state") == "finished", "exit_code": code,
           "wall_s": round(wall, 1), "compiled": status.get("compiled"), "flashconv": status.get("flashconv"),
           "compile_failure": status.get("compile_failure"), **_speed(run_dir, skip=2)}
    ckpt = _records(run_dir, "checkpoint").get(t.s["ckpt_every"])
    step = _records(run_dir).get(t.s["ckpt_every"] + 1)
    if ckpt:
        row["checkpoint_blocked_s"] = ckpt["blocked_s"]
        if row.get("tokens_per_s"):
            step_s = t.s["global_batch"] * t.s["seq_len"] / row["tokens_per_s"]
            row["step_s"] = step_s
            row["blocked_over_step"] = ckpt["blocked_s"] / step_s
    if step:
        row["step_after_checkpoint_tokens_per_s"] = step["tokens_per_s"]
    written = re.search(rf"saved checkpoint \S+step-{t.s['ckpt_every']:08d} \(periodic\) in ([0-9.]+) s", log)
    if written:
        row["checkpoint_written_s"] = float(written.group(1))
    row["mlflow"] = "absent: metrics.jsonl only" if "mlflow is not installed" in log else "on"
    if not row["passed"]:
        row["failure"] = _log_tail(run_dir)
    return row


def train_eager(t: Trainer, run_dir: Path, compiled: dict) -> dict:
    code, wall = t.run(run_dir, compile="false", steps=t.s["eager_steps"], ckpt_every=0)
    row = {"case": "train eager", "passed": code == 0, "exit_code": code, "wall_s": round(wall, 1),
           "compiled": _status(run_dir).get("compiled"), **_speed(run_dir, skip=2)}
    if row.get("tokens_per_s") and compiled.get("tokens_per_s"):
        row["compiled_speedup"] = compiled["tokens_per_s"] / row["tokens_per_s"]
    if not row["passed"]:
        row["failure"] = _log_tail(run_dir)
    return row


def kill_and_resume(t: Trainer, run_dir: Path, reference: Path) -> dict:
    s = t.s
    first_ckpt = run_dir / "checkpoints" / f"step-{s['ckpt_every']:08d}" / "manifest.json"
    t0 = time.time()
    proc = t.start(run_dir)
    while proc.poll() is None and not (first_ckpt.exists() and max(_records(run_dir), default=0) >= s["kill_after"]):
        time.sleep(0.05)
    killed_at = max(_records(run_dir), default=0)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)  # one process: its background checkpoint writer is a thread
    proc.wait()
    latest = (run_dir / "checkpoints" / "latest").read_text().strip() if (run_dir / "checkpoints" / "latest").exists() else None
    code = t.start(run_dir).wait()
    ours, ref = _records(run_dir), _records(reference)
    steps = sorted(set(ours) & set(ref))
    diffs = [abs(ours[k]["loss"] - ref[k]["loss"]) / max(abs(ref[k]["loss"]), 1e-30) for k in steps]
    bitwise = bool(steps) and all(ours[k]["loss"] == ref[k]["loss"] for k in steps)
    worst = max(diffs, default=None)
    complete = steps == list(range(1, s["steps"] + 1))
    row = {"case": "kill and resume", "killed": killed, "killed_after_step": killed_at, "resumed_from": latest, "exit_code": code,
           "steps_compared": len(steps), "bitwise": bitwise, "max_rel_loss_diff": worst,
           "tolerance": s["tolerance"], "wall_s": round(time.time() - t0, 1),
           "passed": killed and code == 0 and complete and (bitwise or (worst is not None and worst <= s["tolerance"]))}
    if not row["passed"]:
        row["failure"] = _log_tail(run_dir)
    return row


def export_hf(run_dir: Path, out: Path, device, env: dict) -> dict:
    import torch

    t0 = time.time()
    done = subprocess.run([sys.executable, "-m", "h3pretrain.cli", "export-hf", "--checkpoint", str(run_dir),
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"case": "export-hf", "passed": False, "exit_code": done.returncode, "failure": done.stderr[-1500:]}
    from transformers import AutoModelForCausalLM

    from h3pretrain.checkpoint import load_checkpoint_model
    from h3pretrain.model import HybridLM

    cfg, weights = load_checkpoint_model(run_dir)
    ours = HybridLM(cfg.model)
    ours.load_state_dict(weights)
    ours = ours.to(device).eval()
    theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).to(device).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        a = ours(ids)[..., :cfg.model.vocab_size].float()
        b = theirs(ids).logits[..., :cfg.model.vocab_size].float()
    error = ((a - b).abs().max() / a.abs().max()).item()
    return {"case": "export-hf", "passed": error <= 1e-3, "max_rel_error": error, "tolerance": 1e-3,
            "device": str(device), "wall_s": round(time.time() - t0, 1)}


def train(device, smoke: bool):
    """The section (a generator, as the other sections of bench/gpu_check.py): the case names, then
    one row per case."""
    import tempfile

    from data_prep.corpus import build
    from data_prep.prep import PrepSettings, prepare

    yield list(CASES)
    s = sizes(smoke)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-train-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", MLFLOW_DISABLE_TELEMETRY="true")
    if device.type != "cuda":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
        env.pop("TRITON_INTERPRET", None)  # the trainer picks the reference kernels on a CPU by itself
    t0 = time.time()
    build(work / "corpus", max_docs=s["docs"], files=2)
    shards = work / "shards"
    manifest = prepare(PrepSettings(inputs=[str(work / "corpus")], out=str(shards), seq_len=s["seq_len"],
                                    vocab_size=s["vocab"], tokenizer_sample_mb=s["sample_mb"], val_fraction=0.05,
                                    samples_per_shard=256, workers=min(8, os.cpu_count() or 1)), progress=False)
    vocab, samples = manifest["tokenizer"]["vocab_size"], manifest["splits"]["train"]["samples"]
    yield {"case": "prep", "passed": True, "seconds": round(time.time() - t0, 1), "vocab_size": vocab,
           "train_samples": samples, "seq_len": s["seq_len"]}
    t = Trainer(shards, vocab, s, env)
    reference = work / "compiled"
    compiled = train_compiled(t, reference)
    yield compiled
    yield kill_and_resume(t, work / "killed", reference)
    yield export_hf(reference, work / "hf", device, env)
    yield train_eager(t, work / "eager", compiled)
