"""SLURM launch: rendered sbatch scripts of the presets, the batch shell's restart policy (with fake
srun/scontrol), and real jobs on a private local SLURM (slurmctld + slurmd + munge from Debian):
preempt with USR1 -> save, requeue, resume -> the same losses as an uninterrupted job; a crashing
job stops after its restart bound."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from h3pretrain.config import DataConfig, TrainConfig, load_yaml
from h3pretrain.slurm import plan, render
from slurm_local import LocalSlurm, SlurmUnavailable, ensure_installed

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "launch" / "configs"
# docs/design.md section 3: lr, global batch (sequences of 2048), ~400B tokens; parameters from the table.
RECIPE = {"125m": (6e-4, 256, 126_387_456), "355m": (3e-4, 256, 361_058_304),
          "1.3b": (2e-4, 512, 1_326_096_384), "2.7b": (1.6e-4, 512, 2_670_307_840)}


def _sbatch_options(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].partition("=")
            out[key] = value
    return out


# ---- presets: config and rendered script ------------------------------------------------------

@pytest.mark.parametrize("name", sorted(RECIPE))
def test_preset_config_follows_the_recipe(name, monkeypatch):
    for var in ("H3_DATA", "H3_RUNS", "H3_TOKENIZER", "H3_MLFLOW_URI"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_yaml(CONFIGS / f"{name}.yaml")
    lr, batch, params = RECIPE[name]
    tc = cfg.train
    assert (tc.lr, tc.global_batch, tc.betas, tc.weight_decay, tc.grad_clip) == (lr, batch, [0.9, 0.999], 0.1, 1.0)
    assert tc.precision == "bf16" and tc.min_lr_ratio == 0.1 and tc.resume == "auto"
    assert tc.steps * batch * 2048 == pytest.approx(400e9, rel=1e-3)
    assert tc.warmup_steps == round(tc.steps / 100)
    assert cfg.model.vocab_size == 50257 and cfg.model.padded_vocab_size == 50264
    from h3pretrain.model import HybridLM
    import torch

    with torch.device("meta"):
        assert HybridLM(cfg.model).num_parameters() == params
    # documented defaults of the environment-variable paths
    assert cfg.data.path == "data/shards" and cfg.data.tokenizer == ""
    assert tc.run_dir == f"checkpoints/h3-{name}"


@pytest.mark.parametrize("name", sorted(RECIPE))
def test_rendered_sbatch_carries_the_config(name, monkeypatch, tmp_path):
    monkeypatch.setenv("H3_DATA", str(tmp_path / "shards"))
    monkeypatch.setenv("H3_RUNS", str(tmp_path / "runs"))
    cfg = load_yaml(CONFIGS / f"{name}.yaml", ["slurm.partition=gpu", "slurm.account=proj42"])
    p = plan(cfg, f"launch/configs/{name}.yaml")
    script = render(p)
    opts = _sbatch_options(script)
    s, par = cfg.slurm, cfg.parallel
    run_dir = tmp_path / "runs" / f"h3-{name}"
    assert p.run_dir == run_dir and p.cfg.data.path == str(tmp_path / "shards")
    assert opts["--nodes"] == str(s.nodes) and opts["--gpus-per-node"] == "8" == str(s.gpus_per_node)
    assert opts["--ntasks-per-node"] == "8"  # one task per GPU
    assert opts["--time"] == s.time and opts["--partition"] == "gpu" and opts["--account"] == "proj42"
    assert opts["--signal"] == f"B:USR1@{s.grace_s}" and opts["--open-mode"] == "append"
    assert "--requeue" in opts and opts["--output"] == f"{run_dir}/slurm/job-%j.log"
    assert opts["--job-name"] == f"h3-{name}"
    assert f"MAX_RESTARTS={s.max_restarts} " in script
    assert f"JOB_CONFIG={run_dir}/slurm/config.yaml" in script
    assert "export TRITON_CACHE_DIR=$NODE_TMP/triton" in script and "NODE_TMP=${H3_NODE_TMP:-${TMPDIR:-/tmp}}" in script
    assert re.search(r"srun .*--ntasks-per-node=8 ", script)
    world = s.nodes * 8
    dp = world // (par.tp * par.pp * par.cp)
    assert p.world == world and p.dp == dp
    assert dp * cfg.train.micro_batch * p.accumulation == cfg.train.global_batch
    assert f"# {world} ranks = {s.nodes} nodes x 8: tp {par.tp} x pp {par.pp} x cp {par.cp} x dp {dp};" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_env_paths_and_make_style_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("H3_DATA", "/scratch/pile")
    monkeypatch.setenv("H3_TOKENIZER", "/scratch/pile/tokenizer.model")
    monkeypatch.delenv("H3_RUNS", raising=False)
    cfg = load_yaml(CONFIGS / "2.7b.yaml", ["slurm.nodes=16", "slurm.time=02:00:00"])
    p = plan(cfg, "x", base=tmp_path)
    assert p.cfg.data.path == "/scratch/pile" and p.cfg.data.tokenizer == "/scratch/pile/tokenizer.model"
    assert p.run_dir == tmp_path / "checkpoints" / "h3-2.7b"  # relative default, made absolute
    opts = _sbatch_options(render(p))
    assert opts["--nodes"] == "16" and opts["--time"] == "02:00:00"


def test_env_references_in_yaml(tmp_path, monkeypatch):
    from h3pretrain.config import ConfigError

    (tmp_path / "a.yaml").write_text('data: {path: "${H3_TEST_DIR}/shards", tokenizer: "${H3_TEST_TOK:-}"}\n')
    monkeypatch.delenv("H3_TEST_DIR", raising=False)
    monkeypatch.delenv("H3_TEST_TOK", raising=False)
    with pytest.raises(ConfigError, match="environment variable H3_TEST_DIR is not set"):
        load_yaml(tmp_path / "a.yaml")
    monkeypatch.setenv("H3_TEST_DIR", "/d")
    cfg = load_yaml(tmp_path / "a.yaml")
    assert (cfg.data.path, cfg.data.tokenizer) == ("/d/shards", "")
    (tmp_path / "b.yaml").write_text("slurm: {time: 12:00:00}\n")  # YAML 1.1: the number 43200
    with pytest.raises(ConfigError, match="quote it"):
        load_yaml(tmp_path / "b.yaml")


def test_training_checks_the_tokenizer(prepared, tmp_path):
    from h3pretrain.config import Config, ConfigError
    from h3pretrain.data import TrainingData
    from h3pretrain.train.loop import _check_data

    data, _ = prepared
    cfg = Config(data=DataConfig(path=str(data), tokenizer=str(data / "tokenizer.model")))
    cfg.model.vocab_size = 1000
    _check_data(cfg, TrainingData([(str(data), 1.0)]))
    other = tmp_path / "other.model"
    other.write_bytes((data / "tokenizer.model").read_bytes() + b"x")
    cfg.data.tokenizer = str(other)
    with pytest.raises(ConfigError, match="is not the tokenizer"):
        _check_data(cfg, TrainingData([(str(data), 1.0)]))
    cfg.data.tokenizer = str(data)  # the data directory holds its tokenizer.model: accepted as a directory
    _check_data(cfg, TrainingData([(str(data), 1.0)]))


def test_plan_refuses_layouts_that_do_not_fit():
    from h3pretrain.config import Config, ConfigError

    cfg = Config(train=TrainConfig(global_batch=512, micro_batch=3))
    with pytest.raises(ConfigError, match="not a multiple of data-parallel size 8 x train.micro_batch 3"):
        plan(cfg, "x")
    cfg = Config(train=TrainConfig(global_batch=64, micro_batch=1))
    cfg.parallel.tp = 3
    with pytest.raises(ConfigError, match="do not split into tp 3"):
        plan(cfg, "x")
    cfg.parallel.tp, cfg.train.resume = 1, "none"
    with pytest.raises(ConfigError, match="train.resume must be 'auto'"):
        plan(cfg, "x")
    cfg.train.resume, cfg.slurm.gpus_per_node = "auto", 0
    with pytest.raises(ConfigError, match="tasks_per_node must be >= 1"):
        plan(cfg, "x")


# ---- the batch shell's policy, with fake srun and scontrol ------------------------------------

FAKE_SRUN = r"""#!/bin/bash
# stands for the training step: FAKE_STATE is written to status.json (unless empty), then FAKE_RC
trap 'echo usr1 >> "$RUN_DIR_FAKE/events"; sleep 0.2; exit 75' USR1
[ -n "$FAKE_STATE" ] && printf '{\n "state": "%s",\n "step": 3\n}\n' "$FAKE_STATE" > "$RUN_DIR_FAKE/status.json"
for i in $(seq 1 ${FAKE_SLEEP_TENTHS:-0}); do sleep 0.1; done
exit "$FAKE_RC"
"""
FAKE_SCONTROL = r"""#!/bin/bash
case "$1" in
  show) echo localhost ;;
  requeue) echo "requeue $2" >> "$RUN_DIR_FAKE/events" ;;
esac
"""


@pytest.fixture
def fake_job(tmp_path):
    """Run the rendered batch script with fake srun/scontrol; returns (exit code, events, log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    (run_dir / "slurm").mkdir(parents=True)
    script = tmp_path / "job.sbatch"

    def write(*overrides):
        cfg = load_yaml(CONFIGS / "125m.yaml", [f"train.run_dir={run_dir}", "slurm.max_restarts=1", *overrides])
        script.write_text(render(plan(cfg, "x")))

    write("slurm.gpus_per_node=0", "slurm.tasks_per_node=8")

    def run(rc, state="", restart=0, send=None, sleep_tenths=0):
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RUN_DIR_FAKE=str(run_dir), FAKE_RC=str(rc),
                   FAKE_STATE=state, FAKE_SLEEP_TENTHS=str(sleep_tenths), SLURM_JOB_ID="77",
                   SLURM_JOB_NODELIST="localhost", SLURM_NTASKS="8", SLURM_RESTART_COUNT=str(restart))
        (run_dir / "events").unlink(missing_ok=True)
        proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        if send:
            time.sleep(0.5)
            proc.send_signal(send)
        out, _ = proc.communicate(timeout=30)
        events = (run_dir / "events").read_text().split("\n")[:-1] if (run_dir / "events").exists() else []
        return proc.returncode, events, out

    run.run_dir, run.write, run.bin_dir = run_dir, write, bin_dir
    return run


def test_policy_gpu_job_refuses_a_torch_without_gpus(fake_job, monkeypatch):
    python = fake_job.bin_dir / "python"
    python.write_text("#!/bin/bash\nexit 1\n")  # torch.cuda.is_available() is False
    python.chmod(0o755)
    monkeypatch.setenv("H3_PYTHON", str(python))
    fake_job.write()  # 8 GPUs per node, as the preset says
    code, events, log = fake_job(0, "finished")
    assert (code, events) == (1, []) and "sees no GPU" in log and "training finished" not in log


def test_policy_finished_run_is_not_requeued(fake_job):
    code, events, log = fake_job(0, "finished")
    assert (code, events) == (0, []) and "training finished (exit 0" in log


def test_policy_abort_after_finished_counts_as_finished(fake_job):
    code, events, log = fake_job(134, "finished")
    assert (code, events) == (0, []) and "training finished (exit 134, trainer state finished)" in log


def test_policy_preempted_run_requeues_every_time(fake_job):
    for restart in range(3):  # preemptions are not bounded by max_restarts (1 here)
        code, events, log = fake_job(75, "preempted", restart=restart)
        assert (code, events) == (75, ["requeue 77"]), log
    assert not (fake_job.run_dir / "slurm" / "failures-77").exists()


def test_policy_usr1_is_forwarded_to_the_step(fake_job):
    code, events, log = fake_job(0, "running", send=signal.SIGUSR1, sleep_tenths=50)
    assert (code, events) == (75, ["usr1", "requeue 77"]), log
    assert "SIGUSR1" in log and "preempted (exit 75, checkpoint saved)" in log


def test_policy_term_never_self_requeues(fake_job):
    code, events, log = fake_job(75, "running", send=signal.SIGTERM, sleep_tenths=10)
    assert (code, events) == (75, []), log
    assert "not requeuing here" in log


def test_policy_failures_are_bounded_and_stale_state_is_ignored(fake_job):
    status = fake_job.run_dir / "status.json"
    status.write_text('{\n "state": "preempted"\n}\n')
    os.utime(status, (time.time() - 3600, time.time() - 3600))  # from an earlier attempt
    code, events, log = fake_job(1)
    assert (code, events) == (1, ["requeue 77"]) and "restart 1 of at most 1" in log
    code, events, log = fake_job(1, restart=1)
    assert (code, events) == (1, []) and "restart bound 1 reached, not requeuing" in log
    assert (fake_job.run_dir / "slurm" / "failures-77").read_text().strip() == "2"


# ---- real jobs on a local SLURM ----------------------------------------------------------------

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("a local SLURM needs root here (daemons run as SlurmUser=root, munged via runuser)")
    try:
        ensure_installed()
    except SlurmUnavailable as err:
        pytest.skip(f"SLURM cannot be installed: {err}")
    # Not under pytest's 0700 temp root: the munge user must reach its socket directory.
    root = Path(tempfile.mkdtemp(prefix="h3-slurm-"))
    os.chmod(root, 0o755)
    # 4 CPUs on a 2-core machine: the reference job and the preempted one run side by side.
    slurm = LocalSlurm(root, cpus=4).start()
    yield slurm
    for job_id in slurm.run("squeue", "-h", "-o", "%i", check=False).stdout.split():
        slurm.run("scancel", job_id, check=False)
    deadline = time.time() + 30
    while time.time() < deadline and slurm.run("squeue", "-h", check=False).stdout.strip():
        time.sleep(0.5)
    slurm.stop()
    shutil.rmtree(root, ignore_errors=True)


def _job_env(cluster) -> dict:
    paths = [str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")]
    return dict(cluster.env, PYTHONPATH=":".join(p for p in paths if p), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                MLFLOW_DISABLE_TELEMETRY="true")


def _write_config(path: Path, data: Path, run_dir: Path, **train) -> Path:
    cfg = {
        "model": {"vocab_size": 1000, "d_model": 32, "n_layer": 3, "attn_layer_idx": [1], "attn_num_heads": 2,
                  "ssm_head_dim": 2, "embed_dropout": 0.1, "attn_dropout": 0.1},
        "data": {"path": str(data)},
        "train": {"run_dir": str(run_dir), "steps": 100, "global_batch": 8, "micro_batch": 4, "lr": 0.01,
                  "warmup_steps": 2, "precision": "fp32", "eval_every": 50, "eval_batches": 2, "ckpt_every": 25,
                  "log_every": 1, **train},
        "slurm": {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 2, "cpus_per_task": 1, "exclusive": False,
                  "time": "15:00", "grace_s": 60, "max_restarts": 1},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(cluster, *args) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "h3pretrain.cli", "slurm", *args], env=_job_env(cluster),
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done


def _submit(cluster, config: Path, run_dir: Path) -> str:
    out = _cli(cluster, "submit", "--config", str(config)).stdout
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    assert f"log          {run_dir}/slurm/job-{job_id}.log" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{run_dir}/mlflow.db" in out
    return job_id


class Watcher:
    """Polls jobs; releases SLURM's ~150 s BeginTime hold on requeued jobs at once; keeps a timeline."""

    # SLURM holds a requeued job ~150 s; releasing it the instant it is requeued raced with the
    # previous attempt's clean-up on the node once (the new attempt failed before its first line).
    RELEASE_AFTER_S = 3.0

    def __init__(self, cluster):
        self.cluster, self.t0, self.timeline, self.seen = cluster, time.time(), [], {}
        self.held_since: dict[str, float] = {}

    def note(self, what: str) -> None:
        self.timeline.append(f"+{time.time() - self.t0:6.1f}s {what}")

    def poll(self, job_id: str) -> dict:
        info = self.cluster.job(job_id)
        state = (info.get("JobState"), info.get("Reason"), info.get("Restarts"))
        if self.seen.get(job_id) != state:
            self.seen[job_id] = state
            self.note(f"job {job_id}: {state[0]} ({state[1]}), restarts {state[2]}")
        if state[0] == "PENDING" and state[1] == "BeginTime":
            since = self.held_since.setdefault(job_id, time.time())
            if time.time() - since >= self.RELEASE_AFTER_S:
                self.cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
                self.note(f"job {job_id}: released the requeue hold")
                del self.held_since[job_id]
        return info

    def wait(self, job_ids: list[str], timeout: float = 420) -> dict[str, dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            infos = {j: self.poll(j) for j in job_ids}
            if all(i.get("JobState") in TERMINAL for i in infos.values()):
                return infos
            time.sleep(0.5)
        raise AssertionError(f"jobs {job_ids} not done after {timeout} s:\n" + "\n".join(self.timeline))


def _train_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


@pytest.mark.slow
def test_preempted_job_saves_requeues_and_resumes_to_the_same_loss(cluster, prepared, tmp_path):
    data, _ = prepared
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "preempted"
    watch = Watcher(cluster)
    ref = _submit(cluster, _write_config(tmp_path / "ref.yaml", data, ref_dir), ref_dir)
    job = _submit(cluster, _write_config(tmp_path / "run.yaml", data, run_dir), run_dir)
    watch.note(f"submitted reference {ref} and job {job}")

    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count('"train"') >= 5):
        watch.poll(ref), watch.poll(job)
        assert time.time() < deadline, "\n".join(watch.timeline)
        time.sleep(0.1)
    watch.note(f"job {job}: step {len(_train_losses(run_dir))} logged -> scancel --batch --signal=USR1")
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    infos = watch.wait([ref, job])
    print("\n".join(watch.timeline))

    log = (run_dir / "slurm" / f"job-{job}.log").read_text()
    saved = re.search(r"stop requested[^(]*\(SIGUSR1\): saving step (\d+) and exiting with 75", log)
    assert saved, log[-3000:]
    step = int(saved.group(1))
    assert 5 <= step < 100
    reason = "periodic" if step % 25 == 0 else "signal SIGUSR1"
    assert f"saved checkpoint {run_dir}/checkpoints/step-{step:08d} ({reason})" in log
    assert f"preempted (exit 75, checkpoint saved): requeuing job {job}; it resumes from step-{step:08d}" in log
    assert f"resumed from {run_dir}/checkpoints/step-{step:08d} at step {step}" in log
    assert log.count(f"job {job} start ") == 2  # one log file across the requeue (--open-mode=append)

    for job_id, restarts in ((job, "1"), (ref, "0")):  # the finished reference was never requeued
        info = infos[job_id]
        assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", restarts, "0:0"), info
    ref_losses, losses = _train_losses(ref_dir), _train_losses(run_dir)
    assert sorted(losses) == sorted(ref_losses) == list(range(1, 101))
    assert losses[100] == ref_losses[100]  # the final loss, bit for bit
    assert losses == ref_losses  # and every step before it
    print(f"final loss: reference {ref_losses[100]!r}, preempted+resumed {losses[100]!r}")

    st = json.loads(_cli(cluster, "status", str(run_dir), "--json").stdout)
    assert st["job"]["id"] == job and st["job"]["state"] == "COMPLETED" and st["job"]["restarts"] == "1"
    assert (st["last_step"], st["last_loss"]) == (100, losses[100])
    assert st["trainer"]["state"] == "finished" and st["trainer"]["step"] == 100
    assert st["latest_checkpoint"] == str(run_dir / "checkpoints" / "step-00000100")
    text = _cli(cluster, "status", str(run_dir)).stdout
    assert f"job       {job}: COMPLETED, restarts 1, failures 0" in text and "last step 100, loss" in text


@pytest.mark.slow
def test_crashing_job_stops_after_the_restart_bound(cluster, prepared, tmp_path):
    data, _ = prepared
    # a refused input (exit 2) is not retried: it would fail the same way every time
    refused_dir = tmp_path / "refused"
    config = _write_config(tmp_path / "refused.yaml", data, refused_dir)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["eval_split"] = "test"  # the trainer refuses it at start-up (submit does not read the splits)
    config.write_text(yaml.safe_dump(cfg))
    watch = Watcher(cluster)
    job = _submit(cluster, config, refused_dir)
    info = watch.wait([job])[job]
    log = (refused_dir / "slurm" / f"job-{job}.log").read_text()
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("FAILED", "0", "2:0"), (info, log[-3000:])
    assert "data.eval_split 'test' is not a split of" in log and "training refused its input" in log
    # a crash (here the trainer's interpreter dies with exit 3 on every attempt) is retried up to the bound
    crash = tmp_path / "crashing-python"
    crash.write_text("#!/bin/sh\necho 'simulated crash' >&2\nexit 3\n")
    crash.chmod(0o755)
    run_dir = tmp_path / "crash"
    config = _write_config(tmp_path / "crash.yaml", data, run_dir)
    cfg = yaml.safe_load(config.read_text())
    cfg["slurm"]["setup"] = [f"PYTHON={crash}"]
    config.write_text(yaml.safe_dump(cfg))
    watch = Watcher(cluster)
    job = _submit(cluster, config, run_dir)
    info = watch.wait([job])[job]
    print("\n".join(watch.timeline))
    log = (run_dir / "slurm" / f"job-{job}.log").read_text()
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("FAILED", "1", "3:0"), (info, log[-3000:])
    assert log.count(f"job {job} start ") == 2
    assert "simulated crash" in log
    assert "training failed (exit 3): restart 1 of at most 1: requeuing" in log
    assert "training failed (exit 3), failure 2 of this job: restart bound 1 reached, not requeuing" in log
    assert (run_dir / "slurm" / f"failures-{job}").read_text().strip() == "2"
    # a second submission for a run dir with a job still known is refused only while it is active
    resumed = _cli(cluster, "resume", str(run_dir), "--set", "train.optimizer=torch").stdout
    new_job = re.search(r"submitted job (\d+)", resumed).group(1)
    refused = subprocess.run([sys.executable, "-m", "h3pretrain.cli", "slurm", "resume", str(run_dir)],
                             env=_job_env(cluster), capture_output=True, text=True, cwd=REPO)
    cluster.run("scancel", new_job)
    assert refused.returncode == 2 and f"job {new_job} (" in refused.stderr and "already working on" in refused.stderr
