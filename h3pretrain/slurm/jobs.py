"""Submit, resume and inspect SLURM training jobs.

A run directory keeps its SLURM side in `slurm/`: config.yaml (the job's resolved config),
job.sbatch (the script), jobs.jsonl (every job submitted for the run), job-<id>.log (one per job,
appended across requeues) and failures-<id> (failed attempts of that job, for the restart bound).
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import yaml

from .. import jsonio, rundir
from ..config import ConfigError, load_yaml, save_yaml, to_dict
from .script import JobPlan, plan, python_for_jobs, render
from ..errors import UserError

# States in which a job still holds or waits for resources: a second job must not share the run dir.
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "SPECIAL_EXIT", "RESV_DEL_HOLD"}


class SlurmError(UserError):
    """A SLURM command failed or a job cannot be submitted; the message says what to do."""


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} not found: run this on a SLURM login node (or set PATH)") from None
    if check and done.returncode:
        raise SlurmError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict; after MinJobAge, what accounting (sacct) has; else {}."""
    done = _run(["scontrol", "show", "job", "-o", job_id], check=False)
    if not done.returncode and done.stdout.strip():
        return dict(re.findall(r"(?:^|\s)([A-Za-z:/]+)=(\S*)", done.stdout))
    if "Invalid job id" not in done.stderr:  # SLURM itself is not answering
        return {"Reason": f"scontrol: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"}
    try:
        done = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode,Elapsed,NodeList"], check=False)
    except SlurmError:  # no sacct on this machine
        return {}
    rows = [line.split("|") for line in done.stdout.splitlines() if line.count("|") == 3]
    if done.returncode or not rows:
        return {}
    state, exit_code, elapsed, nodes = rows[-1]
    return {"JobState": state.split()[0], "ExitCode": exit_code, "RunTime": elapsed, "NodeList": nodes}


def job_ids(run_dir: Path) -> list[str]:
    path = Path(run_dir) / "slurm" / "jobs.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["job_id"] for line in path.read_text().splitlines() if line.strip()]


def active_job(run_dir: Path) -> tuple[str, str] | None:
    for job_id in reversed(job_ids(run_dir)):
        state = job_info(job_id).get("JobState", "")
        if state in ACTIVE_STATES:
            return job_id, state
    return None


def preflight(p: JobPlan) -> None:
    """What can be checked on the login node before anything waits in a queue: data and torch."""
    check_data(p)
    if p.cfg.slurm.gpus_per_node:
        python = python_for_jobs()
        done = _run([python, "-c", "import torch; print(torch.version.cuda or '')"], check=False)
        if done.returncode:
            raise SlurmError(f"{python} cannot import torch: {done.stderr.strip()[-300:]}")
        if not done.stdout.strip():
            raise SlurmError(f"torch in {python} is a CPU build, and the job asks for GPUs: run `make setup` "
                             "with a Python that has a CUDA torch, or set H3_PYTHON to one")


def check_data(p: JobPlan) -> None:
    """The shards (of every source of a mixture) exist and fit the model."""
    for path, _ in p.cfg.data_sources():
        manifest = Path(path) / "manifest.json"
        if not manifest.is_file():
            raise SlurmError(f"no prepared data at {path} (no manifest.json): run `h3pretrain prep` "
                             "first or point H3_DATA (data.path) or data.sources at a prepared directory")
        vocab = json.loads(manifest.read_text())["tokenizer"]["vocab_size"]
        if vocab != p.cfg.model.vocab_size:
            raise SlurmError(f"model.vocab_size {p.cfg.model.vocab_size} but {path} has a {vocab}-token "
                             f"tokenizer: prepare the data with --vocab-size {p.cfg.model.vocab_size} or set "
                             f"model.vocab_size={vocab}")
    if p.cfg.data.tokenizer and not Path(p.cfg.data.tokenizer).is_file():
        raise SlurmError(f"data.tokenizer {p.cfg.data.tokenizer} does not exist (H3_TOKENIZER)")


def check_same_run(p: JobPlan) -> None:
    """A run directory holds one run: a job with another model, data, recipe or layout is refused."""
    if not p.job_config.is_file():
        return
    old = yaml.safe_load(p.job_config.read_text())
    new = to_dict(p.cfg)
    changed = [f"{section}.{key}" for section in ("model", "data", "train", "parallel")
               for key in sorted(set(old.get(section, {})) | set(new[section]))
               if old.get(section, {}).get(key) != new[section].get(key)]
    world = lambda c: c["slurm"]["nodes"] * (c["slurm"]["tasks_per_node"] or c["slurm"]["gpus_per_node"])  # noqa: E731
    if world(old) != world(new):
        changed.append(f"ranks ({world(old)} -> {world(new)})")
    if changed:
        raise SlurmError(f"{p.run_dir} already holds a run with another config ({', '.join(changed)}): "
                         "use another run directory (H3_RUNS or --set train.run_dir=...) or resume it unchanged")


def submit(p: JobPlan, repo: Path | None = None, sbatch_args: list[str] = (), new_run: bool = True) -> str:
    """Write the job's config and script into run_dir/slurm, sbatch it; returns the job id.

    new_run: refuse a run directory that holds a run with another config (resume passes False).
    """
    active = active_job(p.run_dir)
    if active:
        raise SlurmError(f"job {active[0]} ({active[1]}) is already working on {p.run_dir}: "
                         f"see `h3pretrain slurm status {p.run_dir}`, or scancel it first")
    if new_run:
        check_same_run(p)
    preflight(p)
    script = render(p, repo)
    p.slurm_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(p.cfg, p.job_config)
    p.script_path.write_text(script)
    out = _run(["sbatch", "--parsable", *sbatch_args, str(p.script_path)]).stdout.strip()
    job_id = out.split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed {out!r}, not a job id")
    record = {"job_id": job_id, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": p.source}
    with open(p.slurm_dir / "jobs.jsonl", "a") as f:
        f.write(jsonio.dumps(record) + "\n")
    return job_id


def describe(p: JobPlan, job_id: str) -> str:
    mlflow = rundir.mlflow_uri(p.run_dir, p.cfg.train.mlflow_uri)
    return "\n".join([
        f"submitted job {job_id}: {p.job_name}, {p.cfg.slurm.nodes} node(s) x {p.tasks_per_node} ranks",
        f"  log          {p.log_path(job_id)}",
        f"  checkpoints  {p.run_dir / 'checkpoints'}",
        f"  metrics      {p.run_dir / 'metrics.jsonl'}",
        f"  mlflow       mlflow ui --backend-store-uri {mlflow}",
        f"  status       h3pretrain slurm status {p.run_dir}   (make status RUN={p.run_dir})",
    ])


def resume_plan(run_dir: Path, overrides: list[str] = ()) -> JobPlan:
    """The plan of a run submitted before, from its saved config (plus overrides such as slurm.time)."""
    config = Path(run_dir) / "slurm" / "config.yaml"
    if not config.is_file():
        raise SlurmError(f"{config} not found: {run_dir} was not started by `h3pretrain slurm submit`")
    cfg = load_yaml(config, overrides)
    if Path(cfg.train.run_dir).resolve() != Path(run_dir).resolve():
        raise ConfigError(f"{config} names train.run_dir {cfg.train.run_dir}, not {run_dir}")
    # Another number of nodes or another TP x PP layout is fine: checkpoints hold full tensors and
    # reshard on load (h3pretrain.checkpoint.canonical).
    return plan(cfg, str(config))


def status(run_dir: Path) -> dict:
    """Job state, trainer state, last step and loss, latest checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SlurmError(f"{run_dir} does not exist")
    ids = job_ids(run_dir)
    out: dict = {"run_dir": str(run_dir), "jobs": ids, "job": None}
    if ids:
        try:
            info = job_info(ids[-1])
        except SlurmError as err:  # not on a SLURM machine: the run directory still tells a lot
            info = {"Reason": str(err)}
        out["job"] = {"id": ids[-1], "state": info.get("JobState"),
                      "reason": info.get("Reason"), "restarts": info.get("Restarts"),
                      "exit_code": info.get("ExitCode"), "run_time": info.get("RunTime"),
                      "nodes": info.get("NodeList"),
                      "failures": _read_int(run_dir / "slurm" / f"failures-{ids[-1]}"),
                      "log": str(run_dir / "slurm" / f"job-{ids[-1]}.log")}
    try:
        out["trainer"] = rundir.read_status(run_dir)
    except ValueError as err:
        out["trainer"] = {"state": f"unreadable: {err}"}
    last = rundir.last_records(run_dir).get("train")
    out["last_step"] = last["step"] if last else None
    out["last_loss"] = last["loss"] if last else None
    latest = rundir.latest_checkpoint(run_dir)
    out["latest_checkpoint"] = str(latest) if latest else None
    return out


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def format_status(st: dict) -> str:
    lines = [f"run       {st['run_dir']}"]
    job = st["job"]
    if job and job["state"]:
        state = job["state"] + (f" ({job['reason']})" if job["reason"] not in (None, "None") else "")
        lines += [f"job       {job['id']}: {state}, restarts {job['restarts']}, failures {job['failures']}, "
                  f"exit code {job['exit_code']}, run time {job['run_time']}", f"log       {job['log']}"]
    elif job:
        why = job["reason"] or "ended more than MinJobAge ago"
        lines += [f"job       {job['id']}: not known to SLURM ({why}); failures {job['failures']}",
                  f"log       {job['log']}"]
    if len(st["jobs"]) > 1:
        lines.append(f"earlier   jobs {', '.join(st['jobs'][:-1])}")
    if not job:
        lines.append("job       none submitted from this run directory")
    tr = st["trainer"]
    if tr and "step" in tr:
        lines.append(f"trainer   {tr['state']} at step {tr['step']} of {tr['steps']} ({tr['time']})")
    elif tr:
        lines.append(f"trainer   {tr.get('state')}")
    if st["last_step"] is not None:
        lines.append(f"last step {st['last_step']}, loss {st['last_loss']:.4f}")
    lines.append(f"latest    {st['latest_checkpoint'] or 'no checkpoint yet'}")
    return "\n".join(lines)
