"""A private single-node SLURM cluster (Debian slurmctld + slurmd + munge) for tests.

Everything lives in one directory: config, state, logs, pid files and munged's socket, and the
daemons listen on free ports, so two instances (or one beside a system SLURM) do not collide.
Daemons are stopped by the PIDs they wrote, never by name.

    python tests/slurm/slurm_local.py up DIR     # start; prints `export SLURM_CONF=...`
    python tests/slurm/slurm_local.py down DIR   # stop
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun", "munged", "munge"]


class SlurmUnavailable(RuntimeError):
    """SLURM is not installed and cannot be (the message says why)."""


def ensure_installed() -> None:
    """Install the Debian packages when a binary is missing; SlurmUnavailable if that is impossible."""
    missing = [b for b in BINARIES if not _which(b)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM binaries {missing} are missing and installing them needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable(f"SLURM binaries {missing} are missing and there is no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip()[-500:]}")
    still = [b for b in BINARIES if not _which(b)]
    if still:
        raise SlurmUnavailable(f"after apt-get install, still missing: {still}")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _meminfo_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


class LocalSlurm:
    def __init__(self, root: str | Path, cpus: int | None = None):
        """cpus: CPUs the node offers to jobs; more than the machine has lets jobs share cores."""
        self.root = Path(root).resolve()  # SLURM needs absolute paths everywhere
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.host = socket.gethostname().split(".")[0]
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ---- life cycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> "LocalSlurm":
        ensure_installed()
        for sub in ("state", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self._start_munge(timeout)
        self.conf.write_text(self._slurm_conf())
        try:
            self._spawn(["slurmctld", "-c"], "slurmctld.log")
            self._spawn(["slurmd"], "slurmd.log")
            self._wait(lambda: self.sinfo_state() == "idle", timeout, "the node to become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self, timeout: float) -> None:
        mdir = self.munge_socket.parent
        mdir.mkdir(exist_ok=True)
        shutil.chown(mdir, "munge", "munge")
        os.chmod(mdir, 0o755)  # munged: clients need execute on the socket directory
        cmd = ["runuser", "-u", "munge", "--", _which("munged"), f"--socket={self.munge_socket}",
               f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
               f"--seed-file={mdir / 'munged.seed'}", "--key-file=/etc/munge/munge.key"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SlurmUnavailable(f"munged did not start: {done.stderr.strip()}")
        self._wait(lambda: subprocess.run(["munge", "-n", "-S", str(self.munge_socket)],
                                          capture_output=True).returncode == 0, timeout, "munged")

    def _spawn(self, cmd: list[str], log: str) -> None:
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): {done.stderr.strip()}\n{self.log_tail(log)}")

    def stop(self, timeout: float = 30.0) -> None:
        pids = []
        for pidfile in (self.root / "run" / "slurmd.pid", self.root / "run" / "slurmctld.pid",
                        self.munge_socket.parent / "munged.pid"):
            try:
                pid = int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    # ---- queries ------------------------------------------------------------------------------

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip()}")
        return done

    def sinfo_state(self) -> str:
        return self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict ({} once SLURM has forgotten the job)."""
        done = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if done.returncode:
            return {}
        fields = {}
        for token in done.stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.root / "log" / name
        return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} missing)"

    @staticmethod
    def _wait(predicate, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")

    def _slurm_conf(self) -> str:
        r = self.root
        oversubscribe = self.cpus > (os.cpu_count() or 1)
        return "\n".join([
            "ClusterName=ci",
            f"SlurmctldHost={self.host}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "KillWait=5",
            *(["SlurmdParameters=config_overrides"] if oversubscribe else []),  # trust CPUs= below
            f"NodeName={self.host} CPUs={self.cpus} RealMemory={max(_meminfo_mib() - 1024, 512)} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ])


if __name__ == "__main__":
    action, where = sys.argv[1], sys.argv[2]
    cluster = LocalSlurm(where)
    if action == "up":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    elif action == "down":
        cluster.stop()
    else:
        sys.exit(f"usage: {sys.argv[0]} up|down DIR")
