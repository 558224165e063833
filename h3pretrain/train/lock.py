"""One trainer per run directory: `run_dir/trainer.lock`, held by the job's rank 0 from before the
first write until the run ends.

The lock names its holder (host, pid and the pid's start time, SLURM job id, start time). A second
trainer refuses to start, naming the holder. A lock whose holder is gone is taken over with a
warning: on this host, a pid that no longer runs (or now belongs to another process: its start time
differs); elsewhere, a SLURM job that squeue no longer lists as pending or running. A requeued SLURM
job (the same job id) takes over its own lock. A holder on another host without a SLURM job id
cannot be checked from here: the lock is then refused until it is removed by hand.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

from ..errors import UserError

log = logging.getLogger("h3pretrain.train")
LOCK_NAME = "trainer.lock"


class RunDirInUse(UserError):
    """Another trainer holds the run directory."""


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of a process (field 22 of /proc/PID/stat), None where it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def holder_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _slurm_job_alive(job_id: str) -> bool | None:
    """True/False from squeue; None where squeue cannot tell (not installed, no answer)."""
    try:
        done = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return False if "Invalid job id" in done.stderr else None
    return done.stdout.strip() in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING",
                                   "SUSPENDED", "STOPPED", "SIGNALING")


def why_stale(holder: dict, me: dict) -> str | None:
    """Why the holder no longer holds the run directory, or None if it may still be training."""
    if holder.get("slurm_job_id") and holder["slurm_job_id"] == me.get("slurm_job_id"):
        return f"SLURM job {holder['slurm_job_id']} was requeued"
    if holder.get("host") == me["host"]:
        start = _proc_start(int(holder.get("pid", -1)))
        if start is None:
            return f"pid {holder.get('pid')} no longer runs on {me['host']}"
        if holder.get("pid_start") and start != holder["pid_start"]:
            return f"pid {holder.get('pid')} on {me['host']} is now another process"
        return None
    if holder.get("slurm_job_id"):
        alive = _slurm_job_alive(holder["slurm_job_id"])
        if alive is False:
            return f"SLURM job {holder['slurm_job_id']} is no longer pending or running"
    return None


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.me = holder_record()
        self.held = False

    def acquire(self) -> None:
        """Takes the lock or raises RunDirInUse naming the holder (the run directory is created if
        needed, and removed again if it was empty and the lock was refused)."""
        created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._take_over(created)
        else:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.me, indent=1) + "\n")
        self.held = True

    def _take_over(self, created: bool) -> None:
        try:
            holder = json.loads(self.path.read_text())
            if not isinstance(holder, dict):
                raise ValueError("not a mapping")
        except (OSError, ValueError) as err:
            holder, why = {}, f"the lock file is unreadable ({err})"
        else:
            why = why_stale(holder, self.me)
        if why is None:
            if created:
                self.path.parent.rmdir()
            raise RunDirInUse(
                f"train.run_dir {self.path.parent} is in use by host {holder.get('host')} pid {holder.get('pid')}"
                + (f" (SLURM job {holder['slurm_job_id']})" if holder.get("slurm_job_id") else "")
                + f" since {holder.get('started')}: one trainer per run directory; if that trainer is gone, "
                f"remove {self.path}")
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.me, indent=1) + "\n")
        os.replace(tmp, self.path)
        log.warning("took over %s from host %s pid %s: %s", self.path, holder.get("host"), holder.get("pid"), why)

    def release(self) -> None:
        """Removes the lock if it is still this process's."""
        if not self.held:
            return
        self.held = False
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)
