"""`make gpu-check` on CPU: the toy-size smoke check runs every section (the train section on a Python
that sees only the lent GPU machine's packages and the bundle's) and writes the results files; the
time budgets are tested with a stand-in section that sleeps, so no test depends on this machine's
speed; the bundle's plan covers what the trainer imports and the machine lacks."""
import importlib.metadata as md
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))
import gpu_bundle  # noqa: E402

GENEROUS = "--budget 7200 --section-budgets correctness=1800 kernels=1800 models=1800 generation=1800 train=1800"

# Run at the start of every Python process of the check: the path finder no longer finds the
# top-level modules in H3_BLOCKED (those of installed distributions the lent machine lacks, as if
# they were not installed), and each process records the distributions whose files it loaded
# (H3_OWNERS: a module file's first two path parts under site-packages -> its distribution).
LENT_MACHINE = """
import json, os, sys
import importlib.machinery

_blocked = set(json.loads(os.environ["H3_BLOCKED"]))
_sites = {os.path.realpath(p) for p in sys.path if p.endswith("site-packages")}

class _LentMachinePathFinder(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        spec = super().find_spec(name, path, target)
        if spec is None or path is not None or name not in _blocked:
            return spec
        where = spec.submodule_search_locations[0] if spec.submodule_search_locations else spec.origin
        # installed at the top of site-packages (not a copy vendored inside another package)
        return None if where and os.path.realpath(os.path.dirname(where)) in _sites else spec

sys.meta_path[:] = [_LentMachinePathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]

def _record():
    with open(os.environ["H3_OWNERS"]) as f:
        owner = json.load(f)
    used = set()
    for module in list(sys.modules.values()):
        path = os.path.realpath(getattr(module, "__file__", None) or "")
        for site in _sites:
            if path.startswith(site + os.sep):
                parts = os.path.relpath(path, site).split(os.sep)
                name = owner.get("/".join(parts[:2])) or owner.get(parts[0])
                if name:
                    used.add(name)
    with open(os.path.join(os.environ["H3_IMPORTS_DIR"], f"{os.getpid()}.json"), "w") as f:
        json.dump(sorted(used), f)

import atexit
atexit.register(_record)
_exit = os._exit

def _recorded_exit(code):  # the trainer leaves through os._exit, past atexit
    _record()
    _exit(code)

os._exit = _recorded_exit
"""


def gpu_check(out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(["make", "-s", "gpu-check", f"GPU_CHECK_ARGS=--out-dir {out} {' '.join(args)}"], cwd=ROOT,
                          env=env, capture_output=True, text=True)


def setuptools_vendored() -> set[str]:
    """What setuptools carries in its _vendor folder and puts on sys.path once imported (it is on the
    lent machine too, so these import there)."""
    import setuptools

    vendor = Path(setuptools.__file__).parent / "_vendor"
    return {gpu_bundle.normalize(p.name.split("-")[0]) for p in vendor.glob("*.dist-info")}


def on_the_machine() -> set[str]:
    """What imports on the lent machine without the bundle: its packages and what they need (their
    versions there need what they need; here, this environment's versions stand in for them), and
    setuptools' vendored ones."""
    machine = gpu_bundle.machine_packages()
    return set(machine) | gpu_bundle.requirement_closure(machine) | setuptools_vendored()


def lent_machine_env(tmp_path: Path) -> tuple[dict, Path, set[str]]:
    site, imports = tmp_path / "site", tmp_path / "imports"
    site.mkdir()
    imports.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(LENT_MACHINE))
    bundle, _ = gpu_bundle.plan()
    allowed = on_the_machine() | set(bundle) | {"h3pretrain"}
    blocked = sorted(top for top, dists in md.packages_distributions().items()
                     if not any(gpu_bundle.normalize(d) in allowed for d in dists))
    owners: dict[str, str] = {}
    for dist in md.distributions():
        name = gpu_bundle.normalize(dist.metadata["Name"])
        for f in dist.files or []:
            owners.setdefault("/".join(f.parts[:2]), name)
            owners.setdefault(f.parts[0], name)
    (tmp_path / "owners.json").write_text(json.dumps(owners))
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "H3_BLOCKED": json.dumps(blocked), "H3_OWNERS": str(tmp_path / "owners.json"), "H3_IMPORTS_DIR": str(imports)}
    return env, imports, set(bundle)


@pytest.mark.slow
def test_smoke_runs_every_section_on_the_lent_machines_packages_and_writes_results(tmp_path):
    env, imports, bundle = lent_machine_env(tmp_path)
    done = gpu_check(tmp_path, GENEROUS, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-check-cpu-smoke.json").read_text())
    assert result["smoke"] and result["device"] == "cpu"
    sections = result["sections"]
    assert list(sections) == ["correctness", "kernels", "models", "generation", "train"]
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

    train = {r["case"]: r for r in sections["train"]["rows"]}
    assert list(train) == ["prep", "train compiled", "kill and resume", "export-hf", "train eager"]
    assert all(r["passed"] is True for r in train.values()), train
    run = train["train compiled"]
    assert run["tokens_per_s"] > 0 and run["flashconv"] == "reference" and run["compiled"] is False  # auto: off on CPU
    assert run["checkpoint_blocked_s"] > 0 and run["checkpoint_written_s"] > 0
    assert run["mlflow"] == "absent: metrics.jsonl only"  # mlflow is not on the lent machine
    assert train["train eager"]["tokens_per_s"] > 0
    resumed = train["kill and resume"]
    assert resumed["bitwise"] and resumed["steps_compared"] == 8 and resumed["resumed_from"] == "step-00000004"
    assert resumed["killed_after_step"] >= 6
    assert train["export-hf"]["max_rel_error"] <= 1e-5

    used = set().union(*(json.loads(p.read_text()) for p in imports.glob("*.json")))
    lacking = used - on_the_machine() - {"h3pretrain"}
    assert lacking <= bundle  # what ran and the machine lacks, the bundle carries
    assert {"deepspeed", "megatron-core", "webdataset", "zstandard"} <= lacking  # the train path ran
    assert "mlflow" not in used
    md_text = (tmp_path / "gpu-check-cpu-smoke.md").read_text()
    assert "## models: done" in md_text and "| hybrid-h3 tiny L=128 |" in md_text and "## train: done" in md_text


def test_the_bundle_carries_what_the_machine_lacks_and_leaves_mlflow_out():
    bundle, left_out = gpu_bundle.plan()
    assert set(bundle) == {"deepspeed", "megatron-core", "webdataset", "zstandard", "hjson", "braceexpand", "pydantic",
                           "pydantic-core", "annotated-types", "typing-inspection", "packaging", "typing-extensions"}
    assert all(bundle[name] == md.version(name) for name in bundle)  # this environment's (pinned) versions
    assert list(left_out) == ["mlflow"] and "metrics.jsonl" in left_out["mlflow"]
    machine = gpu_bundle.machine_packages()
    assert machine["torch"] == "2.11.0" and "mlflow" not in machine and "deepspeed" not in machine
    # a requirement the machine meets at a known version is taken from there
    known = {**machine, "packaging": "99.0", "typing-extensions": "99.0"}
    assert set(gpu_bundle.plan(known)[0]) == set(bundle) - {"packaging", "typing-extensions"}
    # one the machine lacks altogether travels, with what it needs
    assert {"webdataset", "braceexpand"} <= set(gpu_bundle.plan({k: v for k, v in machine.items() if k != "numpy"})[0]) \
        and "numpy" in gpu_bundle.plan({k: v for k, v in machine.items() if k != "numpy"})[0]


def test_a_section_out_of_time_is_stopped_and_its_cases_skipped(tmp_path):
    """A stand-in section reaches its first case, then sleeps past its budget of 8 s."""
    done = gpu_check(tmp_path, "--sections correctness --section-budgets correctness=8 --test-sleep 600")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sections = json.loads((tmp_path / "gpu-check-cpu-smoke.json").read_text())["sections"]
    assert list(sections) == ["correctness"]
    first = sections["correctness"]
    assert first["status"] == "stopped: its time budget of 8 s ran out" and first["wall_s"] >= 8
    assert [r["case"] for r in first["rows"]] == ["first"]
    assert first["skipped"] == [{"case": "second", "reason": first["status"]}, {"case": "third", "reason": first["status"]}]
    assert "stopped: its time budget of 8 s ran out" in (tmp_path / "gpu-check-cpu-smoke.md").read_text()


def test_what_a_section_leaves_unused_goes_to_the_next(tmp_path):
    done = gpu_check(tmp_path, "--sections correctness kernels --section-budgets correctness=40 kernels=5 --test-sleep 0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sections = json.loads((tmp_path / "gpu-check-cpu-smoke.json").read_text())["sections"]
    first, second = sections["correctness"], sections["kernels"]
    assert first["status"] == second["status"] == "done"
    assert 5 < second["budget_s"] <= 45  # its own 5 s and what the first left of its 40


def test_no_time_left_skips_the_rest(tmp_path):
    done = gpu_check(tmp_path, "--budget 5 --sections kernels generation")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sections = json.loads((tmp_path / "gpu-check-cpu-smoke.json").read_text())["sections"]
    assert {name: s["status"] for name, s in sections.items()} == {
        "kernels": "skipped: no time left", "generation": "skipped: no time left"}


def test_the_train_section_without_its_packages_or_a_bundle_is_skipped_with_the_reason(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    site, said = gpu_check.bundle_site(needs=("deepspeed", "no_such_module_here"), wheels_dir=tmp_path)
    assert site is None and said == f"missing no_such_module_here and no bundle in {tmp_path} (`make gpu-bundle` builds it)"
    assert gpu_check.bundle_site(needs=("deepspeed", "zstandard"))[1] == "installed"
