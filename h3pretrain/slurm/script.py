"""Render the sbatch script of a training run from its Config.

One SLURM task per GPU (`srun --ntasks-per-node=G`, RANK from SLURM_PROCID), not torchrun: a
signal then reaches the trainers themselves (torchrun's agent dies on SIGUSR1, leaving its workers
running, and reports a child's exit 75 as its own exit 1), and srun hands back their exit code.

The batch shell owns the restart policy (EXIT_PREEMPTED = 75, h3pretrain/train/signals.py):
    0               finished: exit 0, no requeue
    75              checkpoint saved after USR1 (time limit near, or a preemption signal):
                    `scontrol requeue`; the next start resumes from checkpoints/latest
    75 after TERM   scancel / SLURM's own preemption: no self-requeue (SLURM decides)
    65              the loss went non-finite train.max_bad_steps times in a row: no requeue (a restart
                    from the last good checkpoint would meet the same batches)
    anything else   a failure: requeued at most slurm.max_restarts times per job, then the job fails
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ConfigError
from ..train.signals import EXIT_DIVERGED, EXIT_PREEMPTED


@dataclass(frozen=True)
class JobPlan:
    cfg: Config  # the job's config: overrides applied, paths absolute
    run_dir: Path
    job_name: str
    tasks_per_node: int
    world: int
    dp: int
    accumulation: int
    source: str  # the YAML it came from

    @property
    def slurm_dir(self) -> Path:
        return self.run_dir / "slurm"

    @property
    def job_config(self) -> Path:
        return self.slurm_dir / "config.yaml"

    @property
    def script_path(self) -> Path:
        return self.slurm_dir / "job.sbatch"

    def log_path(self, job_id: str) -> Path:
        return self.slurm_dir / f"job-{job_id}.log"


def _absolute(path: str, base: Path) -> str:
    return str((base / path).resolve()) if path and not os.path.isabs(path) else path


def plan(cfg: Config, source: str, base: Path | None = None) -> JobPlan:
    """Validate the layout and fix the job's config (absolute paths); raises ConfigError."""
    base = Path.cwd() if base is None else base
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data), train=dataclasses.replace(cfg.train))
    cfg.data.path = _absolute(cfg.data.path, base)
    cfg.data.sources = [dataclasses.replace(s, path=_absolute(s.path, base)) for s in cfg.data.sources]
    cfg.data.tokenizer = _absolute(cfg.data.tokenizer, base)
    cfg.train.run_dir = _absolute(cfg.train.run_dir, base)
    cfg.train.deepspeed_json = _absolute(cfg.train.deepspeed_json, base)

    s, parallel, training = cfg.slurm, cfg.parallel, cfg.train
    errors = []
    tasks = s.tasks_per_node or s.gpus_per_node
    if s.nodes < 1:
        errors.append(f"slurm.nodes must be >= 1, not {s.nodes}")
    if tasks < 1:
        errors.append("slurm.tasks_per_node must be >= 1 when slurm.gpus_per_node is 0 (CPU nodes)")
    elif s.gpus_per_node and s.tasks_per_node not in (0, s.gpus_per_node):
        errors.append(f"slurm.tasks_per_node {s.tasks_per_node} != gpus_per_node {s.gpus_per_node}: "
                      "one training process per GPU")
    if not 0 < s.grace_s < 65536:
        errors.append(f"slurm.grace_s must be in 1..65535 (sbatch --signal), not {s.grace_s}")
    if s.max_restarts < 0:
        errors.append(f"slurm.max_restarts must be >= 0, not {s.max_restarts}")
    if training.resume != "auto":
        errors.append(f"train.resume must be 'auto' for a SLURM job (every restart resumes from the run's "
                      f"latest checkpoint), not {training.resume!r}")
    world = max(s.nodes, 1) * max(tasks, 1)
    model_parallel = parallel.tp * parallel.pp * parallel.cp
    dp = world // model_parallel if model_parallel > 0 else 0
    if model_parallel < 1 or world % model_parallel:
        errors.append(f"{world} ranks ({s.nodes} nodes x {tasks}) do not split into tp {parallel.tp} "
                      f"x pp {parallel.pp} x cp {parallel.cp}")
    elif training.global_batch % (dp * training.micro_batch):
        errors.append(f"train.global_batch {training.global_batch} is not a multiple of data-parallel size {dp} x "
                      f"train.micro_batch {training.micro_batch}")
    if errors:
        raise ConfigError("cannot make a SLURM job: " + "; ".join(errors))
    run_dir = Path(training.run_dir)
    name = s.job_name or (run_dir.name if run_dir.name.startswith("h3") else f"h3-{run_dir.name}")
    return JobPlan(cfg=cfg, run_dir=run_dir, job_name=name, tasks_per_node=tasks,
                   world=world, dp=dp, accumulation=training.global_batch // (dp * training.micro_batch), source=source)


def _checkout() -> Path:
    """The checkout this package runs from (the job runs the same code); else the current directory."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def python_for_jobs() -> str:
    """The interpreter the job runs: H3_PYTHON, else this one (the venv's, under make)."""
    return os.environ.get("H3_PYTHON") or sys.executable


def render(p: JobPlan, repo: Path | None = None) -> str:
    """The sbatch script. `repo`: the checkout whose code the job runs (default: this package's)."""
    repo = (repo or _checkout()).resolve()
    s, q = p.cfg.slurm, shlex.quote
    sbatch = [f"--job-name={p.job_name}", f"--nodes={s.nodes}", f"--ntasks-per-node={p.tasks_per_node}",
              f"--cpus-per-task={s.cpus_per_task}"]
    if s.gpus_per_node:
        sbatch.append(f"--gpus-per-node={s.gpus_per_node}")
    sbatch.append(f"--time={s.time}")
    sbatch += [f"--{k}={v}" for k, v in (("partition", s.partition), ("account", s.account), ("qos", s.qos)) if v]
    if s.exclusive:
        sbatch.append("--exclusive")
    sbatch += [f"--chdir={repo}", f"--output={p.slurm_dir}/job-%j.log", "--open-mode=append",
               f"--signal=B:USR1@{s.grace_s}", "--requeue", *s.sbatch]
    for opt in sbatch:
        if any(c.isspace() for c in opt):
            raise ConfigError(f"sbatch option {opt!r} contains white space")
    parallel, training = p.cfg.parallel, p.cfg.train
    header = [
        "#!/bin/bash",
        f"# h3pretrain training job rendered by `h3pretrain slurm` from {p.source} on "
        f"{time.strftime('%Y-%m-%d %H:%M')}.",
        f"# {p.world} ranks = {s.nodes} nodes x {p.tasks_per_node}: tp {parallel.tp} x pp {parallel.pp} "
        f"x cp {parallel.cp} x dp {p.dp};",
        f"# global batch {training.global_batch} = dp {p.dp} x micro {training.micro_batch} "
        f"x accumulation {p.accumulation}.",
        f"# Config of this job: {p.job_config}. Re-submit: h3pretrain slurm resume {p.run_dir}",
        *[f"#SBATCH {opt}" for opt in sbatch],
    ]
    values = {
        "RUN_DIR": q(str(p.run_dir)), "JOB_CONFIG": q(str(p.job_config)), "PYTHON": q(python_for_jobs()),
        "REPO": q(str(repo)), "MAX_RESTARTS": str(s.max_restarts), "EXIT_PREEMPTED": str(EXIT_PREEMPTED),
        "EXIT_DIVERGED": str(EXIT_DIVERGED),
        "TASKS_PER_NODE": str(p.tasks_per_node), "CPUS_PER_TASK": str(s.cpus_per_task),
    }
    body = _BODY
    for key, value in values.items():
        body = body.replace("@" + key + "@", value)
    setup = "\n".join(s.setup) + "\n" if s.setup else ""
    if s.gpus_per_node:
        setup += _GPU_CHECK
    return "\n".join(header) + "\n" + body.replace("@SETUP@\n", setup)


# A CPU-only torch on a GPU node would train, slowly, on CPU: refuse before starting.
_GPU_CHECK = r"""if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "[h3pretrain-slurm] torch in $PYTHON sees no GPU on $(hostname): not starting (no requeue)"
    exit 1
fi
"""

_BODY = r"""
set -u
RUN_DIR=@RUN_DIR@
JOB_CONFIG=@JOB_CONFIG@
PYTHON=@PYTHON@
MAX_RESTARTS=@MAX_RESTARTS@  # failures (not preemptions) requeued per job
EXIT_PREEMPTED=@EXIT_PREEMPTED@  # the trainer saved a checkpoint after a stop signal
EXIT_DIVERGED=@EXIT_DIVERGED@  # the loss went non-finite train.max_bad_steps steps in a row
FAILURES_FILE=$RUN_DIR/slurm/failures-$SLURM_JOB_ID

export PYTHONPATH=@REPO@:@REPO@/kernels${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-@CPUS_PER_TASK@}
# Decided here on the compute node: a login node without GPUs would hand down "cpu".
export DS_ACCELERATOR=$(command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
# Compile caches on node-local disk: one cache on a shared file system races between nodes.
NODE_TMP=${H3_NODE_TMP:-${TMPDIR:-/tmp}}/h3pretrain-${USER:-$(id -un)}
export TRITON_CACHE_DIR=$NODE_TMP/triton
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$NODE_TMP/torch_extensions}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((20000 + (SLURM_JOB_ID * 16 + ${SLURM_RESTART_COUNT:-0}) % 40000))
@SETUP@
log() { echo "[h3pretrain-slurm $(date +%Y-%m-%dT%H:%M:%S)] $*"; }

requeue() {
    log "$1: requeuing job $SLURM_JOB_ID; it resumes from $(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || echo 'the start (no checkpoint yet)')"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        log "scontrol requeue failed: resubmit with \`h3pretrain slurm resume $RUN_DIR\`"
        exit "$2"
    fi
    exit "$2"  # SLURM ends this shell as it requeues the job; never reached, or moments before
}

step_pid=""
stop_signal=""
on_signal() {
    stop_signal=$1
    log "SIG$1"
    # USR1 (--signal=B:USR1@grace) reaches only this shell: pass it to the training step (srun
    # forwards it to every task). SIGTERM (scancel, time limit, SLURM preemption) reaches the
    # tasks from SLURM itself.
    if [ "$1" = USR1 ] && [ -n "$step_pid" ]; then kill -USR1 "$step_pid" 2>/dev/null; fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# The state this attempt's trainer wrote last (status.json newer than the attempt), else "".
trainer_state() {
    local f=$RUN_DIR/status.json
    if [ -f "$f" ] && [ "$(stat -c %Y "$f")" -ge "$attempt_start" ]; then
        sed -n 's/^ *"state": "\([a-z]*\)".*/\1/p' "$f" | head -n 1
    fi
}

attempt_start=$(date +%s)
log "job $SLURM_JOB_ID start ${SLURM_RESTART_COUNT:-0}: $SLURM_NTASKS tasks on $SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT"
[ "$stop_signal" = USR1 ] && requeue "stop signal before training started" "$EXIT_PREEMPTED"

# --kill-on-bad-exit=0: a rank that exits 75 first must not kill the others while they finish
# writing; --wait: if one rank crashes, the rest (stuck in a collective) go 120 s later.
srun --ntasks="$SLURM_NTASKS" --ntasks-per-node=@TASKS_PER_NODE@ --cpus-per-task=@CPUS_PER_TASK@ \
    --kill-on-bad-exit=0 --wait=120 \
    bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' h3-rank \
    "$PYTHON" -m h3pretrain.cli train --config "$JOB_CONFIG" &
step_pid=$!
[ -n "$stop_signal" ] && on_signal "$stop_signal"  # arrived between fork and step_pid

# A trapped signal interrupts `wait`; wait again until the step is really gone.
while :; do
    wait "$step_pid"; rc=$?
    kill -0 "$step_pid" 2>/dev/null || break
done
wait "$step_pid" 2>/dev/null; last=$?
[ "$last" -ne 127 ] && rc=$last

state=$(trainer_state)
if [ "$rc" -eq 0 ] || [ "$state" = finished ]; then
    # A non-zero code after "finished" is a crash while shutting down: the run itself is complete.
    log "training finished (exit $rc, trainer state ${state:-none})"
    exit 0
fi
if [ "$rc" -eq 2 ]; then
    log "training refused its input (exit 2: the error above names the setting or file): not requeuing"
    exit "$rc"
fi
if [ "$rc" -eq "$EXIT_DIVERGED" ]; then
    log "training diverged (exit $rc: non-finite loss or gradients, see the error above): not requeuing"
    exit "$rc"
fi
if [ "$stop_signal" = TERM ]; then
    log "step exited $rc after SIGTERM (scancel, time limit or SLURM preemption): not requeuing here"
    exit "$rc"
fi
if [ "$rc" -eq "$EXIT_PREEMPTED" ] || [ "$state" = preempted ]; then
    requeue "preempted (exit $rc, checkpoint saved)" "$EXIT_PREEMPTED"
fi
failures=$(( $(cat "$FAILURES_FILE" 2>/dev/null || echo 0) + 1 ))
echo "$failures" > "$FAILURES_FILE"
if [ "$failures" -gt "$MAX_RESTARTS" ]; then
    log "training failed (exit $rc), failure $failures of this job: restart bound $MAX_RESTARTS reached, not requeuing"
    exit "$rc"
fi
requeue "training failed (exit $rc): restart $failures of at most $MAX_RESTARTS" "$rc"
"""
