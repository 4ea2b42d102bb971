"""GSM8K (COCONUT JSON) → a multimodal variant whose problem has to be read from an image.

    python -m preprocessing.gsm8k_mm --input train=gsm_train.json --input val=gsm_valid.json \\
        --input test=gsm_test.json --out-dir D --image-dir I [--mode question|numbers] [--max-per-split N]

Each input is a COCONUT-format file: the original's `bash preprocessing/gsm_icot.bash` writes
data/gsm_{train,valid,test}.json from iCoT's augmented GSM8K. Steps and answer are kept. Writes
D/{split}.json and renders I/{split}/{idx}.png (idx = the record's index in its input file), black
text on white, default Pillow font, wrapped to a fixed width. The shipped recipes read
data/gsm8k_mm/{train,val,test}.json and data/gsm8k_mm/images (args/cot_vl3_1b.yaml has the command).

Modes:
  question  the whole question is rendered; the text question is only the instruction
            "Solve the math problem in the image."
  numbers   only the numbers are rendered ("N1 = 48" per line); the text question is the original
            with each number replaced by its name [N1], [N2], ... and the line "Read the values of
            [N1], [N2] from the image.", so the model must read the values off the image.
"""

from __future__ import annotations

import argparse
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from preprocessing.common import Record, load_records, save_image, write_splits

INSTRUCTION = "Solve the math problem in the image."
# 1,200 and 3.5 are one number each; a sentence's final period is not part of it.
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
WRAP_CHARS = 60
FONT_SIZE = 16
MARGIN = 8


def render_text(lines: Sequence[str], wrap_chars: int = WRAP_CHARS, font_size: int = FONT_SIZE) -> Image.Image:
    """Grayscale image of the text, each line wrapped to wrap_chars characters (small PNGs)."""
    font = ImageFont.load_default(size=font_size)
    wrapped = [w for line in lines for w in (textwrap.wrap(line, wrap_chars) or [""])]
    line_height = font_size + 4
    width = max(int(font.getlength(w)) for w in wrapped) + 2 * MARGIN
    image = Image.new("L", (width, line_height * len(wrapped) + 2 * MARGIN), 255)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(wrapped):
        draw.text((MARGIN, MARGIN + i * line_height), line, fill=0, font=font)
    return image


def mask_numbers(question: str) -> tuple[str, list[str]]:
    """Replace each number by [N1], [N2], ...; returns the masked text and the numbers in order."""
    numbers: list[str] = []

    def name(match: re.Match[str]) -> str:
        numbers.append(match.group())
        return f"[N{len(numbers)}]"

    return NUMBER.sub(name, question), numbers


def convert(records: Sequence[Record], split: str, image_dir: str | Path, mode: str = "question") -> list[Record]:
    """Render each record's question (or its numbers) to <image_dir>/<split>/<idx>.png."""
    out = []
    for idx, record in enumerate(records):
        if mode == "question":
            question, lines = INSTRUCTION, [record["question"]]
        else:
            masked, numbers = mask_numbers(record["question"])
            names = [f"N{i}" for i in range(1, len(numbers) + 1)]
            question = masked
            if names:
                question += "\nRead the values of " + ", ".join(f"[{n}]" for n in names) + " from the image."
            lines = [f"{n} = {v}" for n, v in zip(names, numbers)] or ["(no numbers)"]
        image = save_image(render_text(lines), image_dir, split, f"{idx}.png")
        out.append({"question": question, "steps": list(record["steps"]), "answer": record["answer"], "image": image})
    return out


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", action="append", required=True, metavar="SPLIT=PATH", help="repeatable")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--image-dir", required=True)
    parser.add_argument("--mode", choices=("question", "numbers"), default="question")
    parser.add_argument("--max-per-split", type=int, default=None, help="keep the first N records of each input")
    args = parser.parse_args(argv)
    splits = {}
    for spec in args.input:
        split, sep, path = spec.partition("=")
        if not sep or not split or not path:
            parser.error(f"--input expects SPLIT=PATH, got {spec!r}")
        records = load_records(path)[: args.max_per_split]
        splits[split] = convert(records, split, args.image_dir, args.mode)
    return write_splits(splits, args.out_dir, args.image_dir)


if __name__ == "__main__":
    main()
