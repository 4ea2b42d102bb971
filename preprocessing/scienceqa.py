"""ScienceQA (Hugging Face "derek-thomas/ScienceQA") → COCONUT JSON; needs network access:

    python -m preprocessing.scienceqa --out-dir D --image-dir I [--require-image] [--max-per-split N]

Record: question = the question, its hint as "Context: ..." when there is one, and the options
"(A) x (B) y"; steps = the solution split into sentences (the lecture, generic background, is
left out); answer = the correct option's LETTER ("A"), as M3CoT's answers are, so both data sets
are scored the same way. Images go to I/{split}/{row index}.png (the data set has no id column);
rows without an image stay as text-only records unless --require-image is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from PIL import Image

from preprocessing.common import Record, format_choices, hf_main, letter, split_sentences

DATASET = "derek-thomas/ScienceQA"


def convert_row(row: Mapping[str, Any], idx: int) -> tuple[Record, Image.Image | None, str]:
    """One ScienceQA row (question, choices, answer index, hint, image, lecture, solution)."""
    record = {
        "question": format_choices(row["question"], row["choices"], row.get("hint")),
        "steps": split_sentences(row.get("solution")),
        "answer": letter(row["answer"]),
    }
    return record, row.get("image"), str(idx)


if __name__ == "__main__":
    hf_main(DATASET, convert_row)
