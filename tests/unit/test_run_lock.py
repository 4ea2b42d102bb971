"""One run per run directory: the lock refuses a second holder, names the first, takes over a dead one's."""

from __future__ import annotations

import os

import pytest

from storage.run_lock import LOCK_FILE, run_lock
from utils import CheckpointError


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    save_dir = tmp_path / "runs" / "a"
    with run_lock(save_dir, True, print):
        assert f"pid {os.getpid()}" in (save_dir / LOCK_FILE).read_text()
        with pytest.raises(
            CheckpointError, match=rf"another run is using this run directory \(host .* pid {os.getpid()}\)"
        ):
            with run_lock(save_dir, True, print):
                pass
    assert not (save_dir / LOCK_FILE).exists()  # released: nothing left in the run directory
    with run_lock(save_dir, True, print):
        pass


def test_a_dead_runs_lock_is_taken_over_with_a_line(tmp_path):
    (tmp_path / LOCK_FILE).write_text("host elsewhere pid 999999\n")
    said = []
    with run_lock(tmp_path, True, said.append):
        assert (tmp_path / LOCK_FILE).read_text().endswith(f"pid {os.getpid()}\n")
    assert (
        len(said) == 1
        and "taking over the lock of a run that ended without releasing it (host elsewhere pid 999999)" in said[0]
    )


def test_a_run_directory_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(CheckpointError, match="the run directory .* is a file"):
        with run_lock(tmp_path / "run", True, print):
            pass
