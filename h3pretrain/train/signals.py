"""Preemption signals: SIGTERM and SIGUSR1 (SLURM's `--signal=B:USR1@<grace>`) request a stop.

The handler only records the request; the training loop finishes the step in flight (or stops
evaluation or a data wait early), saves a checkpoint and exits with EXIT_PREEMPTED, which a
launcher can tell apart from a crash (non-zero, other code) and from a finished run (0).
"""
from __future__ import annotations

import signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" — saved, resume from latest
EXIT_DIVERGED = 65  # EX_DATAERR: train.max_bad_steps non-finite steps in a row; a restart would repeat them
EXIT_HUNG = 70  # EX_SOFTWARE: a step outlived train.hang_timeout_s (stacks in run_dir/hang-<rank>.txt); requeued
EXIT_FINISHED = 0


class StopRequest:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
