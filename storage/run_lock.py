"""One run per run directory: an exclusive lock on save_path/name, held for the whole run.

Two runs writing one directory (a resubmitted job, a second terminal) would prune each other's
checkpoints and interleave their logs. The lock is fcntl.flock on `.run.lock` in the run directory:
the kernel releases it when its process dies however it dies, so it can never be stale; the file
holds the holder's host and PID, which a refused run names, and is removed when the run ends. A lock
file found free was left by a run that died (killed, or its machine rebooted): the new run takes it
over and says so. flock is advisory and per host on some network file systems (NFS without lock
support): there two hosts could both take it; the host in the file is what the refusal names.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from training.distributed import all_reduce_host
from utils import CheckpointError

LOCK_FILE = ".run.lock"


@contextlib.contextmanager
def run_lock(save_dir: Path, is_main: bool, say: Callable[[str], None]) -> Iterator[None]:
    """Hold save_dir's lock (rank 0 takes it; every rank learns whether it did) until the run ends."""
    error, handle = None, None
    if is_main:
        try:
            handle = _take(save_dir, say)
        except CheckpointError as e:
            error = e
    if all_reduce_host([float(error is not None)])[0]:
        raise error or CheckpointError(f"{save_dir}: rank 0 could not take the run directory's lock")
    try:
        yield
    finally:
        if handle is not None:  # removed while still held: a run that opened it meanwhile retries (see _take)
            (save_dir / LOCK_FILE).unlink(missing_ok=True)
            os.close(handle)


def _take(save_dir: Path, say: Callable[[str], None]) -> int:
    """The locked lock file's descriptor. Raw descriptor I/O: the lock is no data file, and a run whose
    disk is full should be refused at its first data file (config.yaml), which names what could not be written."""
    if save_dir.exists() and not save_dir.is_dir():
        raise CheckpointError(f"{save_dir}: the run directory (save_path/name) is a file; remove it or change name")
    path = save_dir / LOCK_FILE
    while True:
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # held open for the whole run
        except OSError as e:
            raise CheckpointError(f"{save_dir}: cannot create the run directory: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read(fd) or "a process that has not written its name yet"
            os.close(fd)
            raise CheckpointError(
                f"{save_dir}: another run is using this run directory ({holder}); wait for it to end, "
                "or give this run another save_path/name"
            ) from None
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the file its holder removed on ending: lock the one in place now
    left = _read(fd)
    if left:
        say(f"note: {save_dir / LOCK_FILE}: taking over the lock of a run that ended without releasing it ({left})")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
    return fd


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()
