"""The run-directory lock (h3pretrain/train/lock.py) on its own: who may take over a lock and who
is refused (the trainer's use of it: tests/train/test_train.py)."""
import json
import os
import socket
import subprocess

import pytest

from h3pretrain.train.lock import LOCK_NAME, RunDirInUse, RunLock


def _plant(run_dir, **holder):
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"host": "elsewhere", "pid": 1, "pid_start": None, "slurm_job_id": None, "started": "2026-12-01T00:00:00"}
    (run_dir / LOCK_NAME).write_text(json.dumps({**record, **holder}))


def _took_over(run_dir, caplog) -> str:
    lock = RunLock(run_dir)
    with caplog.at_level("WARNING", logger="h3pretrain.train"):
        lock.acquire()
    holder = json.loads((run_dir / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    lock.release()
    assert not (run_dir / LOCK_NAME).exists()
    return " ".join(r.getMessage() for r in caplog.records)


def test_a_free_directory_is_locked_and_released(tmp_path):
    run_dir = tmp_path / "new" / "run"
    lock = RunLock(run_dir)
    lock.acquire()
    holder = json.loads((run_dir / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["pid_start"] and set(holder) == {
        "host", "pid", "pid_start", "slurm_job_id", "started"}
    with pytest.raises(RunDirInUse, match=f"is in use by host {socket.gethostname()} pid {os.getpid()}"):
        RunLock(run_dir).acquire()  # a second trainer, even in this process
    lock.release()
    assert not (run_dir / LOCK_NAME).exists()


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path, caplog):
    gone = subprocess.Popen(["true"])
    gone.wait()
    _plant(tmp_path, host=socket.gethostname(), pid=gone.pid)
    said = _took_over(tmp_path, caplog)
    assert f"from host {socket.gethostname()} pid {gone.pid}: pid {gone.pid} no longer runs" in said


def test_a_lock_whose_pid_now_belongs_to_another_process_is_taken_over(tmp_path, caplog):
    _plant(tmp_path, host=socket.gethostname(), pid=os.getppid(), pid_start="1")  # alive, but started otherwise
    assert f"pid {os.getppid()} on {socket.gethostname()} is now another process" in _took_over(tmp_path, caplog)


def test_a_requeued_job_takes_over_its_own_lock(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _plant(tmp_path, slurm_job_id="4242")
    assert "SLURM job 4242 was requeued" in _took_over(tmp_path, caplog)


def test_a_live_holder_is_refused_and_the_directory_left_as_it_was(tmp_path, monkeypatch):
    _plant(tmp_path, host=socket.gethostname(), pid=os.getppid())  # alive on this host, same start time
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    holder["pid_start"] = None
    (tmp_path / LOCK_NAME).write_text(json.dumps(holder))
    before = (tmp_path / LOCK_NAME).read_bytes()
    with pytest.raises(RunDirInUse, match=f"pid {os.getppid()} since 2026-12-01T00:00:00: one trainer per run"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).read_bytes() == before
    fresh = tmp_path / "fresh"
    _plant(fresh, slurm_job_id="77")  # another host: squeue is asked (here it cannot tell, or says gone)
    monkeypatch.setattr("h3pretrain.train.lock._slurm_job_alive", lambda job: True)
    with pytest.raises(RunDirInUse, match=r"elsewhere pid 1 \(SLURM job 77\)"):
        RunLock(fresh).acquire()
    monkeypatch.setattr("h3pretrain.train.lock._slurm_job_alive", lambda job: False)
    lock = RunLock(fresh)
    lock.acquire()  # the job ended: taken over
    lock.release()
