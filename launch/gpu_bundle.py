"""`make gpu-bundle`: the wheels that let `make gpu-check` train on the lent GPU machine.

    python launch/gpu_bundle.py            # -> .whl/*.whl and .whl/bundle.json, the size printed
    python launch/gpu_bundle.py --list     # what would go in, without downloading

That machine (launch/gpu-machine-packages.txt) has Python 3.12 and a CUDA torch but no package
registry. The bundle is every distribution the trainer needs (h3pretrain's requirements, followed
through their own, at the versions installed in this environment, i.e. launch/constraints.txt)
that the machine lacks, as wheels for CPython 3.12 on manylinux x86_64. A distribution published
only as a source archive (DeepSpeed) is built here into a wheel (pure Python: its ops are JIT-built
on first use). What is optional and too large to travel (mlflow and what only it needs) is left
out: the trainer then logs to metrics.jsonl only and says so in one line.
The folder travels with the working tree (`carry: [".whl"]`), within the 64 MiB that a device call
takes for the tree and what it carries together.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MACHINE_LIST = ROOT / "launch" / "gpu-machine-packages.txt"
BUNDLE_DIR = ROOT / ".whl"
TRAVEL_LIMIT_MB = 64.0
# Optional for training, and with their own requirements (SQLAlchemy, Flask, pandas, ...) far too
# large to travel: not followed.
LEFT_OUT = {"mlflow": "tracking falls back to metrics.jsonl, with one line saying so"}
# The trainer: its requirements without the test and evaluation extras.
ROOTS = ["h3pretrain"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_24_x86_64"]
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def machine_packages(path: Path = MACHINE_LIST) -> dict[str, str | None]:
    """name -> version (None where the list gives none) of what the lent machine has installed."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[normalize(name)] = version or None
    return out


def _requirements(dist: str) -> list:
    """The requirements of an installed distribution that apply on the lent machine (no extras)."""
    from packaging.requirements import Requirement

    reqs = [Requirement(text) for text in md.requires(dist) or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(TARGET_ENV)]


def requirement_closure(names) -> set[str]:
    """The installed distributions `names` need, followed through their requirements (as this
    environment has them installed), `names` included."""
    seen: set[str] = set()
    todo = [normalize(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            reqs = _requirements(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [normalize(r.name) for r in reqs]
    return seen


def plan(machine: dict[str, str | None] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(bundle: name -> version, left_out: name -> why). The versions are this environment's. A
    requirement the machine has is taken from there unless it asks for a version the machine's does
    not satisfy, or the machine's version is unknown (then this environment's travels too)."""
    machine = machine_packages() if machine is None else machine
    bundle: dict[str, str] = {}
    seen: set[str] = set()
    todo = [(normalize(r), None) for r in ROOTS]
    while todo:
        name, specifier = todo.pop()
        on_machine = name in machine and (
            not specifier or (machine[name] is not None and specifier.contains(machine[name], prereleases=True)))
        if name in LEFT_OUT or name in ROOTS and name in seen or on_machine and name not in ROOTS:
            continue
        if name not in ROOTS:
            if name in bundle:
                continue
            bundle[name] = md.version(name)
        seen.add(name)
        todo += [(normalize(r.name), r.specifier) for r in _requirements(name)]
    return dict(sorted(bundle.items())), dict(LEFT_OUT)


def _download(name: str, version: str, out: Path) -> Path:
    before = set(out.glob("*"))
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", "-d", str(out)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    done = subprocess.run(cmd + [f"{name}=={version}"], capture_output=True, text=True)
    if done.returncode != 0:  # no wheel on the index: build one from the source archive
        with tempfile.TemporaryDirectory() as tmp:
            built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                                    "-w", tmp, f"{name}=={version}"], capture_output=True, text=True,
                                   env={**os.environ, "DS_BUILD_OPS": "0"})
            wheels = list(Path(tmp).glob("*.whl"))
            if built.returncode != 0 or not wheels or not wheels[0].name.endswith("-none-any.whl"):
                raise SystemExit(f"gpu-bundle: no wheel of {name}=={version} for CPython 3.12 on manylinux x86_64, and "
                                 f"building one failed: {(built.stderr or done.stderr).strip().splitlines()[-1:]}")
            shutil.move(str(wheels[0]), out / wheels[0].name)
    new = set(out.glob("*")) - before
    return next(iter(new)) if new else next(out.glob(f"{re.sub('-', '_', name)}-{version}-*.whl"))


def tree_mb() -> float:
    """What the working tree sends with every device call: tracked and untracked, not ignored files."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    return sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file()) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(BUNDLE_DIR))
    ap.add_argument("--list", action="store_true", help="print the plan only")
    args = ap.parse_args()
    bundle, left_out = plan()
    if args.list:
        for name, version in bundle.items():
            print(f"{name}=={version}")
        for name, why in left_out.items():
            print(f"# left out: {name} ({why})")
        return 0
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    files = {}
    for name, version in bundle.items():
        wheel = _download(name, version, out)
        files[name] = {"version": version, "wheel": wheel.name, "bytes": wheel.stat().st_size}
        print(f"  {wheel.name} ({wheel.stat().st_size / 2**20:.2f} MiB)", flush=True)
    size = sum(f["bytes"] for f in files.values()) / 2**20
    tree = tree_mb()
    (out / "bundle.json").write_text(json.dumps({"python": "3.12", "packages": files, "left_out": left_out,
                                                 "bundle_mib": round(size, 2), "tree_mib": round(tree, 2)}, indent=1) + "\n")
    print(f"gpu-bundle: {len(files)} wheels, {size:.1f} MiB in {out}; with the working tree ({tree:.1f} MiB) "
          f"{size + tree:.1f} of the {TRAVEL_LIMIT_MB:.0f} MiB a device call takes; left out: "
          + ", ".join(f"{k} ({v})" for k, v in left_out.items()))
    if size + tree > TRAVEL_LIMIT_MB * 0.95:
        print(f"gpu-bundle: over the limit: {size + tree:.1f} MiB", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
