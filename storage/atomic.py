"""Atomic writes: a file or directory appears whole under its final name, or not at all.

Everything is written under a hidden temporary sibling `.coconut-tmp-{name}.{pid}` and renamed into
place once complete and flushed to disk. Replacing an existing directory takes two renames (the old
one moved aside to `.coconut-tmp-{name}.{pid}-old`, then the new one in), so a kill at any moment
leaves the old or the new complete directory under the final name, or, between the two renames,
both complete under temporary names: remove_leftovers then finishes the replacement. Every
temporary name has this one shape, so remove_leftovers removes what killed writers left and never
a name it did not make. The pid keeps concurrent writers apart and tells a dead writer's leftovers
from a live one's (on this host).

Logs that grow a line at a time (metrics.jsonl, train_log.jsonl) are appended instead: their writers
say why.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".coconut-tmp-"
_OLD = "-old"
_TEMP = re.compile(rf"{re.escape(TMP_PREFIX)}(?P<name>.+)\.(?P<pid>\d+)(?P<old>{_OLD})?")


def temp_path(final: str | Path, pid: int | None = None) -> Path:
    """The temporary sibling that `final` is written under by process `pid` (default: this one)."""
    final = Path(final)
    return final.with_name(f"{TMP_PREFIX}{final.name}.{os.getpid() if pid is None else pid}")


def _aside(final: Path, pid: int) -> Path:
    return final.with_name(temp_path(final, pid).name + _OLD)


# --- directories ---------------------------------------------------------------------------------


@contextmanager
def atomic_dir(final: str | Path, replace: bool = True) -> Iterator[Path]:
    """`with atomic_dir(final) as tmp:` write the directory's contents into tmp; on success it becomes
    `final` (replacing an existing one, or with replace=False raising FileExistsError if there is one);
    on an exception tmp is removed and `final` stays as it was."""
    final = Path(final)
    tmp = start_dir(final)
    try:
        yield tmp
        commit_dir(final, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def start_dir(final: Path, pid: int | None = None) -> Path:
    """An empty temporary directory for `final` (what a writer of the same pid left there is dropped).
    Several processes may fill it when they agree on `pid` (a checkpoint's ranks use rank 0's);
    one of them commits it."""
    tmp = temp_path(final, pid)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)  # final's parent too, as save_pretrained would
    return tmp


def commit_dir(final: Path, replace: bool = True, pid: int | None = None) -> None:
    """Flush the files of start_dir(final, pid)'s directory and rename it to `final`: the directory
    appears complete or not at all.

    An existing `final` is moved aside, the new one renamed in, the old one removed: at no moment is
    there a half directory under `final`. With replace=False an existing `final` raises FileExistsError.
    """
    tmp = temp_path(final, pid)
    for path in tmp.rglob("*"):  # contents on disk before the rename makes them visible (power loss, not just kill)
        if path.is_file() and not path.is_symlink():
            fsync_file(path)
    if final.exists() or final.is_symlink():
        if not replace:
            raise FileExistsError(final)
        old = _aside(final, os.getpid() if pid is None else pid)
        _remove(old)
        os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
    else:
        try:
            os.replace(tmp, final)
        except OSError as e:  # another writer's `final` appeared meanwhile (rename refuses a non-empty directory)
            if final.exists():
                raise FileExistsError(final) from e
            raise
    _fsync_dir(final.parent)


def remove_dir(path: Path) -> None:
    """Delete a directory: renamed out of sight first, so a kill mid-way leaves a leftover, never half of it."""
    old = _aside(path, os.getpid())
    _remove(old)
    os.replace(path, old)
    _remove(old)


# --- files -----------------------------------------------------------------------------------------


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """`with atomic_file(path) as tmp:` write the file at tmp; on success it replaces `path` whole
    (a reader sees the old or the new file); on an exception tmp is removed and `path` is untouched."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Replace a text file whole (UTF-8)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# --- leftovers -------------------------------------------------------------------------------------


def remove_leftovers(directory: str | Path, names: Iterable[str] | None = None, everyone: bool = False) -> None:
    """Remove what killed writers left in `directory` under this module's temporary names (of the
    final `names` only, if given), and nothing else.

    A replacement killed between its two renames is finished first: the new directory, complete
    under its temporary name, becomes `final`. Temporaries of processes still running on this host
    are kept, unless `everyone` (the caller knows that nobody else writes there: its own directory,
    or a lock held) — then all are removed. This process's own count as leftovers: call it before
    writing there.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    wanted = None if names is None else set(names)
    found = [
        (path, match)
        for path in directory.iterdir()
        if (match := _TEMP.fullmatch(path.name)) and (wanted is None or match["name"] in wanted)
    ]
    dead = {pid: everyone or pid == os.getpid() or not _alive(pid) for pid in {int(m["pid"]) for _, m in found}}
    found.sort(key=lambda f: not f[1]["old"])  # asides first: finishing a replacement needs its temp
    for path, match in found:
        pid = int(match["pid"])
        if not dead[pid]:
            continue
        final = directory / match["name"]
        tmp = temp_path(final, pid)
        # an aside exists only once its temp was complete: the killed writer was committing it
        if match["old"] and not (final.exists() or final.is_symlink()) and tmp.is_dir():
            os.replace(tmp, final)
        _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def fsync_file(path: Path) -> None:
    """File contents on disk (a rename alone orders nothing against power loss)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """The rename itself on disk (the directory's entry), not only the file contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
