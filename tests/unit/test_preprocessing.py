"""Builders produce files the project's own reader accepts, with images in place and true steps."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from PIL import Image, ImageColor, ImageDraw

from dataset import DataError, load_records
from preprocessing import easy_vqa, gsm8k_mm, m3cot, scienceqa
from preprocessing.common import convert_rows, split_sentences, write_splits

ROOT = Path(__file__).resolve().parents[2]
# easy-vqa's shapes and colours, spelled out (not read off the builder under test). It draws each shape
# in one flat CSS colour, except "green", which it draws as lime.
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPE_RGB = {c: ImageColor.getrgb(c) for c in COLORS} | {"green": (0, 255, 0)}


def _check_images(records: list[dict], image_dir: Path) -> None:
    for r in records:
        assert (image_dir / r["image"]).is_file(), r["image"]


@pytest.fixture(scope="module")
def evqa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evqa")
    counts = easy_vqa.main(["--out-dir", str(out), "--image-dir", str(out / "img"), "--max-per-split", "26"])
    assert counts == {"train": 26, "val": 26, "test": 26}
    return out


def test_easy_vqa_splits_validate_and_are_balanced(evqa: Path) -> None:
    names = {}
    for split in ("train", "val", "test"):
        records = load_records(evqa / f"{split}.json")
        _check_images(records, evqa / "img")
        assert all(r["image"].startswith(f"{split}/") for r in records)
        names[split] = {Path(r["image"]).name for r in records}
        per_answer = collections.Counter(r["answer"] for r in records)
        assert len(per_answer) == 13 and max(per_answer.values()) - min(per_answer.values()) <= 1
    assert not names["train"] & names["val"]  # both come from the package's train images


def test_easy_vqa_steps_are_true_and_lead_to_the_answer(evqa: Path) -> None:
    for split in ("train", "val", "test"):
        for r in load_records(evqa / f"{split}.json"):
            query = easy_vqa.parse_question(r["question"])
            shape = next(s for s in SHAPES if f"a {s}." in r["steps"][0] + r["steps"][1])
            color = next(c for c in COLORS if c in r["steps"][0] + r["steps"][1])
            colors = sorted(Image.open(evqa / "img" / r["image"]).convert("RGB").getcolors(64 * 64), reverse=True)
            assert colors[1][1] == SHAPE_RGB[color], r  # the background is the commonest colour, the shape next
            if not query.yes_no:
                assert r["answer"] in r["steps"][-1] and r["answer"] == {"shape": shape, "color": color}[query.asks]
                continue
            present = query.named[query.asks] in (shape, color)
            assert r["steps"][-1].startswith("So there is a " if present else "So there is no "), r
            assert r["answer"] == ("yes" if present != query.negated else "no"), r


def test_easy_vqa_is_deterministic(evqa: Path, tmp_path: Path) -> None:
    def build(seed: int) -> str:
        out = tmp_path / str(seed)
        easy_vqa.build(out, out / "img", {"train": 26}, seed=seed)
        return (out / "train.json").read_text()

    first = (evqa / "train.json").read_text()
    assert build(0) == first
    assert build(1) != first


def test_image_facts_by_elimination() -> None:
    questions = ["is there a circle?", "is there not a triangle?", "what color is the shape?"]
    facts = easy_vqa.image_facts(questions, ["no", "yes", "red"], [7, 7, 7])
    assert facts == {7: {"shape": "rectangle", "color": "red"}}
    assert easy_vqa.image_facts(["is there a circle?"], ["no"], [3]) == {}  # shape still open
    with pytest.raises(DataError, match="contradictory"):
        easy_vqa.image_facts(["what shape is present?", "is there a circle?"], ["circle", "no"], [1, 1])


def test_gsm8k_mm_both_modes(tmp_path: Path) -> None:
    source = [
        {"question": "Tom has 3 apples and buys 4 more. How many?", "steps": ["<<3+4=7>>"], "answer": "7"},
        {"question": "A pen costs $1,200.50. What do 2 cost?", "steps": ["<<1200.50*2=2401>>"], "answer": "2401"},
        {"question": "Half of 10 is how much?", "steps": [], "answer": "5"},
    ]
    (tmp_path / "gsm.json").write_text(json.dumps(source))
    for mode in ("question", "numbers"):
        out = tmp_path / mode
        argv = ["--input", f"train={tmp_path / 'gsm.json'}", "--out-dir", str(out), "--image-dir", str(out / "img")]
        assert gsm8k_mm.main(argv + ["--mode", mode]) == {"train": 3}
        records = load_records(out / "train.json")
        _check_images(records, out / "img")
        assert [r["image"] for r in records] == ["train/0.png", "train/1.png", "train/2.png"]
        assert [(r["steps"], r["answer"]) for r in records] == [(s["steps"], s["answer"]) for s in source]
        for r in records:
            assert Image.open(out / "img" / r["image"]).getextrema()[0] < 128  # some text was drawn
    question = load_records(tmp_path / "question" / "train.json")
    assert {r["question"] for r in question} == {gsm8k_mm.INSTRUCTION}
    numbers = load_records(tmp_path / "numbers" / "train.json")
    assert numbers[1]["question"] == (
        "A pen costs $[N1]. What do [N2] cost?\nRead the values of [N1], [N2] from the image."
    )
    assert gsm8k_mm.mask_numbers(source[1]["question"])[1] == ["1,200.50", "2"]


def _picture(color: str) -> Image.Image:
    image = Image.new("RGB", (32, 24), "white")
    ImageDraw.Draw(image).ellipse((4, 4, 20, 20), fill=color)
    return image


def test_scienceqa_converter(tmp_path: Path) -> None:
    rows = [
        {
            "question": "Which is a mammal?",
            "choices": ["frog", "dog"],
            "answer": 1,
            "hint": "",
            "image": _picture("red"),
            "lecture": "Mammals have fur.",
            "solution": "A dog has fur. So it is a mammal.",
        },
        {
            "question": "Which is hotter?",
            "choices": ["ice", "fire", "snow"],
            "answer": 1,
            "hint": "Think.",
            "image": None,
            "lecture": "",
            "solution": "Fire burns!\n\nIce is cold.",
        },
        {
            "question": "What colour?",
            "choices": ["blue", "green"],
            "answer": 0,
            "hint": "Look at the ball.",
            "image": _picture("blue").convert("CMYK"),
            "lecture": "",
            "solution": "",
        },
    ]
    records = convert_rows(rows, scienceqa.convert_row, "val", tmp_path / "img")
    assert write_splits({"val": records}, tmp_path, tmp_path / "img") == {"val": 3}
    assert records[0] == {
        "question": "Which is a mammal?\nOptions: (A) frog (B) dog",
        "steps": ["A dog has fur.", "So it is a mammal."],
        "answer": "B",
        "image": "val/0.png",
    }
    assert records[1]["question"] == "Which is hotter?\nContext: Think.\nOptions: (A) ice (B) fire (C) snow"
    assert "image" not in records[1] and records[1]["steps"] == ["Fire burns!", "Ice is cold."]
    assert records[2]["image"] == "val/2.png" and records[2]["answer"] == "A" and records[2]["steps"] == []
    assert Image.open(tmp_path / "img" / "val" / "2.png").mode == "RGB"
    with_images = convert_rows(rows, scienceqa.convert_row, "val", tmp_path / "img", require_image=True)
    assert [r["image"] for r in with_images] == ["val/0.png", "val/2.png"]


def test_m3cot_converter(tmp_path: Path) -> None:
    rows = [
        {
            "id": "sci-1",
            "question": "What is shown?",
            "choices": ["a cat", "a ball"],
            "answer": "B",
            "rationale": "The object is round. Round toys are balls.",
            "image": _picture("green"),
            "domain": "science",
            "topic": "objects",
        },
        {
            "id": "math-7",
            "question": "How many?",
            "choices": ["1", "2"],
            "answer": "A",
            "rationale": "There is one circle.",
            "image": _picture("black"),
            "domain": "math",
            "topic": "counting",
        },
    ]
    records = convert_rows(rows, m3cot.convert_row, "train", tmp_path / "img")
    assert write_splits({"train": records}, tmp_path, tmp_path / "img") == {"train": 2}
    assert records[0] == {
        "question": "What is shown?\nOptions: (A) a cat (B) a ball",
        "steps": ["The object is round.", "Round toys are balls."],
        "answer": "B",
        "image": "train/sci-1.png",
    }
    assert records[1]["image"] == "train/math-7.png"


def test_write_splits_rejects_missing_images(tmp_path: Path) -> None:
    record = {"question": "q?", "steps": [], "answer": "a", "image": ["train/missing.png"]}
    with pytest.raises(DataError, match="missing.png"):
        write_splits({"train": [record]}, tmp_path, tmp_path / "img")
    with pytest.raises(DataError, match="question"):
        write_splits({"train": [{"question": "", "steps": [], "answer": "a"}]}, tmp_path, tmp_path / "img")


def test_split_sentences() -> None:
    assert split_sentences("It costs 3.5 dollars. Then what?  Done!\nNext line") == [
        "It costs 3.5 dollars.",
        "Then what?",
        "Done!",
        "Next line",
    ]
    assert split_sentences(None) == split_sentences("  \n ") == []


def test_committed_demo_data_validates() -> None:
    demo = ROOT / "data" / "demo"
    for split, n in (("train", 48), ("val", 16)):
        records = load_records(demo / f"{split}.json")
        assert len(records) == n
        _check_images(records, demo / "images")
    images = list((demo / "images").rglob("*.png"))
    assert len(images) <= 64 and sum(p.stat().st_size for p in images) < 100_000
