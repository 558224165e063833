"""Training engine on CPU: ZeRO 1/2/3 vs one rank, exact resume after SIGKILL (also mid-checkpoint
and from a corrupted latest checkpoint), preemption signals, mlflow, weight-decay groups."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_config
from h3pretrain.model import HybridLM
from h3pretrain.train.optim import deepspeed_config, param_groups
from h3pretrain.config import TrainConfig

pytestmark = pytest.mark.slow


def _args(data, run_dir, **train):
    sets = {
        "model.vocab_size": 1000, "model.d_model": 32, "model.n_layer": 3, "model.attn_layer_idx": "[1]",
        "model.attn_num_heads": 2, "model.ssm_head_dim": 2,
        "data.path": str(data), "train.run_dir": str(run_dir), "train.steps": 8, "train.global_batch": 8,
        "train.micro_batch": 4, "train.lr": 0.01, "train.warmup_steps": 2, "train.precision": "fp32",
        "train.eval_every": 4, "train.eval_batches": 2, "train.ckpt_every": 2, "train.log_every": 1,
    }
    sets.update({k if "." in k else f"train.{k}": v for k, v in train.items()})
    out = []
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    return env


def launch(data, run_dir, nproc=1, env=None, python_code=None, **train):
    """env: extra environment; python_code: run `python -c python_code train ...` instead of the CLI
    module (a patch applied before h3pretrain.cli.main runs)."""
    if python_code is not None:
        cmd = [sys.executable, "-c", python_code, "train"]
    elif nproc == 1:
        cmd = [sys.executable, "-m", "h3pretrain.cli", "train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "h3pretrain.cli", "train"]
    log = open(Path(str(run_dir) + ".log"), "ab")
    return subprocess.Popen(cmd + _args(data, run_dir, **train), env={**_env(), **(env or {})}, stdout=log,
                            stderr=log, start_new_session=True)


def run(data, run_dir, nproc=1, env=None, python_code=None, **train) -> int:
    proc = launch(data, run_dir, nproc, env=env, python_code=python_code, **train)
    code = proc.wait(timeout=600)
    if code not in (0, 75):
        print(Path(str(run_dir) + ".log").read_text()[-5000:])
    return code


def losses(run_dir, kind="train") -> dict[int, float]:
    """Last logged value per step (a resumed run logs the steps after its checkpoint again)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == kind:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    """One rank, dropout on (so RNG state matters for resume), 8 steps."""
    data, _ = prepared
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    assert run(data, run_dir, **{"model.embed_dropout": 0.1, "model.attn_dropout": 0.1}) == 0
    return data, run_dir


def test_loss_falls_and_outputs_exist(reference):
    _, run_dir = reference
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 9))
    assert sum(curve[s] for s in (6, 7, 8)) / 3 < curve[1] - 0.25  # batches differ: average the end
    evals = losses(run_dir, "eval")
    assert sorted(evals) == [4, 8] and evals[8] < evals[4]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 8
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000008"
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept == ["step-00000004", "step-00000006", "step-00000008"]  # keep_last 3
    log = Path(str(run_dir) + ".log").read_text()
    for noise in ("Transformer Engine and Apex are not installed",
                  "Attempting to get learning rate from scheduler before it has started"):
        assert noise not in log
    assert "FlashConv: reference (H3_FLASHCONV=auto; Triton cannot run on cpu)" in log
    assert status["flashconv"] == "reference" and status["compiled"] is False


def test_mlflow_holds_params_and_history(reference):
    from mlflow.tracking import MlflowClient

    _, run_dir = reference
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    mrun = client.get_run(run_id)
    assert mrun.data.params["model.d_model"] == "32" and mrun.data.params["train.zero_stage"] == "1"
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(1, 9))
    assert [m.value for m in history] == [losses(run_dir)[s] for s in range(1, 9)]
    for key in ("lr", "grad_norm", "tokens_per_s", "memory_gb", "eval/loss", "eval/perplexity"):
        assert client.get_metric_history(run_id, key), key
    assert mrun.info.status == "FINISHED"


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


def test_exact_resume_after_sigkill_and_corrupt_latest(reference, tmp_path):
    data, ref_dir = reference
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    extra = {"model.embed_dropout": 0.1, "model.attn_dropout": 0.1}
    steps_logged = lambda: len(losses(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0  # noqa: E731
    # 1: kill after step 3 is logged; 2: kill while a checkpoint is being written; 3: after step 7
    kill_points = [lambda: steps_logged() >= 3,
                   lambda: any(p.name.endswith(".tmp") and p.is_dir() for p in ckpts.glob("step-*")),
                   lambda: max(losses(run_dir), default=0) >= 7]
    for i, point in enumerate(kill_points):
        proc = launch(data, run_dir, **extra)
        hit = _wait_for(lambda: (run_dir / "metrics.jsonl").exists() and point(), proc)
        assert hit, f"run ended before kill point {i}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # a torn write leaves a .tmp directory behind; now also corrupt the newest complete checkpoint
    latest = ckpts / (ckpts / "latest").read_text().strip()
    victim = latest / "state" / "__0_0.distcp"
    victim.write_bytes(victim.read_bytes()[:-100])
    assert run(data, run_dir, **extra) == 0
    log = Path(str(run_dir) + ".log").read_text()
    assert f"skipping checkpoint {latest}" in log
    assert losses(run_dir) == losses(ref_dir)  # bitwise: the JSON floats are the exact fp32->fp64 values
    # the resumed runs continued one mlflow run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "h3pretrain"]
    (mrun,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(mrun.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 9)) and mrun.info.status == "FINISHED"  # each step once
    assert [m.value for m in history] == [losses(ref_dir)[s] for s in range(1, 9)]
    # metrics.jsonl too holds each step once; what the killed continuations logged is kept aside
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 8]
    assert (run_dir / "metrics.superseded.jsonl").read_text().count('"kind": "train"') >= 1


def test_stop_request_ends_a_wait_for_data():
    import threading

    from h3pretrain.train.loop import Prefetcher, Stopped
    from h3pretrain.train.signals import StopRequest

    class SlowLoader:  # a shard on a file system that hangs
        global_batch = 1

        def batch_at(self, position):
            threading.Event().wait(600)

    stop = StopRequest()
    prefetch = Prefetcher(SlowLoader(), 0, stop)
    threading.Timer(0.3, lambda: setattr(stop, "signal_name", "SIGUSR1")).start()
    t0 = time.time()
    with pytest.raises(Stopped, match="waiting for data"):
        prefetch.get()
    assert time.time() - t0 < 60  # stopped, not the loader's 600 s wait
    prefetch.close()


def test_flop_model():
    from h3pretrain.config import preset
    from h3pretrain.model.flops import train_flops_per_token

    cfg = preset("125m")
    cfg.mixer = "attention"
    D, L, V = 768, 2048, 50264
    matmul_weights = 12 * (4 * D * D + 8 * D * D) + V * D
    assert train_flops_per_token(cfg, L) == 3 * (2 * matmul_weights + 12 * 4 * L * D)
    hybrid = train_flops_per_token(preset("125m"), L)
    conv = 11 * 3 * (5 * 4096 * 12 + 6 * 4096) / L * 2 * D  # 11 H3 layers, two convs of D channels
    assert hybrid == pytest.approx(3 * (2 * matmul_weights + 4 * L * D) + conv)


NO_DROPOUT = {"model.embed_dropout": 0.0, "model.attn_dropout": 0.0}  # masks would differ by layout


@pytest.fixture(scope="module")
def one_rank_curve(prepared, tmp_path_factory):
    data, _ = prepared
    one = tmp_path_factory.mktemp("one") / "run"
    assert run(data, one, steps=4, eval_every=0, ckpt_every=0, **NO_DROPOUT) == 0
    return losses(one)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_with_two_ranks_follow_one_rank(prepared, one_rank_curve, tmp_path, stage):
    data, _ = prepared
    two = tmp_path / "two"
    assert run(data, two, nproc=2, steps=4, eval_every=0, ckpt_every=0, zero_stage=stage, **NO_DROPOUT) == 0
    a, b = one_rank_curve, losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), (stage, s)
    assert a[4] < a[1]


def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(x) for x in out]


def test_signal_saves_and_exits_with_documented_code(prepared, tmp_path):
    data, _ = prepared
    run_dir = tmp_path / "run"
    proc = launch(data, run_dir, nproc=2, steps=200, ckpt_every=0, eval_every=0)
    assert _wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 2, proc)
    workers = _children(proc.pid)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGUSR1)
    proc.wait(timeout=120)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["signal"] == "SIGUSR1"
    step = status["step"]
    assert 2 <= step < 200
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{step:08d}"
    log = Path(str(run_dir) + ".log").read_text()
    assert "exitcode  : 75" in log or "exit code 75" in log or "exitcode: 75" in log.replace("  ", " ")


def test_two_rank_resume_with_dropout_is_exact(prepared, tmp_path):
    """Each rank restores its own RNG stream (dropout masks), so a stopped two-rank run continues
    bit for bit like an uninterrupted one."""
    data, _ = prepared
    extra = dict(steps=6, eval_every=0, ckpt_every=0, **{"model.embed_dropout": 0.1, "model.attn_dropout": 0.1})
    ref = tmp_path / "ref"
    assert run(data, ref, nproc=2, **extra) == 0
    run_dir = tmp_path / "run"
    proc = launch(data, run_dir, nproc=2, **extra)
    assert _wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 2, proc)
    for pid in _children(proc.pid):
        os.kill(pid, signal.SIGUSR1)
    proc.wait(timeout=120)
    stopped_at = json.loads((run_dir / "status.json").read_text())["step"]
    assert stopped_at < 6, "the run finished before the signal"
    assert run(data, run_dir, nproc=2, **extra) == 0
    assert losses(run_dir) == losses(ref)


def test_signal_during_evaluation(prepared, tmp_path):
    """One process, evaluation of 100000 batches after step 1: SIGTERM must end it within seconds."""
    data, _ = prepared
    run_dir = tmp_path / "run"
    proc = launch(data, run_dir, steps=50, eval_every=1, eval_batches=100000, ckpt_every=0)
    assert _wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 1, proc)
    time.sleep(1.0)  # well inside the evaluation
    t0 = time.time()
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 75
    assert time.time() - t0 < 30
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["step"] == 1 and status["signal"] == "SIGTERM"
    assert (run_dir / "checkpoints" / "step-00000001" / "manifest.json").is_file()
    # the cut evaluation is redone on resume, and recorded once
    assert run(data, run_dir, steps=2, eval_every=1, eval_batches=2, ckpt_every=0) == 0
    evals = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert evals == [1, 2]


def test_a_signal_during_start_up_exits_75_with_status_preempted(prepared, tmp_path):
    """SIGTERM while the interpreter still imports torch, and again while the model is being built:
    both end with 75 and status.json `preempted` (a previous run's status is never left behind)."""
    data, _ = prepared
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "status.json").write_text('{"state": "finished", "step": 99}\n')
    proc = launch(data, run_dir)
    time.sleep(0.6)  # python is up (the handler is installed first thing), torch is still being imported
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["signal"] == "SIGTERM" and status["step"] is None
    proc = launch(data, run_dir)
    status_file = run_dir / "status.json"
    assert _wait_for(lambda: '"starting"' in status_file.read_text(), proc)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    assert json.loads(status_file.read_text())["state"] == "preempted"
    assert not (run_dir / "checkpoints").exists()


def test_resume_refuses_data_prepared_differently(prepared, corpus, tmp_path):
    """Same tokenizer, another seq_len: a resume names what differs; allow_data_change overrides."""
    from data_prep.prep import PrepSettings, prepare

    data, _ = prepared
    other = tmp_path / "other"
    prepare(PrepSettings(inputs=[str(corpus)], out=str(other), seq_len=32, tokenizer=str(Path(data) / "tokenizer.model"),
                         val_fraction=0.05, samples_per_shard=16, workers=1), progress=False)
    run_dir = tmp_path / "run"
    assert run(data, run_dir, steps=2, eval_every=0) == 0
    done = _cli_train(other, run_dir, steps=4, eval_every=0)
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("h3pretrain train: error: data.path") and "seq_len 64 -> 32" in line
    assert "Traceback" not in done.stderr and sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == \
        ["step-00000002"]
    assert run(other, run_dir, steps=4, eval_every=0, allow_data_change="true") == 0
    assert max(losses(run_dir)) == 4


def test_weight_decay_groups():
    model = HybridLM(tiny_config(ssm_head_dim=2))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = sorted(names[id(p)].split("mixer.", 1)[1] for p in no_decay["params"] if "layers.0." in names[id(p)])
    assert nd == ["diag_kernel.A_imag", "diag_kernel.B", "diag_kernel.inv_A_real", "diag_kernel.log_dt",
                  "shift_kernel.B"]
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    d = {names[id(p)] for p in decay["params"]}
    assert "backbone.layers.0.mixer.diag_kernel.C" in d and "backbone.layers.0.mixer.D" in d
    assert "backbone.layers.0.mixer.ssm_k_D" in d and "backbone.layers.0.mixer.shift_kernel.C" in d
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_deepspeed_config_from_ours(tmp_path):
    (tmp_path / "extra.json").write_text('{"zero_optimization": {"reduce_bucket_size": 1000}}')
    cfg = TrainConfig(global_batch=32, micro_batch=4, zero_stage=2, steps=100, warmup_steps=5, min_lr_ratio=0.1,
                      deepspeed={"zero_optimization": {"overlap_comm": True}},
                      deepspeed_json=str(tmp_path / "extra.json"))
    ds = deepspeed_config(cfg, dp_size=2)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 32
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 1000}
    assert ds["scheduler"]["params"]["cos_min_ratio"] == 0.1
    with pytest.raises(ValueError, match="global_batch 30"):
        deepspeed_config(TrainConfig(global_batch=30, micro_batch=4), dp_size=2)


def test_context_parallel_run_follows_one_rank_and_resumes_exactly(prepared, one_rank_curve, tmp_path):
    """parallel.cp = 2 through the whole loop (loader, evaluation, checkpoints): the losses of the
    one-rank run, and a restart from its step-2 checkpoint continues bit for bit."""
    data, _ = prepared
    cp = dict(steps=4, eval_every=2, ckpt_every=2, **NO_DROPOUT, **{"parallel.cp": 2})
    first = tmp_path / "cp2"
    assert run(data, first, nproc=2, **cp) == 0
    a, b = one_rank_curve, losses(first)
    assert sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), s
    state = json.loads((first / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["layout"]["cp"] == 2
    again = tmp_path / "again"
    assert run(data, again, nproc=2, resume=first / "checkpoints" / "step-00000002", **cp) == 0
    assert {s: v for s, v in losses(again).items() if s > 2} == {s: b[s] for s in (3, 4)}


COMPILE_RUN = {"steps": 10, "model.embed_dropout": 0.1, "model.attn_dropout": 0.1}


def test_compiled_run_follows_eager_and_resumes_exactly(prepared, tmp_path):
    """train.compile=true with selective recompute: the first 10 losses equal eager's to 1e-5
    (relative); killed after step 4 and resumed, it repeats the uninterrupted compiled run bit for bit."""
    data, _ = prepared
    eager, compiled, killed = tmp_path / "eager", tmp_path / "compiled", tmp_path / "killed"
    assert run(data, eager, **COMPILE_RUN) == 0
    assert run(data, compiled, compile="true", recompute="selective", **COMPILE_RUN) == 0
    want, got = losses(eager), losses(compiled)
    assert sorted(got) == sorted(want) == list(range(1, 11))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])
    assert got != want  # compiled code really ran (its rounding differs somewhere)
    log = Path(str(compiled) + ".log").read_text()
    assert "torch.compile: on | recompute: selective" in log
    assert json.loads((compiled / "status.json").read_text())["compiled"] is True
    proc = launch(data, killed, compile="true", recompute="selective", **COMPILE_RUN)
    assert _wait_for(lambda: (killed / "metrics.jsonl").exists() and max(losses(killed), default=0) >= 4, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert run(data, killed, compile="true", recompute="selective", **COMPILE_RUN) == 0
    assert losses(killed) == got


# Counts the fused scan's calls (in $SCAN_CALLS: the CLI ends with os._exit, no atexit) and scales
# its output by $SCAN_SCALE.
WATCH_THE_SCAN = ("import os, sys, flashconv.ssm_scan as s; real = s.h3_ssm_scan; n = []; "
                  "s.h3_ssm_scan = lambda *a, **k: (n.append(1), open(os.environ['SCAN_CALLS'], 'w').write(str(len(n))), "
                  "real(*a, **k) * float(os.environ['SCAN_SCALE']))[2]; "
                  "from h3pretrain.cli import main; sys.exit(main(sys.argv[1:]))")


def test_flashconv_auto_checks_the_kernels_and_falls_back(prepared, tmp_path):
    """H3_FLASHCONV=auto with Triton available (the interpreter): the self-check passes and the run
    uses the kernels; with a broken kernel one warning names what failed and the run trains with
    the reference, exactly as a reference run does."""
    data, _ = prepared
    calls = tmp_path / "calls"
    interpret = {"TRITON_INTERPRET": "1", "H3_FLASHCONV": "auto", "SCAN_CALLS": str(calls)}
    short = {"steps": 3, "eval_every": 0, "ckpt_every": 0}
    good, broken, reference = tmp_path / "good", tmp_path / "broken", tmp_path / "reference"
    assert run(data, good, env={**interpret, "SCAN_SCALE": "1"}, python_code=WATCH_THE_SCAN, **short) == 0
    assert json.loads((good / "status.json").read_text())["flashconv"] == "triton"
    assert "FlashConv: triton (H3_FLASHCONV=auto, self-check passed" in Path(str(good) + ".log").read_text()
    assert int(calls.read_text()) == 1 + 3 * 2 * 2  # the check, then 3 steps x 2 micro-batches x 2 H3 layers
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{good / 'mlflow.db'}")
    params = client.get_run((good / "mlflow_run_id").read_text().strip()).data.params
    assert params["flashconv.implementation"] == "triton"

    assert run(data, broken, env={**interpret, "SCAN_SCALE": "1.1"}, python_code=WATCH_THE_SCAN, **short) == 0
    log = Path(str(broken) + ".log").read_text()
    warnings = [line for line in log.splitlines() if "FlashConv self-check failed" in line]
    assert len(warnings) == 1 and "out off by" in warnings[0] and "uses the reference convolution" in warnings[0]
    assert json.loads((broken / "status.json").read_text())["flashconv"] == "reference"
    assert int(calls.read_text()) == 1  # only the check ran the kernel
    assert run(data, reference, env={"H3_FLASHCONV": "reference"}, **short) == 0
    assert losses(broken) == losses(reference)


def _cli_train(data, run_dir, **train) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "h3pretrain.cli", "train", *_args(data, run_dir, **train)],
                          env=_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("bad, message", [
    ({"steps": -5}, "train.steps must be >= 1, not -5"),
    ({"micro_batch": 0}, "train.micro_batch must be >= 1, not 0"),
    ({"eval_batches": 0}, "train.eval_batches must be >= 1 when train.eval_every > 0, not 0"),
    ({"data.eval_split": "test"}, "data.eval_split 'test' is not a split of"),
    ({"resume": "/nope"}, "train.resume=/nope: no such checkpoint directory"),
])
def test_bad_training_settings_fail_in_one_line_before_anything_is_written(prepared, tmp_path, bad, message):
    data, _ = prepared
    run_dir = tmp_path / "run"
    done = _cli_train(data, run_dir, **bad)
    assert done.returncode == 2, done.stderr[-3000:]
    assert message in done.stderr and "Traceback" not in done.stderr + done.stdout
    assert done.stderr.strip().splitlines()[-1].startswith("h3pretrain train: error: ")
    assert not run_dir.exists()


def test_a_rejected_config_does_not_replace_the_runs_config(prepared, tmp_path):
    data, _ = prepared
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("the config the run was started with\n")
    done = _cli_train(data, run_dir, global_batch=6, micro_batch=4)  # 6 does not split into micro-batches of 4
    assert done.returncode == 2 and "train.global_batch 6 must split" in done.stderr, done.stderr[-3000:]
    assert (run_dir / "config.yaml").read_text() == "the config the run was started with\n"


SLOW_WRITES = """
import sys, time
from h3pretrain.checkpoint import canonical, sharded
def slowed(write):
    def slow_write(*args, **kwargs):
        if any("step-00000004" in str(a) for a in args):
            time.sleep(30)  # the background write of step 4 outlasts the rest of the run
        return write(*args, **kwargs)
    return slow_write
sharded.write = slowed(sharded.write)
canonical.write_stage = slowed(canonical.write_stage)
from h3pretrain.cli import main
sys.exit(main())
"""


def test_training_goes_on_during_a_background_write_and_a_kill_there_keeps_the_previous_checkpoint(
        reference, tmp_path):
    """The checkpoint of step 4 is written in the background (slowed here): training reaches step 6
    while step-00000004.tmp is still being written, so it was not blocked; SIGKILL then leaves
    step 2 as the checkpoint in use, and the resumed run ends bit-identical to the reference."""
    data, ref_dir = reference
    run_dir = tmp_path / "run"
    extra = {"model.embed_dropout": 0.1, "model.attn_dropout": 0.1}
    proc = launch(data, run_dir, python_code=SLOW_WRITES, **extra)
    ckpts = run_dir / "checkpoints"
    assert _wait_for(lambda: (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= 6, proc)
    assert (ckpts / "step-00000004.tmp").is_dir() and not (ckpts / "step-00000004").exists()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ckpts / "latest").read_text().strip() == "step-00000002"
    assert run(data, run_dir, **extra) == 0
    assert f"resumed from {ckpts / 'step-00000002'} at step 2" in Path(str(run_dir) + ".log").read_text()
    assert losses(run_dir) == losses(ref_dir)


@pytest.fixture(scope="module")
def mixture(prepared, corpus, tmp_path_factory):
    """Two sources, 3 : 1: the whole corpus, and one of its files (the same tokenizer), as a
    `--set data.sources=...` value; and a one-rank reference run of 8 steps on them."""
    from conftest import prep_settings
    from data_prep.prep import prepare

    a, _ = prepared
    b = tmp_path_factory.mktemp("mix-b")
    files = sorted(str(p) for p in corpus.glob("*.jsonl.zst"))
    prepare(prep_settings(corpus, b, inputs=files[:1], tokenizer=str(a / "tokenizer.model")), progress=False)
    sources = f"[{{path: {a}, weight: 3, name: all}}, {{path: {b}, weight: 1, name: one}}]"
    ref = tmp_path_factory.mktemp("mix-ref") / "run"
    assert run(a, ref, **NO_DROPOUT, **{"data.sources": sources}) == 0
    return a, sources, ref


def test_mixture_logs_tokens_and_eval_loss_per_source(mixture):
    _, _, ref = mixture
    records = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    # 8 steps x 8 sequences x 64 tokens, 3 : 1
    assert train[8]["tokens/all"] == 48 * 64 and train[8]["tokens/one"] == 16 * 64
    assert train[8]["tokens/all"] + train[8]["tokens/one"] == train[8]["tokens"]
    evals = {r["step"]: r for r in records if r["kind"] == "eval"}
    assert sorted(evals) == [4, 8]
    assert evals[8]["loss"] == pytest.approx(0.75 * evals[8]["loss/all"] + 0.25 * evals[8]["loss/one"], rel=1e-12)
    assert "eval step 8 | loss" in Path(str(ref) + ".log").read_text() and "| one " in Path(str(ref) + ".log").read_text()


def test_mixture_resumes_bitwise_after_sigkill_and_under_another_data_parallel_size(mixture, tmp_path):
    data, sources, ref = mixture
    extra = {**NO_DROPOUT, "data.sources": sources}
    # SIGKILL once the checkpoint of step 4 is complete, then resume: the same losses, bit for bit
    killed = tmp_path / "killed"
    proc = launch(data, killed, **extra)
    assert _wait_for(lambda: (killed / "checkpoints" / "step-00000004" / "manifest.json").exists(), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert run(data, killed, **extra) == 0
    assert losses(killed) == losses(ref)
    # two data-parallel ranks to the checkpoint of step 4 (killed there), then one: the same samples
    # in the same batches (the losses follow the one-rank run to fp32 reduction-order noise)
    two = tmp_path / "two"
    proc = launch(data, two, nproc=2, **extra)
    assert _wait_for(lambda: (two / "checkpoints" / "step-00000004" / "manifest.json").exists(), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert run(data, two, **extra) == 0
    assert "resumed from" in Path(str(two) + ".log").read_text()
    a, b = losses(ref), losses(two)
    assert sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    # other weights: refused as a change of data
    changed = run(data, two, **{**extra, "data.sources": sources.replace("weight: 1,", "weight: 2,"), "steps": 9})
    assert changed == 2 and "weights" in Path(str(two) + ".log").read_text()


FAILING_COMPILE = """
import sys
import torch._inductor.compile_fx as compile_fx
from h3pretrain.model import regional
def broken(*args, **kwargs):
    raise RuntimeError("planted inductor failure")
compile_fx.compile_fx = broken
regional.compile_wanted = lambda setting, device: setting == "auto" or bool(setting)  # auto: on, as on CUDA
from h3pretrain.cli import main
sys.exit(main())
"""


def test_auto_compile_that_fails_trains_eager_and_says_so(reference, tmp_path):
    """train.compile=auto whose compile fails (a planted inductor error): one warning, the run trains
    eager with the losses of the eager reference bit for bit, and the start log, status.json and
    mlflow say compiled false with the reason."""
    from mlflow.tracking import MlflowClient

    data, ref_dir = reference
    run_dir = tmp_path / "run"
    extra = {"model.embed_dropout": 0.1, "model.attn_dropout": 0.1}
    assert run(data, run_dir, python_code=FAILING_COMPILE, **extra) == 0
    log = Path(str(run_dir) + ".log").read_text()
    assert log.count("torch.compile failed (BackendCompilerFailed (RuntimeError: planted inductor failure))") == 1
    assert "torch.compile: off (failed, running eager: BackendCompilerFailed" in log
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["compiled"] is False
    assert "planted inductor failure" in status["compile_failure"]
    params = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}").get_run(
        (run_dir / "mlflow_run_id").read_text().strip()).data.params
    assert params["train.compiled"] == "False" and "planted inductor failure" in params["train.compile_failure"]
    assert losses(run_dir) == losses(ref_dir)  # (train.compile=true raising instead: tests/model/test_regional.py)


HOST_READS = """
import json, sys, torch
from h3pretrain.config import Config, TrainConfig
from conftest import tiny_config
from h3pretrain.train.engine import TrainingEngine
from h3pretrain.train.loop import init_distributed
import h3pretrain.train.engine as engine_module

reads, reduces = [], []
def counted(name):
    real = getattr(torch.Tensor, name)
    def read(self, *args, **kwargs):
        if "/h3pretrain/" in sys._getframe(1).f_code.co_filename:
            reads.append(name)
        return real(self, *args, **kwargs)
    setattr(torch.Tensor, name, read)
for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
    counted(name)
real_all_reduce = engine_module.dist.all_reduce
def all_reduce(*args, **kwargs):
    if "/h3pretrain/" in sys._getframe(1).f_code.co_filename:  # not DeepSpeed's gradient reductions
        reduces.append(1)
    return real_all_reduce(*args, **kwargs)
engine_module.dist.all_reduce = all_reduce

rank, world, device = init_distributed()
cfg = Config(model=tiny_config(), train=TrainConfig(global_batch=8, micro_batch=2, precision="fp32", steps=4, compile=False))
engine = TrainingEngine(cfg, device, 32)
batches = torch.randint(0, 97, (3, 8, 33), generator=torch.Generator().manual_seed(0))
from h3pretrain.model import HybridLM
fresh = HybridLM(cfg.model, init_seed=cfg.train.seed)
with torch.no_grad():
    first = fresh.loss(fresh(batches[0][:, :-1]), batches[0][:, 1:]).item()
out = [{"first_loss": first}]
for i, flag in enumerate((0.0, 1.0, 0.0)):
    reads.clear(); reduces.clear()
    result = engine.train_step(batches[i], flags=(flag, 2.5))
    out.append({"loss": result.loss, "flags": list(result.flags), "reads": list(reads), "reduces": len(reduces)})
print(json.dumps(out))
"""


def test_a_step_reads_the_device_once_and_carries_the_flags():
    """4 micro-batches per step: one all-reduce and one host read (not one per micro-batch plus one
    for the stop flag); the flags come back summed over the ranks (one rank here)."""
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", HOST_READS], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    first, *steps = json.loads(done.stdout.strip().splitlines()[-1])
    assert [s["flags"] for s in steps] == [[0.0, 2.5], [1.0, 2.5], [0.0, 2.5]]
    assert all(s["reads"] == ["tolist"] and s["reduces"] == 1 for s in steps), steps
    # the step's loss is the mean over its 4 micro-batches: the whole batch's loss before the update
    assert steps[0]["loss"] == pytest.approx(first["first_loss"], rel=1e-6)


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_every_json_file_of_a_run_whose_loss_went_non_finite_is_strict_json(prepared, tmp_path):
    """An absurd learning rate drives the loss to NaN/inf: status.json, metrics.jsonl, the manifests
    and trainer states hold null for the non-finite numbers, never the bare NaN / Infinity tokens."""
    data, _ = prepared
    run_dir = tmp_path / "run"
    run(data, run_dir, lr=1e8, warmup_steps=1, steps=6, eval_every=0, ckpt_every=3, grad_clip=0.0)
    records = [_strict(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses_seen = [r["loss"] for r in records if r["kind"] == "train"]
    assert None in losses_seen  # the non-finite ones
    files = [run_dir / "status.json", *run_dir.rglob("manifest.json"), *run_dir.rglob("trainer_state.json")]
    assert len(files) >= 3
    for path in files:
        _strict(path.read_text())
    from h3pretrain import jsonio

    assert jsonio.dumps({"a": [float("nan"), float("inf"), -float("inf"), 1.5]}) == '{"a": [null, null, null, 1.5]}'


def _lock(run_dir: Path, **holder):
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"host": "elsewhere", "pid": 1, "pid_start": None, "slurm_job_id": None, "started": "2026-12-01T00:00:00"}
    (run_dir / "trainer.lock").write_text(json.dumps({**record, **holder}))


def test_one_trainer_per_run_directory(reference, tmp_path):
    """A second trainer on a run directory in use refuses (exit 2, one line naming the holder) and the
    first finishes untouched; the lock goes with the run; a lock held on another host with no SLURM
    job to ask about is refused, and nothing is written (the takeovers: tests/train/test_lock.py)."""
    import socket

    data, ref_dir = reference
    extra = {"model.embed_dropout": 0.1, "model.attn_dropout": 0.1}
    run_dir = tmp_path / "run"
    first = launch(data, run_dir, **extra)
    assert _wait_for(lambda: (run_dir / "status.json").exists()
                     and json.loads((run_dir / "status.json").read_text())["state"] in ("starting", "running"), first)
    holder = json.loads((run_dir / "trainer.lock").read_text())
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    second = _cli_train(data, run_dir, **extra)
    assert second.returncode == 2, second.stderr[-3000:]
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith(f"h3pretrain train: error: train.run_dir {run_dir} is in use by host {socket.gethostname()} "
                           f"pid {first.pid} since ") and "Traceback" not in second.stderr
    assert first.wait(timeout=600) == 0
    assert losses(run_dir) == losses(ref_dir) and not (run_dir / "trainer.lock").exists()

    held = tmp_path / "held"
    _lock(held)  # on another host, no SLURM job to ask about: cannot be known to be gone
    refused = _cli_train(data, held, steps=2)
    assert refused.returncode == 2 and "is in use by host elsewhere pid 1 since 2026-12-01T00:00:00" in refused.stderr
    assert sorted(p.name for p in held.iterdir()) == ["trainer.lock"]  # nothing else written


INF_LOSS = """
import os, sys, torch
from h3pretrain.model import HybridLM
steps = {int(s) for s in os.environ["H3_TEST_INF_STEPS"].split(",")}
first = int(os.environ.get("H3_TEST_INF_FROM", "0"))
loss, calls = HybridLM.loss, [0]
def planted(self, logits, targets):
    out = loss(self, logits, targets)
    if torch.is_grad_enabled():  # training micro-batches only (2 per step here)
        calls[0] += 1
        step = (calls[0] - 1) // 2 + 1 + first
        if step in steps:
            out = out * float("inf")
    return out
HybridLM.loss = planted
from h3pretrain.cli import main
sys.exit(main())
"""


def test_a_non_finite_step_applies_no_update_and_resumes_exactly(reference, tmp_path):
    """inf planted in the loss of step 3: its update is skipped (the weights after step 3 are those
    after step 2, bit for bit), the run goes on, and killed after step 4 it resumes bit for bit."""
    import torch

    from h3pretrain.checkpoint import load_checkpoint_model

    data, _ = reference
    extra = {"model.embed_dropout": 0.1, "model.attn_dropout": 0.1, "keep_last": 10, "steps": 6, "eval_every": 0}
    planted = tmp_path / "planted"
    assert run(data, planted, python_code=INF_LOSS, env={"H3_TEST_INF_STEPS": "3"}, ckpt_every=1, **extra) == 0
    log = Path(str(planted) + ".log").read_text()
    assert "step 3: loss inf: no update applied (1 such step(s) in a row; train.max_bad_steps=3)" in log
    records = {r["step"]: r for r in map(json.loads, (planted / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train"}
    assert records[3]["loss"] is None and all(records[s]["loss"] is not None for s in (1, 2, 4, 6))
    ckpts = planted / "checkpoints"
    w2, w3 = (load_checkpoint_model(ckpts / f"step-0000000{s}")[1] for s in (2, 3))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    assert json.loads((ckpts / "step-00000003" / "trainer_state.json").read_text())["skipped_updates"] == 1
    killed = tmp_path / "killed"
    proc = launch(data, killed, python_code=INF_LOSS, env={"H3_TEST_INF_STEPS": "3"}, ckpt_every=2, **extra)
    assert _wait_for(lambda: (killed / "checkpoints" / "step-00000004" / "manifest.json").exists(), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert run(data, killed, python_code=INF_LOSS, env={"H3_TEST_INF_STEPS": "3", "H3_TEST_INF_FROM": "4"},
               ckpt_every=2, **extra) == 0
    assert losses(killed) == losses(planted)


def test_non_finite_steps_in_a_row_stop_the_run_and_no_bad_checkpoint_is_written(reference, tmp_path):
    """inf from step 5 on, train.max_bad_steps=2: the run stops at step 6 with exit 65, status.json
    `failed` naming the last good checkpoint (step 4; no checkpoint of step 6), and the same
    command without the fault resumes from it and ends as the reference, bit for bit."""
    data, ref_dir = reference
    extra = {"model.embed_dropout": 0.1, "model.attn_dropout": 0.1}
    run_dir = tmp_path / "run"
    code = run(data, run_dir, python_code=INF_LOSS, env={"H3_TEST_INF_STEPS": ",".join(map(str, range(5, 9)))},
               max_bad_steps=2, **extra)
    assert code == 65
    ckpts = run_dir / "checkpoints"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == 6
    assert status["last_good_checkpoint"] == str(ckpts / "step-00000004")
    assert status["error"].startswith("step 6: loss inf, 2 steps in a row (train.max_bad_steps=2)")
    assert (ckpts / "latest").read_text().strip() == "step-00000004"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) == ["step-00000002", "step-00000004"]
    log = Path(str(run_dir) + ".log").read_text()
    assert f"the last good checkpoint is {ckpts / 'step-00000004'}; exiting with 65" in log
    assert run(data, run_dir, max_bad_steps=2, **extra) == 0
    assert losses(run_dir) == losses(ref_dir)


FULL_DISK = """
import errno, os, sys
from h3pretrain.checkpoint import sharded
write = sharded.write
def full(state, directory, group):
    if "step-00000004" in str(directory):
        (directory / "state").mkdir(parents=True, exist_ok=True)
        (directory / "state" / "__0_0.distcp").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write(state, directory, group)
sharded.write = full
from h3pretrain.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("background", [True, False])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_loses_nothing(reference, tmp_path, background):
    data, ref_dir = reference
    extra = {"model.embed_dropout": 0.1, "model.attn_dropout": 0.1, "async_checkpoint": str(background).lower()}
    run_dir = tmp_path / "run"
    proc = launch(data, run_dir, python_code=FULL_DISK, **extra)
    assert proc.wait(timeout=600) == 1
    ckpts = run_dir / "checkpoints"
    log = Path(str(run_dir) + ".log").read_text()
    need = sum(m["bytes"] for m in json.loads((ckpts / "step-00000002" / "manifest.json").read_text())["files"].values())
    last = log.strip().splitlines()[-1]
    assert last.startswith(f"h3pretrain train: error: no space left on the device of {ckpts} while writing "
                           f"step-00000004: it needs about {need:,} bytes, "), last
    assert "Traceback" not in log
    assert not (ckpts / "step-00000004.tmp").exists() and not (ckpts / "step-00000004").exists()
    assert (ckpts / "latest").read_text().strip() == "step-00000002"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "no space left" in status["error"]
    if background:  # (the resume is the same for both)
        assert run(data, run_dir, **extra) == 0
        assert losses(run_dir) == losses(ref_dir)


HANG = """
import sys, time, torch
from h3pretrain.model import HybridLM
loss, calls = HybridLM.loss, [0]
def planted_hang(seconds):
    time.sleep(seconds)
def hanging(self, logits, targets):
    if torch.is_grad_enabled():
        calls[0] += 1
        if calls[0] == 5:  # the first micro-batch of step 3
            planted_hang(600)
    return loss(self, logits, targets)
HybridLM.loss = hanging
from h3pretrain.cli import main
sys.exit(main())
"""


def test_a_hung_step_writes_every_stack_and_exits_within_the_timeout(prepared, tmp_path):
    data, _ = prepared
    run_dir = tmp_path / "run"
    timeout = 6.0
    proc = launch(data, run_dir, python_code=HANG, hang_timeout_s=timeout, eval_every=0, ckpt_every=0)
    assert _wait_for(lambda: (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= 2, proc)
    t0 = time.time()
    code = proc.wait(timeout=120)
    waited = time.time() - t0
    print(f"watchdog fired {waited:.1f} s after step 2 was logged (train.hang_timeout_s={timeout})")
    assert code == 70
    assert waited < timeout + 120  # fired (without the watchdog the step sleeps for 600 s)
    stacks = (run_dir / "hang-0.txt").read_text()
    assert stacks.startswith(f"step 3 did not finish within train.hang_timeout_s={timeout:g} s; pid {proc.pid}")
    assert "planted_hang" in stacks and "h3pretrain-watchdog" not in stacks.split("\n", 1)[0]
    assert "Thread" in stacks and stacks.count("File ") > 5
    log = Path(str(run_dir) + ".log").read_text()
    assert f"stacks in {run_dir / 'hang-0.txt'}; exiting with 70" in log


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """RANK -> pid of the workers torchrun started."""
    out = {}
    for child in subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
        if rank:
            out[int(rank[0])] = int(child)
    return out


def test_a_lost_rank_brings_the_job_down_and_the_rerun_resumes_exactly(prepared, tmp_path):
    """4 ranks, rank 2 SIGKILLed after step 3: torchrun exits non-zero within the bound, and the same
    command resumes from the last checkpoint and ends as an uninterrupted 4-rank run, bit for bit."""
    data, _ = prepared
    extra = {**NO_DROPOUT, "micro_batch": 2, "eval_every": 0, "steps": 6}
    ref = tmp_path / "ref"
    assert run(data, ref, nproc=4, **extra) == 0
    run_dir = tmp_path / "run"
    proc = launch(data, run_dir, nproc=4, **extra)
    assert _wait_for(lambda: (run_dir / "checkpoints" / "step-00000002" / "manifest.json").exists()
                     and max(losses(run_dir), default=0) >= 3, proc)
    workers = _worker_pids(proc.pid)
    assert sorted(workers) == [0, 1, 2, 3]
    t0 = time.time()
    os.kill(workers[2], signal.SIGKILL)
    code = proc.wait(timeout=300)
    down = time.time() - t0
    print(f"a SIGKILLed rank brought the 4-rank job down in {down:.1f} s (exit {code})")
    assert code not in (0, 75) and down < 120
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers.values())
    assert run(data, run_dir, nproc=4, **extra) == 0
    assert "resumed from" in Path(str(run_dir) + ".log").read_text()
    assert losses(run_dir) == losses(ref)


SLOW_RANK = """
import os, sys, time, torch
from h3pretrain.model import HybridLM
loss = HybridLM.loss
def slowed(self, logits, targets):
    if torch.is_grad_enabled() and os.environ["RANK"] == "1":
        time.sleep(0.5)  # a slow node
    return loss(self, logits, targets)
HybridLM.loss = slowed
from h3pretrain.cli import main
sys.exit(main())
"""


def test_each_log_step_names_the_slowest_and_fastest_rank(prepared, tmp_path):
    """Rank 1 of 2 is slowed by 0.5 s per micro-batch (one per step here): every log step records it
    as the slowest rank (its own step time, before the ranks wait for each other), in metrics.jsonl
    and mlflow."""
    from mlflow.tracking import MlflowClient

    data, _ = prepared
    slow = tmp_path / "slow"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "--no-python", sys.executable, "-c", SLOW_RANK, "train", *_args(data, slow, **NO_DROPOUT)],
                            env=_env(), stdout=open(str(slow) + ".log", "ab"), stderr=subprocess.STDOUT)
    assert proc.wait(timeout=600) == 0, Path(str(slow) + ".log").read_text()[-3000:]
    train = [r for r in map(json.loads, (slow / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert len(train) == 8
    print([(r["step_time_max_rank"], round(r["step_time_max_s"], 3), round(r["step_time_min_s"], 3)) for r in train])
    for r in train[1:]:  # (the first step does one-time work of its own on each rank)
        assert r["step_time_max_rank"] == 1 and r["step_time_max_s"] >= 0.5, r
        assert r["step_time_min_rank"] == 0 and r["step_time_min_s"] < r["step_time_max_s"], r
        assert r["data_wait_max_rank"] in (0, 1) and r["data_wait_max_s"] >= 0
    client = MlflowClient(tracking_uri=f"sqlite:///{slow / 'mlflow.db'}")
    run_id = (slow / "mlflow_run_id").read_text().strip()
    assert [m.value for m in client.get_metric_history(run_id, "step_time_max_rank")][1:] == [1.0] * 7
