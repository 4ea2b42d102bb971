"""Stopping on SIGTERM, SIGUSR1 or SIGINT without losing work: finish the optimizer step, save, exit 75.

SLURM and cloud schedulers send SIGTERM or SIGUSR1 before they kill a job; SIGINT is Ctrl-C. A
signal only records the request. The run looks at it at every optimizer-step boundary, through
the collective that already sums the step's label counts, so all ranks stop at the same step even
though each received the signal at its own moment. They then write a step checkpoint together
and exit with status 75 (EX_TEMPFAIL, "try again"), which re-running the same command resumes.

Because a signal only sets a flag, an evaluation or a save under way runs to its end; the stop
follows at the next step boundary. If the scheduler's grace period runs out first, its kill is a
kill -9: the newest complete checkpoint holds the progress, and an epoch whose evaluation was cut
off is evaluated when the run resumes.

A second SIGINT aborts at once (status 130, no checkpoint). Under torchrun one Ctrl-C reaches a
rank twice: from the terminal, and forwarded by torchrun's agent a moment later, so a SIGINT
within DUPLICATE_S of the first counts as the same one.
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # its exit handler is registered on import: before ours, so it runs after ours
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

EX_TEMPFAIL = 75  # sysexits.h: a temporary failure, the user is invited to retry
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
DUPLICATE_S = 1.0


class Preempted(SystemExit):
    """The run stopped on request after saving; `message` is the one line to print."""

    def __init__(self, message: str) -> None:
        super().__init__(EX_TEMPFAIL)
        self.message = message


class StopRequests:
    """While entered, the stop signals set `signal_name` instead of ending the process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.signal_name: str | None = None
        self._clock = clock
        self._first_sigint: float | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker inherited the handler: its parent decides
            return
        now = self._clock()
        if signum == signal.SIGINT:
            if self._first_sigint is not None and now - self._first_sigint > DUPLICATE_S:
                print(
                    "interrupted again: aborted without saving; re-running the same command "
                    "resumes from the newest checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(128 + signal.SIGINT)
            self._first_sigint = self._first_sigint if self._first_sigint is not None else now
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: workers leave stop signals to the training process, which ends them
    (a scheduler signals every process of the job, and a worker killed by it would fail the run)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _kill_leftover_workers() -> None:
    """At exit, end the DataLoader workers whose loader was never shut down (an error unwound it):
    multiprocessing's own exit handler sends its daemon children SIGTERM and waits for them, which
    workers that ignore stop signals would make wait forever. SIGKILL cannot be ignored."""
    leftover = [child for child in multiprocessing.active_children() if child.daemon]
    if leftover:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report each kill as a worker failure
        for child in leftover:
            child.kill()


atexit.register(_kill_leftover_workers)
