"""atomic.py: a directory or file appears whole or not at all, and only its own leftovers are cleaned up.

Kills are real (os._exit in a forked child at the k-th rename), never a raised exception, which would
run the writer's own clean-up that a kill -9 never runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage import atomic


def files(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): p.read_text() for p in sorted(directory.rglob("*")) if p.is_file()}


def write_dir(directory: Path, contents: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in contents.items():
        (directory / name).write_text(text)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def killed_at_rename(k: int, action) -> int:
    """Run action in a forked child that dies (os._exit(9), no clean-up) just before its k-th
    os.replace; the child's pid (exited and reaped)."""
    pid = os.fork()
    if pid == 0:
        real, count = os.replace, [0]

        def replace(*args, **kwargs):
            count[0] += 1
            if count[0] == k:
                os._exit(9)
            return real(*args, **kwargs)

        os.replace = replace
        try:
            action()
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9, "the action ended before its k-th rename"
    return pid


def test_temp_names():
    assert atomic.temp_path(Path("run/checkpoint_3"), 42) == Path("run/.coconut-tmp-checkpoint_3.42")
    assert atomic.temp_path(Path("run/curves.png")).name == f".coconut-tmp-curves.png.{os.getpid()}"


def test_a_directory_replaces_the_old_one_whole(tmp_path):
    final = tmp_path / "out"
    write_dir(final, {"a.txt": "old", "b.txt": "old"})
    with atomic.atomic_dir(final) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir()) and tmp.parent == tmp_path
        assert files(final) == {"a.txt": "old", "b.txt": "old"}  # untouched while the new one is written
        write_dir(tmp, {"a.txt": "new", "c.txt": "new"})
    assert files(final) == {"a.txt": "new", "c.txt": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_error_leaves_the_old_directory_and_no_temporary(tmp_path):
    final = tmp_path / "out"
    write_dir(final, {"a.txt": "old"})
    with pytest.raises(RuntimeError, match="half way"):
        with atomic.atomic_dir(final) as tmp:
            write_dir(tmp, {"a.txt": "new"})
            raise RuntimeError("half way")
    assert files(final) == {"a.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(RuntimeError):  # nothing there before: nothing there after
        with atomic.atomic_dir(tmp_path / "fresh") as tmp:
            raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic.atomic_dir(tmp_path / "new" / "out") as tmp:  # a parent that is not there yet is made
        write_dir(tmp, {"a.txt": "new"})
    assert files(tmp_path / "new") == {"out/a.txt": "new"}


def test_replace_false_refuses_an_existing_directory(tmp_path):
    final = tmp_path / "out"
    write_dir(final, {"a.txt": "theirs"})
    with pytest.raises(FileExistsError):
        with atomic.atomic_dir(final, replace=False) as tmp:
            write_dir(tmp, {"a.txt": "mine"})
    assert files(final) == {"a.txt": "theirs"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("k", [1, 2])
def test_a_kill_at_either_rename_of_a_replacement_is_recovered(tmp_path, k):
    """Kill before the old directory is moved aside (k=1) or between the two renames (k=2): the old
    or the new directory is complete, under its final name or a temporary one, never half, and
    remove_leftovers leaves exactly one of them under the final name and nothing else."""
    final = tmp_path / "out"
    write_dir(final, {"a.txt": "old"})

    def replace():
        with atomic.atomic_dir(final) as tmp:
            write_dir(tmp, {"a.txt": "new", "b.txt": "new"})

    pid = killed_at_rename(k, replace)
    new, old = {"a.txt": "new", "b.txt": "new"}, {"a.txt": "old"}
    temp, aside = tmp_path / f".coconut-tmp-out.{pid}", tmp_path / f".coconut-tmp-out.{pid}-old"
    if k == 1:
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", temp.name])
        assert files(final) == old and files(temp) == new
    else:  # final's name is empty for a moment: both directories are whole under temporary names
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([temp.name, aside.name])
        assert files(aside) == old and files(temp) == new
    atomic.remove_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert files(final) == (old if k == 1 else new)  # k=2: the replacement, committed, is finished


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    with atomic.atomic_file(path) as tmp:
        tmp.write_text("new\n")
        assert path.read_text() == "old\n"
    atomic.write_text(tmp_path / "config.yaml", "a: 1\n")
    assert files(tmp_path) == {"config.yaml": "a: 1\n", "metrics.jsonl": "new\n"}


def test_leftovers_cleanup_removes_only_its_own_names_of_writers_gone(tmp_path):
    dead, alive = dead_pid(), os.getppid()  # pytest's parent runs as long as this test does
    gone = [
        f".coconut-tmp-train_log.jsonl.{dead}",
        f".coconut-tmp-curves.png.{dead}",
        f".coconut-tmp-checkpoint_3.{dead}",
        f".coconut-tmp-step_4.{dead}-old",
    ]  # a removal (atomic.remove_dir) killed after its rename: not undone
    running = [f".coconut-tmp-checkpoint_5.{alive}"]
    theirs = [
        ".coconut-tmp-notes",
        ".coconut-tmp-checkpoint_x",
        ".coconut-tmp-a.12b",
        "notes.123",
        ".tmp-x.7",
        "checkpoint_3",
        "curves.png",
    ]
    for name in gone + running + theirs:
        if "checkpoint" in name or "step" in name:
            write_dir(tmp_path / name, {"f": name})
        else:
            (tmp_path / name).write_text(name)

    atomic.remove_leftovers(tmp_path, ["curves.png"])  # only that file's
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(gone + running + theirs) - {gone[1]})
    atomic.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(running + theirs)
    assert files(tmp_path / "checkpoint_3") == {"f": "checkpoint_3"}  # a user's own: not replaced by a temp
    atomic.remove_leftovers(tmp_path, everyone=True)  # the caller knows nobody writes there
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)


# --- durability (power loss, which no kill shows) ----------------------------------------------------


class FileSystemLog:
    """os.fsync, os.replace and os.rename intercepted: what each fsync covered (the path its descriptor
    names, and a file's bytes then), and every rename with the files it published."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[tuple[str, Path, object]] = []
        fsync, replace, rename = os.fsync, os.replace, os.rename

        def logged_fsync(fd: int) -> None:
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            self.events.append(("fsync", path, path.read_bytes() if path.is_file() else None))
            fsync(fd)

        def logged(real):
            def move(src, dst, *args, **kwargs):
                src = Path(src)
                published = {p: p.read_bytes() for p in ([src] if src.is_file() else src.rglob("*")) if p.is_file()}
                self.events.append(("rename", Path(dst), published))
                real(src, dst, *args, **kwargs)

            return move

        monkeypatch.setattr(os, "fsync", logged_fsync)
        monkeypatch.setattr(os, "replace", logged(replace))
        monkeypatch.setattr(os, "rename", logged(rename))

    def assert_durable(self, final: Path) -> None:
        """Every file a rename published was fsynced before it, with the bytes it was published with, and
        the directory that received `final` was fsynced after the last such rename."""
        renames = [  # to a final name: an old directory moved aside publishes nothing
            i
            for i, (kind, dst, _) in enumerate(self.events)
            if kind == "rename" and not dst.name.startswith(atomic.TMP_PREFIX)
        ]
        assert renames, "nothing was renamed into place"
        for i in renames:
            published = self.events[i][2]
            synced = {path: data for kind, path, data in self.events[:i] if kind == "fsync"}
            for path, data in published.items():
                assert path.resolve() in {p.resolve() for p in synced}, f"{path} renamed into place unsynced"
                assert synced[next(p for p in synced if p.resolve() == path.resolve())] == data, f"{path} changed"
        after = [path.resolve() for kind, path, _ in self.events[renames[-1] + 1 :] if kind == "fsync"]
        assert final.parent.resolve() in after, f"{final.parent} not fsynced after the rename"


def test_a_file_is_fsynced_before_its_rename_and_its_directory_after(tmp_path, monkeypatch):
    log = FileSystemLog(monkeypatch)
    atomic.write_text(tmp_path / "a.txt", "new")
    log.assert_durable(tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_text() == "new"


@pytest.mark.parametrize("existing", [False, True])
def test_every_file_of_a_directory_is_fsynced_before_its_rename_and_the_parent_after(tmp_path, monkeypatch, existing):
    final = tmp_path / "ckpt"
    if existing:
        write_dir(final, {"old.txt": "old"})
    log = FileSystemLog(monkeypatch)
    with atomic.atomic_dir(final) as tmp:
        write_dir(tmp, {"a.txt": "a", "b.bin": "b" * 10_000})
        write_dir(tmp / "model", {"weights": "w"})
    assert files(final) == {"a.txt": "a", "b.bin": "b" * 10_000, "model/weights": "w"}
    log.assert_durable(final)
    published = [data for kind, path, data in log.events if kind == "rename" and path == final]
    assert len(published) == 1 and len(published[0]) == 3  # the new directory's three files, each checked
