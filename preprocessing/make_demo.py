"""The demo's data, from the easy-vqa package (offline, deterministic); run from the repository root.

    python -m preprocessing.make_demo            # data/easy_vqa_demo: what args/demo.yaml trains on
    python -m preprocessing.make_demo --sample   # regenerate the committed sample data/demo

data/easy_vqa_demo/ (gitignored; 1.2 MB in 1657 PNGs, built in 2-3 s; `python demo.py` builds it on
first use): 2000 train / 150 val records with their 64x64 images, balanced over answers. That many records
are what the tiny model needs to learn colours from the pixels (tests/integration/test_learning.py).

data/demo/ (committed): a 48 train / 16 val sample of the same records (the balanced sampler's
first picks, so every sample record is also in the demo set), with ~400-byte PNGs: the data the
tests train on, small enough for the repository.

Both are `preprocessing.easy_vqa.build` with seed 0; val images are never train images.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from pathlib import Path

from storage import atomic

DEMO_DIR = Path("data/easy_vqa_demo")
DEMO_LIMITS = {"train": 2000, "val": 150}
SAMPLE_DIR = Path("data/demo")
SAMPLE_LIMITS = {"train": 48, "val": 16}
SEED = 0


def build_into(out_dir: str | Path, limits: dict[str, int]) -> dict[str, int]:
    """out_dir/{split}.json and out_dir/images/{split}/, rebuilt from scratch so no earlier image lingers."""
    from preprocessing.easy_vqa import build  # needs the easy-vqa package: only when something is built

    out_dir = Path(out_dir)
    shutil.rmtree(out_dir / "images", ignore_errors=True)
    return build(out_dir, out_dir / "images", limits, seed=SEED)


def ensure_demo_data(out_dir: str | Path = DEMO_DIR) -> dict[str, int] | None:
    """Build the demo set unless it is there; its record counts if built now."""
    out_dir = Path(out_dir)
    return None if out_dir.is_dir() else _build_in_place(out_dir, DEMO_LIMITS)


def _build_in_place(out_dir: Path, limits: dict[str, int]) -> dict[str, int]:
    """Built beside out_dir and renamed into place: an interrupted build leaves nothing a run would take for data."""
    atomic.remove_leftovers(out_dir.parent, [out_dir.name])
    with atomic.atomic_dir(out_dir) as partial, contextlib.redirect_stdout(io.StringIO()):
        counts = build_into(partial, limits)  # redirected: the builder's lines name the temporary directory
    print(f"built {out_dir}: " + ", ".join(f"{n} {split}" for split, n in counts.items()) + " records")
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sample", action="store_true", help=f"regenerate the committed sample {SAMPLE_DIR}")
    args = parser.parse_args(argv)
    if args.sample:
        return build_into(SAMPLE_DIR, SAMPLE_LIMITS)
    return _build_in_place(DEMO_DIR, DEMO_LIMITS)  # replaces the one there


if __name__ == "__main__":
    main()
