"""Graph breaks of the regionally compiled blocks under each parallel layout, on CPU/gloo: runs
tests/parallel/parallel_probe.py (3 optimizer steps of a small hybrid) with train.compile on and
TORCH_LOGS=graph_breaks, and lists each distinct break (reason, where) with its count per rank.

    python bench/graph_breaks.py            # -> bench/results/graph-breaks-cpu.md
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = {  # name: (processes, probe arguments)
    "one process": (1, dict(head_dim=2)),
    "one process, selective recompute": (1, dict(head_dim=2, recompute="selective")),
    "DP2 ZeRO-2": (2, dict(zero=2, head_dim=1)),
    "DP2 ZeRO-3": (2, dict(zero=3, head_dim=1)),
    "TP2": (2, dict(tp=2, head_dim=2)),
    "TP2 sequence parallel": (2, dict(tp=2, sp=1, head_dim=2)),
    "PP2": (2, dict(pp=2, head_dim=1)),
    "CP2": (2, dict(cp=2, head_dim=2)),
}
REASON = re.compile(r"Graph Break Reason: (.*)")
USER_CODE = re.compile(r"Graph break in user code at (\S+)")


def breaks(log: str) -> collections.Counter:
    found: collections.Counter = collections.Counter()
    where = None
    lines = log.splitlines()
    for i, line in enumerate(lines):
        m = USER_CODE.search(line)
        if m:
            where = m.group(1).replace(str(ROOT) + "/", "")
            where = re.sub(r".*site-packages/", "", where)
        m = REASON.search(line)
        if m:
            detail = next((REASON_DETAIL for REASON_DETAIL in (lines[j].split("]", 2)[-1].strip()
                                                              for j in range(i + 1, min(i + 8, len(lines))))
                           if REASON_DETAIL.startswith(("Explanation:", "Skip calling"))), "")
            found[(m.group(1).strip()[:120], detail[:160], where)] += 1
    return found


def main() -> int:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TORCH_LOGS="graph_breaks",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels")]))
    out = [f"# Graph breaks of the compiled blocks (CPU, gloo), {time.strftime('%Y-%m-%d')}", "",
           "`python bench/graph_breaks.py`: tests/parallel/parallel_probe.py with compile=1, TORCH_LOGS=graph_breaks; "
           "counts are summed over ranks and over the 3 steps (a break is logged when a graph is traced).", ""]
    for name, (nproc, args) in LAYOUTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   str(ROOT / "tests" / "parallel" / "parallel_probe.py"), tmp, "compile=1",
                   *(f"{k}={v}" for k, v in args.items())]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        found = breaks(done.stdout + done.stderr)
        status = "ok" if done.returncode == 0 else f"exit code {done.returncode}"
        out += [f"## {name} ({nproc} process{'es' if nproc > 1 else ''}; {status}): "
                f"{sum(found.values())} break(s)", ""]
        if found:
            out += ["| count | reason | detail | where |", "|---|---|---|---|"]
            out += [f"| {n} | {r} | {d} | {w} |" for (r, d, w), n in found.most_common()]
        out.append("")
        print(f"{name}: {sum(found.values())} graph break(s) [{status}]", flush=True)
    path = ROOT / "bench" / "results" / "graph-breaks-cpu.md"
    path.write_text("\n".join(out) + "\n")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
