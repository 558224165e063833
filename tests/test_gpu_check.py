"""`make gpu-check` on CPU: the toy-size smoke check runs every section within its budget and writes
the results files; a section that runs out of time is stopped and its remaining cases are recorded
as skipped."""
import json
import re
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def gpu_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(["make", "-s", "gpu-check", f"GPU_CHECK_ARGS=--out-dir {out} {' '.join(args)}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)


def test_smoke_runs_every_section_and_writes_results(tmp_path):
    t0 = time.time()
    done = gpu_check(tmp_path)
    wall = time.time() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert wall < 180
    result = json.loads((tmp_path / "gpu-check-cpu-smoke.json").read_text())
    assert result["smoke"] and result["device"] == "cpu" and result["wall_s"] <= result["budget_s"]
    sections = result["sections"]
    assert list(sections) == ["correctness", "kernels", "models", "generation"]
    for name, sec in sections.items():
        assert sec["status"] == "done" and not sec["skipped"], (name, sec["status"], sec["skipped"])
    checks = {r["case"]: r for r in sections["correctness"]["rows"]}
    assert len([c for c in checks if c.startswith("flashconv L=")]) == 8
    for case, r in checks.items():
        assert r.get("passed") is True or r.get("skipped"), (case, r)
    assert checks["cuda-graph vs eager decoding"]["skipped"] == "CUDA graphs need a GPU"
    assert all(r["triton_runs"] == "triton" for r in sections["kernels"]["rows"][1:])  # the interpreter ran them
    assert sections["kernels"]["rows"][0]["bytes_per_s"] > 0
    models = {r["case"]: r for r in sections["models"]["rows"]}
    assert models["hybrid-h3 tiny L=128"]["fraction_of_ceiling"] > 0
    assert models["gpt2 tiny L=128"]["hybrid-h3_over_gpt2"] > 0
    assert models["hybrid-h3 1.3b L=128"]["skipped"]
    assert len(sections["generation"]["rows"]) == 4
    md = (tmp_path / "gpu-check-cpu-smoke.md").read_text()
    assert "## models: done" in md and "| hybrid-h3 tiny L=128 |" in md


def test_a_section_out_of_time_is_stopped_and_its_cases_skipped(tmp_path):
    done = gpu_check(tmp_path, "--sections correctness --section-budgets correctness=6")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sections = json.loads((tmp_path / "gpu-check-cpu-smoke.json").read_text())["sections"]
    assert list(sections) == ["correctness"]
    first = sections["correctness"]
    assert first["status"] == "stopped: its time budget of 6 s ran out" and 5.5 < first["wall_s"] < 9
    assert first["skipped"] and all(s["reason"] == first["status"] for s in first["skipped"])
    planned = {r["case"] for r in first["rows"]} | {s["case"] for s in first["skipped"]}
    assert len(planned) == 11  # 8 self-checks, the step kernels, conv vs recurrent, graph decoding
    assert "stopped: its time budget of 6 s ran out" in (tmp_path / "gpu-check-cpu-smoke.md").read_text()


def test_no_time_left_skips_the_rest(tmp_path):
    done = gpu_check(tmp_path, "--budget 5 --sections kernels generation")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sections = json.loads((tmp_path / "gpu-check-cpu-smoke.json").read_text())["sections"]
    assert {name: s["status"] for name, s in sections.items()} == {
        "kernels": "skipped: no time left", "generation": "skipped: no time left"}
