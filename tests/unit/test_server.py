"""deploy.server's batcher and request checks, without a model: bounded queue, batches, a bad request alone."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from deploy.inference import Question
from deploy.server import Batcher, Job, RequestError, ServeOptions, checked_image, read_image
from tests.helpers.images import make_image
from utils import DataError


class Answers:
    """An answer function that records its batches, refuses questions containing "bad" with a DataError
    (as tokenization refuses a record) and waits for `release` before answering."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()

    def __call__(self, questions: Sequence[Question], top_k: int) -> list[dict]:
        assert self.release.wait(timeout=30)
        texts = [q.question for q in questions]
        self.batches.append(texts)
        if any("bad" in t for t in texts):
            raise DataError("<question>: record 0: refused")
        return [{"output": t.upper(), "top_k": top_k} for t in texts]


def test_batches_gather_waiting_jobs_and_a_bad_one_fails_alone():
    answers = Answers()
    batcher = Batcher(answers, ServeOptions(max_batch=3, max_wait_ms=10_000, max_queue=8))
    jobs = [Job(Question(q), k) for q, k in (("a", 1), ("bad", 2), ("c", 5), ("d", 1))]
    futures = [batcher.submit(job) for job in jobs]
    answers.release.set()
    assert futures[0].result(timeout=30) == {"output": "A", "top_k": 1}  # answered alone, as k asked: its own
    with pytest.raises(RequestError) as refused:
        futures[1].result(timeout=30)
    assert refused.value.status == 400 and "refused" in refused.value.message
    assert futures[2].result(timeout=30)["output"] == "C"
    batcher.close()  # drains the queue first
    assert futures[3].result(timeout=0)["output"] == "D"
    # The first batch of three failed on "bad", so its jobs were answered one by one; "d" came after.
    assert answers.batches == [["a", "bad", "c"], ["a"], ["bad"], ["c"], ["d"]]
    assert (batcher.batches, batcher.answered, batcher.submitted, batcher.finished) == (3, 3, 4, 4)


def test_a_full_queue_refuses_with_503():
    answers = Answers()
    batcher = Batcher(answers, ServeOptions(max_batch=1, max_wait_ms=0, max_queue=2))
    first = batcher.submit(Job(Question("a"), 1))
    while batcher.jobs.qsize():  # the worker has taken "a" and waits for release
        threading.Event().wait(0.01)
    queued = [batcher.submit(Job(Question(q), 1)) for q in "bc"]
    with pytest.raises(RequestError) as busy:
        batcher.submit(Job(Question("d"), 1))
    assert busy.value.status == 503 and "2 requests already queued" in busy.value.message
    answers.release.set()
    assert [f.result(timeout=30)["output"] for f in (first, *queued)] == ["A", "B", "C"]
    batcher.close()


def test_images_must_be_base64_data_urls_of_real_images_within_the_bound(tmp_path):
    import base64

    options = ServeOptions(max_image_bytes=10_000)
    make_image(8, 8).save(tmp_path / "a.png")
    png = (tmp_path / "a.png").read_bytes()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert read_image(url, options, "part") == png and checked_image(png, options, "part") == ".png"
    refusals = {
        "data:image/png,abc": "must be base64",
        "data:image/png;base64,!!!": "not valid base64",
        str(tmp_path / "a.png"): "--allow-local-images",
        "https://example.com/a.png": "--allow-remote-images",
    }
    for bad, words in refusals.items():
        with pytest.raises(RequestError, match=words):
            read_image(bad, options, "part")
    local = ServeOptions(allow_local_images=True)
    assert read_image(f"file://{tmp_path / 'a.png'}", local, "part") == png
    with pytest.raises(RequestError, match="not an image") as e:
        checked_image(b"plain text", options, "part")
    assert e.value.status == 400
    with pytest.raises(RequestError, match="over 10000 bytes") as e:
        checked_image(bytes(10_001), options, "part")
    assert e.value.status == 413
