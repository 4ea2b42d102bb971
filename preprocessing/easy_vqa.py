"""easy-vqa (PyPI, MIT) → COCONUT JSON with short reasoning steps that are true for each image.

    python -m preprocessing.easy_vqa --out-dir D --image-dir I [--max-per-split N] [--seed S]

Writes D/{train,val,test}.json and copies the referenced PNGs to I/{split}/{image_id}.png.

Splits: test is the package's test set. val is carved from the package's *train* set by holding
out whole images (a seeded shuffle of train image ids, --val-fraction of them), so val shares no
image with train; test images are separate files of their own.

Steps: easy-vqa has no rationales, but each image carries several questions (what shape/colour,
is there a ..., is there not a ...). Their answers together fix the image's shape and colour
(directly, or by elimination over the yes/no answers); images left ambiguous are dropped. Each
record then gets the fact not asked about, then the asked one, and for yes/no questions a
conclusion, e.g. "is there not a red shape?" → ["The shape is a circle.", "The circle is blue.",
"So there is no red shape."] → "yes". Words follow the data ("color", lowercase answers).

--max-per-split N samples N records per split balanced over answers (round-robin over answers,
seeded); without it every record is kept in source order.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import easy_vqa

from preprocessing.common import DataError, Record, copy_image, write_splits

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
ATTRIBUTES = {"shape": SHAPES, "color": COLORS}
_WORD = re.compile(r"[a-z]+")


@dataclasses.dataclass(frozen=True)
class Query:
    """What an easy-vqa question asks.

    asks: the attribute the answer is about. named: attribute → value the question mentions.
    For a yes/no question named[asks] is the value tested; for a "what" question the named
    value (if any) belongs to the other attribute ("what color is the triangle?").
    """

    asks: str
    yes_no: bool
    negated: bool
    named: dict[str, str]


def parse_question(text: str) -> Query:
    """Parse one of easy-vqa's question templates; anything else is a DataError."""
    words = _WORD.findall(text.lower())
    named = {attr: w for attr, values in ATTRIBUTES.items() for w in words if w in values}
    if words[0] == "what":
        return Query("color" if "color" in words else "shape", False, False, named)
    if len(named) != 1:
        raise DataError(f"easy-vqa question names {len(named)} attributes, expected 1: {text!r}")
    return Query(next(iter(named)), True, "not" in words or "no" in words, named)


def _truth(query: Query, answer: str) -> bool:
    """Whether the tested value is present (yes/no questions only)."""
    if answer not in ("yes", "no"):
        raise DataError(f"yes/no question answered {answer!r}")
    return (answer == "yes") != query.negated


def image_facts(
    questions: Sequence[str], answers: Sequence[str], image_ids: Sequence[int]
) -> dict[int, dict[str, str]]:
    """Per image: {"shape": ..., "color": ...} from all its questions; ambiguous images are left out."""
    known: dict[int, dict[str, set[str]]] = defaultdict(lambda: {a: set() for a in ATTRIBUTES})
    excluded: dict[int, dict[str, set[str]]] = defaultdict(lambda: {a: set() for a in ATTRIBUTES})
    for text, answer, image_id in zip(questions, answers, image_ids):
        query = parse_question(text)
        if query.yes_no:
            (known if _truth(query, answer) else excluded)[image_id][query.asks].add(query.named[query.asks])
            continue
        if answer not in ATTRIBUTES[query.asks]:
            raise DataError(f"image {image_id}: {text!r} answered {answer!r}")
        known[image_id][query.asks].add(answer)
        for attr, value in query.named.items():
            known[image_id][attr].add(value)
    facts = {}
    for image_id in sorted(set(image_ids)):
        fact = {}
        for attr, values in ATTRIBUTES.items():
            pos, neg = known[image_id][attr], excluded[image_id][attr]
            if len(pos) > 1 or pos & neg:
                raise DataError(f"image {image_id}: contradictory {attr} answers: {sorted(pos)} vs not {sorted(neg)}")
            candidates = pos or set(values) - neg
            if len(candidates) == 1:
                fact[attr] = candidates.pop()
        if len(fact) == len(ATTRIBUTES):
            facts[image_id] = fact
    return facts


def reasoning_steps(query: Query, fact: Mapping[str, str]) -> list[str]:
    """The other attribute, then the asked one (its step contains the answer), then a yes/no conclusion."""
    shape, color = fact["shape"], fact["color"]
    if query.asks == "color":
        steps = [f"The shape is a {shape}.", f"The {shape} is {color}."]
    else:
        steps = [f"The shape is {color}.", f"The {color} shape is a {shape}."]
    if query.yes_no:
        value = query.named[query.asks]
        thing = f"{value} shape" if query.asks == "color" else value
        present = fact[query.asks] == value
        steps.append(f"So there is a {thing}." if present else f"So there is no {thing}.")
    return steps


def question_type(question: str) -> str:
    """ "color", "shape" or "yes/no": the answer vocabulary a question draws from."""
    query = parse_question(question)
    return "yes/no" if query.yes_no else query.asks


def text_only_accuracy(train: Sequence[Mapping[str, str]], val: Sequence[Mapping[str, str]]) -> float:
    """The bar a model must clear to show it reads the image: val accuracy of the best guess from the
    question text alone, each question text's most frequent train answer (for a text train never has,
    its question type's). easy-vqa's questions come from a few templates, so a model that ignores
    the pixels can reach this, and no more, by learning the answer prior of each question."""
    by_text: dict[str, Counter[str]] = defaultdict(Counter)
    by_type: dict[str, Counter[str]] = defaultdict(Counter)
    for r in train:
        by_text[r["question"]][r["answer"]] += 1
        by_type[question_type(r["question"])][r["answer"]] += 1

    def guess(question: str) -> str:
        counts = by_text.get(question) or by_type[question_type(question)]
        return counts.most_common(1)[0][0]  # ties: the answer met first in train

    return sum(guess(r["question"]) == r["answer"] for r in val) / len(val)


@dataclasses.dataclass(frozen=True)
class _Item:
    question: str
    answer: str
    image_id: int


def balanced_sample(items: Sequence[_Item], n: int | None, rng: random.Random) -> list[_Item]:
    """n items, round-robin over answers (each answer's pool shuffled); all items when n is None."""
    if n is None or n >= len(items):
        return list(items)
    by_answer: dict[str, list[_Item]] = defaultdict(list)
    for item in items:
        by_answer[item.answer].append(item)
    pools = [by_answer[a] for a in sorted(by_answer)]
    for pool in pools:
        rng.shuffle(pool)
    chosen: list[_Item] = []
    for rank in range(max(len(p) for p in pools)):
        chosen += [p[rank] for p in pools if rank < len(p)][: n - len(chosen)]
        if len(chosen) == n:
            break
    rng.shuffle(chosen)
    return chosen


def _source(questions: tuple[list[str], list[str], list[int]]) -> tuple[list[_Item], dict[int, dict[str, str]]]:
    """Items of one package split whose image's facts are known, and those facts."""
    texts, answers, image_ids = questions
    facts = image_facts(texts, answers, image_ids)
    items = [_Item(t, a, i) for t, a, i in zip(texts, answers, image_ids) if i in facts]
    return items, facts


def build(
    out_dir: str | Path,
    image_dir: str | Path,
    limits: Mapping[str, int | None],
    seed: int = 0,
    val_fraction: float = 0.1,
) -> dict[str, int]:
    """Build the splits named in limits ("train", "val", "test"), each capped at its limit."""
    train_questions, test_questions = easy_vqa.get_train_questions(), easy_vqa.get_test_questions()
    train_items, train_facts = _source(train_questions)
    test_items, test_facts = _source(test_questions)
    train_ids = sorted(train_facts)
    random.Random(f"{seed}-val").shuffle(train_ids)
    val_ids = set(train_ids[: round(len(train_ids) * val_fraction)])
    train_paths, test_paths = easy_vqa.get_train_image_paths(), easy_vqa.get_test_image_paths()
    sources = {
        "train": ([it for it in train_items if it.image_id not in val_ids], train_facts, train_paths),
        "val": ([it for it in train_items if it.image_id in val_ids], train_facts, train_paths),
        "test": (test_items, test_facts, test_paths),
    }
    splits: dict[str, list[Record]] = {}
    for split, limit in limits.items():
        items, facts, paths = sources[split]
        records = []
        for item in balanced_sample(items, limit, random.Random(f"{seed}-{split}")):
            records.append(
                {
                    "question": item.question,
                    "steps": reasoning_steps(parse_question(item.question), facts[item.image_id]),
                    "answer": item.answer,
                    "image": copy_image(paths[item.image_id], image_dir, split, f"{item.image_id}.png"),
                }
            )
        splits[split] = records
    n_images = len(set(train_questions[2])) + len(set(test_questions[2]))
    print(f"images whose shape and color the questions fix: {len(train_facts) + len(test_facts)} of {n_images}")
    return write_splits(splits, out_dir, image_dir)


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", required=True, help="where train/val/test.json go")
    parser.add_argument("--image-dir", required=True, help="images go to <image-dir>/<split>/<id>.png")
    parser.add_argument("--max-per-split", type=int, default=None, help="records per split, balanced over answers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of train images held out as val")
    args = parser.parse_args(argv)
    limits = dict.fromkeys(("train", "val", "test"), args.max_per_split)
    return build(args.out_dir, args.image_dir, limits, args.seed, args.val_fraction)


if __name__ == "__main__":
    main()
