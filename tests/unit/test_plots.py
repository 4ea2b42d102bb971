"""curves.png: what each panel draws, where stage boundaries go, the atomic write, and the one note
when matplotlib is missing."""

from __future__ import annotations

import json
import sys

from PIL import Image

from training.plots import CURVES_FILE, Curves, draw, stage_boundaries

# 2 epochs of 2 steps at stage 0, then one epoch at stage 1 (thoughts from then on)
STEPS = [
    {"step": 1, "epoch": 0.5, "stage": 0, "loss": 4.0, "token_embedding_norm": 1.0},
    {"step": 2, "epoch": 1.0, "stage": 0, "loss": 3.0, "token_embedding_norm": 1.1},
    {"step": 3, "epoch": 1.5, "stage": 0, "loss": 2.5, "token_embedding_norm": 1.2},
    {"step": 4, "epoch": 2.0, "stage": 0, "loss": 2.0, "token_embedding_norm": 1.3},
    {"step": 5, "epoch": 2.5, "stage": 1, "loss": 2.2, "token_embedding_norm": 1.4, "thought_norm": 9.0},
    {"step": 6, "epoch": 3.0, "stage": 1, "loss": 1.8, "token_embedding_norm": 1.5, "thought_norm": 9.5},
]
METRICS = [
    {"epoch": 1, "stage": 0, "train_loss": 3.5, "val_loss": 3.2, "accuracy": 0.0},
    {"epoch": 2, "stage": 0, "train_loss": 2.25, "val_loss": 2.4, "accuracy": 0.25},
    {"epoch": 3, "stage": 1, "train_loss": 2.0, "val_loss": 2.1, "accuracy": 0.5},
]


def test_stage_boundaries_come_from_both_files():
    assert stage_boundaries(METRICS, STEPS) == [(0.0, 0), (2.0, 1)]
    assert stage_boundaries(METRICS, []) == [(0.0, 0), (2.0, 1)]
    assert stage_boundaries([], STEPS[4:]) == [(2.0, 1)]  # a run resumed into its third epoch
    # an epoch evaluated but not yet in the step log (a log_every that skips it) still counts
    skipped = METRICS[:1] + [{"epoch": 2, "stage": 1, "accuracy": 0.0}]
    assert stage_boundaries(skipped, STEPS[:2]) == [(0.0, 0), (1.0, 1)]


def test_each_panel_draws_its_data_with_the_stage_boundaries():
    from matplotlib.figure import Figure

    figure = Figure()
    draw(figure, METRICS, STEPS)
    loss, accuracy, norms = figure.axes

    def lines(axes):
        return {
            line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in axes.get_lines()
            if not line.get_label().startswith("_")
        }

    assert lines(loss) == {
        "train (step)": ([0.5, 1.0, 1.5, 2.0, 2.5, 3.0], [4.0, 3.0, 2.5, 2.0, 2.2, 1.8]),
        "train (epoch mean)": ([0.5, 1.5, 2.5], [3.5, 2.25, 2.0]),
        "validation": ([1, 2, 3], [3.2, 2.4, 2.1]),
    }
    assert lines(accuracy) == {"accuracy": ([1, 2, 3], [0.0, 0.25, 0.5])}
    assert lines(norms) == {
        "token embedding norm": ([0.5, 1.0, 1.5, 2.0, 2.5, 3.0], [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]),
        "thought norm": ([2.5, 3.0], [9.0, 9.5]),
    }
    for axes in (loss, accuracy, norms):
        boundaries = [list(line.get_xdata()) for line in axes.get_lines() if line.get_label().startswith("_")]
        assert boundaries == [[2.0, 2.0]]  # axvline: one vertical line where stage 1 starts
        assert [text.get_text() for text in axes.texts] == ["stage 0", "stage 1"]


def test_curves_are_written_whole(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in METRICS))
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(s) + "\n" for s in STEPS) + '{"step": 7, "ep')
    notes = []
    path = Curves(tmp_path, "metrics.jsonl", "train_log.jsonl", notes.append).update()
    assert path == tmp_path / CURVES_FILE and notes == []
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", (1500, 420))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CURVES_FILE, "metrics.jsonl", "train_log.jsonl"]


def test_without_matplotlib_one_note_and_no_picture(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # what `import` finds: ImportError, as when not installed
    (tmp_path / "metrics.jsonl").write_text(json.dumps(METRICS[0]) + "\n")
    notes = []
    curves = Curves(tmp_path, "metrics.jsonl", "train_log.jsonl", notes.append)
    assert curves.update() is None and curves.update() is None
    assert notes == [f"note: matplotlib is not installed: no {CURVES_FILE} (pip install matplotlib)"]
    assert not (tmp_path / CURVES_FILE).exists()


def test_an_evaluation_before_any_logged_step_draws_without_warnings(tmp_path, recwarn):
    """An eval-first resume (its epoch saved, never evaluated) with no train_log.jsonl lines yet."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in METRICS))  # a stage line, no norms
    assert Curves(tmp_path, "metrics.jsonl", "train_log.jsonl", print).update() == tmp_path / CURVES_FILE
    assert [str(w.message) for w in recwarn] == []
