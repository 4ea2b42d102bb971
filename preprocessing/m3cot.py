"""M3CoT (Hugging Face "LightChen2333/M3CoT") → COCONUT JSON; needs network access:

    python -m preprocessing.m3cot --out-dir D --image-dir I [--require-image] [--max-per-split N]

Record: question = the question and its options "(A) x (B) y"; steps = the rationale split into
sentences; answer = the option letter as the data set gives it ("A"). Images go to
I/{split}/{id}.png; rows without an image stay text-only unless --require-image is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from PIL import Image

from preprocessing.common import Record, format_choices, hf_main, split_sentences

DATASET = "LightChen2333/M3CoT"


def convert_row(row: Mapping[str, Any], idx: int) -> tuple[Record, Image.Image | None, str]:
    """One M3CoT row (id, question, choices, answer letter, rationale, image, domain, topic)."""
    record = {
        "question": format_choices(row["question"], row["choices"]),
        "steps": split_sentences(row.get("rationale")),
        "answer": row["answer"].strip(),
    }
    return record, row.get("image"), str(row["id"])


if __name__ == "__main__":
    hf_main(DATASET, convert_row)
