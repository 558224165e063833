"""A hung step ends the process instead of the job waiting forever.

A thread on every rank watches the step in flight; when it has not finished within
train.hang_timeout_s (three times that for the first step of a start: compilation, the first
collectives), it writes every thread's stack (faulthandler) to run_dir/hang-<rank>.txt, logs one
line and exits with EXIT_HUNG, a failure that the SLURM script requeues (up to slurm.max_restarts):
the job resumes from the last checkpoint. The other ranks then fail in their collectives (or are
ended by the launcher) and the job goes down as a whole.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import threading
import time
from pathlib import Path

from .signals import EXIT_HUNG

log = logging.getLogger("h3pretrain.train")
FIRST_STEP_FACTOR = 3


class Watchdog:
    def __init__(self, run_dir: Path, rank: int, timeout_s: float):
        self.path = Path(run_dir) / f"hang-{rank}.txt"
        self.timeout_s = timeout_s
        self._deadline: float | None = None
        self._step = 0
        self._stop = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="h3pretrain-watchdog", daemon=True)
            self._thread.start()

    def arm(self, step: int, first: bool = False) -> None:
        """Step `step` starts now."""
        self._step = step
        self._deadline = time.monotonic() + self.timeout_s * (FIRST_STEP_FACTOR if first else 1)

    def disarm(self) -> None:
        self._deadline = None

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, max(0.2, self.timeout_s / 20))):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self._fire()

    def _fire(self) -> None:
        with open(self.path, "w") as f:
            f.write(f"step {self._step} did not finish within train.hang_timeout_s={self.timeout_s:g} s; "
                    f"pid {os.getpid()}, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}; every thread's stack:\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        log.error("step %d did not finish within train.hang_timeout_s=%g s: stacks in %s; exiting with %d",
                  self._step, self.timeout_s, self.path, EXIT_HUNG)
        logging.shutdown()
        os._exit(EXIT_HUNG)
