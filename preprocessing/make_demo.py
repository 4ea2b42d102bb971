"""Regenerate the committed demo data set (data/demo) from easy-vqa; run from the repository root:

    python -m preprocessing.make_demo

Writes data/demo/train.json (48 records) and data/demo/val.json (16 records), balanced over
answers, with the referenced 64x64 PNGs (a few hundred bytes each) under data/demo/images/
{train,val}/; a config uses train_path/val_path = data/demo/{train,val}.json and
image_dir = data/demo/images. Deterministic: rerunning gives identical files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from preprocessing.easy_vqa import build

DEMO_DIR = Path("data/demo")
LIMITS = {"train": 48, "val": 16}
SEED = 0


def main() -> dict[str, int]:
    """Rebuild from scratch, so images of an earlier build do not linger."""
    shutil.rmtree(DEMO_DIR / "images", ignore_errors=True)
    return build(DEMO_DIR, DEMO_DIR / "images", LIMITS, seed=SEED)


if __name__ == "__main__":
    main()
