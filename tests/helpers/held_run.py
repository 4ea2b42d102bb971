"""run.py under torchrun with every rank's exit held until all ranks have finished:
`python -m tests.helpers.held_run CONFIG [KEY=VALUE ...]` with HELD_RUN_DIR set.

torchrun stops the other workers as soon as one exits with an error, so a test of what every rank does
before it exits (a refusal each rank prints) would race the launcher: rank 0 refuses and exits, and
rank 1 may be killed before it prints. Here each rank runs run.main to its end, records its exit status
in HELD_RUN_DIR/rank<RANK> and waits until every rank has recorded one (at most HOLD_S seconds) before
it exits with that status, so what each rank printed and returned is all there when torchrun ends.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import run
from storage.atomic import write_text

HOLD_S = 120  # a rank that never records (it crashed) does not hold the others for longer


def main(argv: list[str]) -> int:
    status = run.main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    records = Path(os.environ["HELD_RUN_DIR"])
    write_text(records / f"rank{os.environ['RANK']}", str(status))
    deadline = time.monotonic() + HOLD_S
    while len(list(records.glob("rank*"))) < int(os.environ["WORLD_SIZE"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
