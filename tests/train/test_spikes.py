"""Loss spikes: the window's statistics, the rollback record, and runs with a planted spike (warn,
rollback, killed during and after a rollback, too many rollbacks)."""
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch.distributed as dist

from h3pretrain.train.spikes import SkipLog, SpikeWindow
from test_train import _wait_for, launch, losses, run


def test_a_spike_is_judged_by_the_full_window_before_it():
    window = SpikeWindow(size=4, z=2.0)
    for x in (3.0, 3.2, 2.8, 3.0):
        assert window.check(x) is None  # not full yet: nothing is judged
        window.add(x)
    mean, std = 3.0, math.sqrt(0.02)
    spike = window.check(3.0 + 2 * std + 1e-9)
    assert spike is not None and spike.mean == pytest.approx(mean) and spike.std == pytest.approx(std)
    assert spike.threshold == pytest.approx(mean + 2 * std)
    assert window.check(3.0 + 2 * std - 1e-9) is None
    window.add(10.0)  # the oldest leaves
    assert window.state_dict() == [3.2, 2.8, 3.0, 10.0]
    other = SpikeWindow(size=3, z=2.0)
    other.load_state_dict(window.state_dict())  # a smaller window keeps the newest
    assert other.state_dict() == [2.8, 3.0, 10.0]


@pytest.fixture
def gloo_one_rank():
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_rollback_records_chain_from_the_checkpoint_and_a_torn_line_is_cut(tmp_path, gloo_one_rank):
    skip = SkipLog(tmp_path)
    first = {"rolled_back_to": 10, "offset_before": 0, "batches": 5, "spike_step": 14}
    elsewhere = {"rolled_back_to": 20, "offset_before": 5, "batches": 3, "spike_step": 23}
    second = {"rolled_back_to": 10, "offset_before": 5, "batches": 2, "spike_step": 12}
    for record in (first, elsewhere, second):
        skip.append(record)
    with open(skip.path, "ab") as f:
        f.write(b'{"rolled_back_to": 10, "offset_before": 7, "bat')  # a kill mid-write
    strip = lambda records: [{k: v for k, v in r.items() if k != "time"} for r in records]  # noqa: E731
    assert strip(skip.applicable(10, 0)) == [first, second]
    assert strip(skip.applicable(10, 5)) == [second]
    assert strip(skip.applicable(20, 5)) == [elsewhere] and skip.applicable(20, 0) == []
    skip.append({"rolled_back_to": 30, "offset_before": 8, "batches": 1, "spike_step": 31})
    lines = skip.path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)  # the torn line is gone


# The global batch SPIKE_BATCH (0-based, in the run's data order) is bad data: every step that trains
# on it has a loss 1000 times what it would be. H3_TEST_SLOW_LOAD: every checkpoint load sleeps first.
SPIKE = """
import os, sys, time, torch
from h3pretrain.data.shards import TokenBatches
from h3pretrain.model import HybridLM
from h3pretrain.train.engine import TrainingEngine
bad_batches = {int(b) for b in os.environ["SPIKE_BATCH"].split(",")}
bad_rows = set()
batch_at = TokenBatches.batch_at
def recording(self, position):
    out = batch_at(self, position)
    if self.reader.split == "train" and position // self.global_batch in bad_batches:
        bad_rows.update(row[1:].numpy().tobytes() for row in out)
    return out
TokenBatches.batch_at = recording
loss = HybridLM.loss
def planted(self, logits, targets):
    out = loss(self, logits, targets)
    if torch.is_grad_enabled() and any(row.numpy().tobytes() in bad_rows for row in targets):
        out = out * 1000
    return out
HybridLM.loss = planted
if os.environ.get("H3_TEST_SLOW_LOAD"):
    load = TrainingEngine.load
    def slow(self, *args, **kwargs):
        time.sleep(120)
        return load(self, *args, **kwargs)
    TrainingEngine.load = slow
from h3pretrain.cli import main
sys.exit(main())
"""

# A window of 3 losses can have a tiny std: z = 500 keeps ordinary steps far from the threshold,
# and the planted spike (about 1000 x 6.7) far above it.
SPIKY = {"steps": 10, "ckpt_every": 3, "eval_every": 0, "keep_last": 10, "spike_window": 3, "spike_z": 500.0,
         "model.embed_dropout": 0.1, "model.attn_dropout": 0.1}


def _records(run_dir, name="metrics.jsonl"):
    return [json.loads(line) for line in (Path(run_dir) / name).read_text().splitlines()]


def _mlflow_history(run_dir, key) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_warned_spike_is_logged_and_the_run_goes_on(prepared, tmp_path):
    data, _ = prepared
    run_dir = tmp_path / "warn"
    assert run(data, run_dir, python_code=SPIKE, env={"SPIKE_BATCH": "4"}, spike="warn", **{**SPIKY, "steps": 6}) == 0
    spikes = [r for r in _records(run_dir) if r["kind"] == "spike"]
    assert [r["step"] for r in spikes] == [5] and spikes[0]["loss"] > spikes[0]["threshold"]
    trained = {r["step"]: r for r in _records(run_dir) if r["kind"] == "train"}
    assert sorted(trained) == [1, 2, 3, 4, 5, 6] and [trained[s]["data_batch"] for s in range(1, 7)] == list(range(6))
    assert trained[5]["loss"] == spikes[0]["loss"]
    log = Path(str(run_dir) + ".log").read_text()
    assert f"step 5: loss {spikes[0]['loss']:.4f} is a spike (window mean" in log and "(train.spike=warn)" in log
    assert _mlflow_history(run_dir, "spike/loss") == [(5, spikes[0]["loss"])]
    assert not (run_dir / "skipped_batches.jsonl").exists()
    assert "skipped_batches" not in json.loads((run_dir / "status.json").read_text())


@pytest.fixture(scope="module")
def rolled_back(prepared, tmp_path_factory):
    """Bad batch 4 met at step 5: back to step 3, batches 3-5 skipped (spike_skip_batches=3)."""
    data, _ = prepared
    run_dir = tmp_path_factory.mktemp("spike") / "run"
    assert run(data, run_dir, python_code=SPIKE, env={"SPIKE_BATCH": "4"}, spike="rollback",
               spike_skip_batches=3, **SPIKY) == 0
    return data, run_dir


def test_a_rollback_skips_the_recorded_batches_and_says_so(rolled_back):
    _, run_dir = rolled_back
    (record,) = _records(run_dir, "skipped_batches.jsonl")
    assert {k: record[k] for k in ("spike_step", "rolled_back_to", "checkpoint", "first_batch", "last_batch",
                                   "batches", "offset_before")} == {
        "spike_step": 5, "rolled_back_to": 3, "checkpoint": "step-00000003", "first_batch": 3, "last_batch": 5,
        "batches": 3, "offset_before": 0}
    trained = [r for r in _records(run_dir) if r["kind"] == "train"]
    assert [r["step"] for r in trained] == list(range(1, 11))  # each step once: the undone ones moved out
    seen = [r["data_batch"] for r in trained]
    assert seen == [0, 1, 2] + list(range(6, 13))
    assert sorted(set(range(13)) - set(seen)) == list(range(record["first_batch"], record["last_batch"] + 1))
    assert max(r["loss"] for r in trained) < record["threshold"]  # the bad batch was never trained on again
    undone = [r["step"] for r in _records(run_dir, "metrics.superseded.jsonl") if r["kind"] == "train"]
    assert undone == [4]  # step 5 (the spike) is in the rollback record, not a train record
    rollbacks = [r for r in _records(run_dir) if r["kind"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["step"] == 3 and rollbacks[0]["spike_step"] == 5
    assert _mlflow_history(run_dir, "loss") == [(r["step"], r["loss"]) for r in trained]  # the undone step 4 never sent
    assert _mlflow_history(run_dir, "rollback/first_batch") == [(3, 3.0)]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 10
    assert status["skipped_batches"] == [{"spike_step": 5, "rolled_back_to": 3, "first_batch": 3, "last_batch": 5}]
    state = json.loads((run_dir / "checkpoints" / "step-00000010" / "trainer_state.json").read_text())
    assert state["data_offset_batches"] == 3 and state["data"]["position"] == 13 * 8
    log = Path(str(run_dir) + ".log").read_text()
    assert (f"step 5: loss {record['loss']:.4f} is a spike (window mean {record['window_mean']:.4f}" in log
            and "rolling back to step-00000003 (step 3), global batches 3-5 (3) skipped; recorded in "
            f"{run_dir / 'skipped_batches.jsonl'}" in log)


@pytest.mark.parametrize("when", ["during", "after"])
def test_a_run_killed_during_or_after_a_rollback_resumes_to_the_same_losses(rolled_back, tmp_path, when):
    """during: SIGKILL while the rollback reloads step 3 (its record written); after: once the first
    checkpoint after it (step 6) is complete. The same command then ends as the run not killed, bit
    for bit, with the same record, once."""
    data, ref_dir = rolled_back
    run_dir = tmp_path / when
    args = dict(python_code=SPIKE, spike="rollback", spike_skip_batches=3, **SPIKY)
    env = {"SPIKE_BATCH": "4", **({"H3_TEST_SLOW_LOAD": "1"} if when == "during" else {})}
    proc = launch(data, run_dir, env=env, **args)
    record, checkpoint = run_dir / "skipped_batches.jsonl", run_dir / "checkpoints" / "step-00000006" / "manifest.json"
    if when == "during":
        assert _wait_for(lambda: record.is_file() and record.read_bytes().endswith(b"\n"), proc)
    else:
        assert _wait_for(checkpoint.exists, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert run(data, run_dir, env={"SPIKE_BATCH": "4"}, **args) == 0
    assert losses(run_dir) == losses(ref_dir)
    strip = lambda r: {k: v for k, v in r.items() if k != "time"}  # noqa: E731
    assert [strip(r) for r in _records(run_dir, "skipped_batches.jsonl")] == [
        strip(r) for r in _records(ref_dir, "skipped_batches.jsonl")]
    assert [r["step"] for r in _records(run_dir) if r["kind"] == "rollback"] == [3]
    if when == "during":
        assert "applying the rollback recorded for the spike at step 5: back at step 3" in Path(
            str(run_dir) + ".log").read_text()


def test_spikes_that_follow_every_rollback_stop_the_run(prepared, tmp_path):
    """Batches 4 and 5 are bad, spike_skip_batches=0: the first rollback skips through the spike's
    batch (3-4), the next step meets batch 5, and spike_max_rollbacks=1 stops the run (exit 65)."""
    data, _ = prepared
    run_dir = tmp_path / "run"
    code = run(data, run_dir, python_code=SPIKE, env={"SPIKE_BATCH": "4,5"}, spike="rollback", spike_skip_batches=0,
               spike_max_rollbacks=1, **SPIKY)
    assert code == 65
    (record,) = _records(run_dir, "skipped_batches.jsonl")
    assert (record["spike_step"], record["first_batch"], record["last_batch"]) == (5, 3, 4)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["last_good_checkpoint"] == str(run_dir / "checkpoints" / "step-00000003")
    assert status["error"].startswith("step 4: loss ") and status["error"].endswith(
        f"after 1 rollbacks to {run_dir / 'checkpoints' / 'step-00000003'} (train.spike_max_rollbacks=1)")
