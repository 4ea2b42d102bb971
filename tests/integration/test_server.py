"""`run.py --serve`: the OpenAI-compatible server, asked with the official openai client.

The server runs as a subprocess on a free loopback port, serving the checkpoint test_inference's stage2
fixture trains; its answers are compared with deploy.inference (what --infer prints) for every demo val
record, asked one by one and by 16 clients at once. Every request has a timeout and every loop a bound;
the server is stopped with SIGTERM and must exit 0.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from deploy.inference import Inference
from tests.helpers.runs import REPO, scaled_timeout, subprocess_env
from tests.integration.test_inference import IMAGES, VAL, assert_same_thoughts, stage2  # noqa: F401 - fixture

MODEL = "demo-model"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`python run.py --serve CHECKPOINT --port P ...` as a subprocess, up once GET /health answers."""

    def __init__(self, checkpoint: Path, *args: str, startup_s: float = 180) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, str(REPO / "run.py"), "--serve", str(checkpoint), "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*argv, "--model-name", MODEL, *args],
            cwd=REPO,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + scaled_timeout(startup_s)
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        self.stop()
        raise AssertionError(f"server did not start: {self.process.stdout.read()[-3000:]}")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=120, max_retries=0)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> int:
        """SIGTERM, then the exit status (killed after 60 s: a server that does not stop fails the test)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            return -1


@pytest.fixture(scope="module")
def served(stage2):  # noqa: F811 - the imported fixture
    _, checkpoint, _ = stage2
    server = Served(checkpoint, "--max-batch", "16", "--max-wait-ms", "50")
    yield server, checkpoint
    assert server.stop() == 0, server.process.stdout.read()[-3000:]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def ask(client: openai.OpenAI, question: str, images: list[Path], top_k: int | None = 5):
    content = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in images]
    content.append({"type": "text", "text": question})
    extra = {"thought_top_k": top_k} if top_k else None
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], extra_body=extra
    )


def val_records() -> list[dict]:
    return json.loads(VAL.read_text())


def assert_same_reply(response, expected: dict) -> None:
    """A chat completion carries --infer's reply: output as the content, answer, latents, thoughts, usage."""
    choice = response.choices[0]
    assert choice.message.content == expected["output"]
    assert choice.finish_reason == expected["finish_reason"]
    coconut = response.model_extra["coconut"]
    assert (coconut["answer"], coconut["latents"]) == (expected["answer"], expected["latents"])
    assert_same_thoughts(coconut["thoughts"], expected["thoughts"])
    usage = response.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected["prompt_tokens"], expected["completion_tokens"])


@pytest.fixture(scope="module")
def infer_replies(stage2):  # noqa: F811 - the imported fixture
    """What --infer answers (deploy.inference, the code it runs) for every val record, asked alone."""
    _, checkpoint, _ = stage2
    model = Inference.load(checkpoint)
    return [model.ask(r["question"], images=[IMAGES / r["image"]]) for r in val_records()]


@pytest.mark.slow
def test_answers_equal_infer_on_every_val_record(served, infer_replies):
    server, checkpoint = served
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    for record, expected in zip(val_records(), infer_replies, strict=True):
        assert_same_reply(ask(client, record["question"], [IMAGES / record["image"]]), expected)
    plain = ask(client, val_records()[0]["question"], [IMAGES / val_records()[0]["image"]], top_k=None)
    assert "thoughts" not in plain.model_extra["coconut"]  # thoughts only when asked
    assert plain.choices[0].message.content == infer_replies[0]["output"]
    model = Inference.load(checkpoint)  # several images in one message, and none
    two = [IMAGES / r["image"] for r in val_records()[:2]]
    assert_same_reply(ask(client, "which colors?", two), model.ask("which colors?", images=two))
    assert_same_reply(ask(client, "what color is it?", []), model.ask("what color is it?"))


@pytest.mark.slow
def test_sixteen_concurrent_clients_get_the_serial_answers_in_shared_batches(served, infer_replies):
    server, _ = served
    records = val_records()
    assert len(records) == 16
    before = server.health()
    start = threading.Barrier(16, timeout=60)

    def one(i: int):
        client = server.client()
        start.wait()
        return ask(client, records[i]["question"], [IMAGES / records[i]["image"]])

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(16), timeout=scaled_timeout(300)))
    for response, expected in zip(responses, infer_replies, strict=True):
        assert_same_reply(response, expected)
    after = server.health()
    assert after["answered"] - before["answered"] == 16
    assert after["batches"] - before["batches"] < 16  # gathered: some requests shared a generate batch


@pytest.mark.slow
def test_every_bad_request_gets_its_4xx_and_the_server_keeps_serving(served, infer_replies, tmp_path):
    server, checkpoint = served
    client = server.client()
    record = val_records()[0]
    image = {"type": "image_url", "image_url": {"url": data_url(IMAGES / record["image"])}}
    text = {"type": "text", "text": record["question"]}
    not_image = "data:image/png;base64," + base64.b64encode(b"this is text, not a picture").decode()
    huge = "data:image/png;base64," + base64.b64encode(bytes(9 * 2**20)).decode()
    bad = {
        "unknown model": ({"model": "gpt-4o"}, 404, "not found"),
        "two turns": (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]},
            400,
            "exactly one user message",
        ),
        "system prompt": ({"messages": [{"role": "system", "content": "be brief"}]}, 400, "role 'user'"),
        "non-image": ({"content": [{"type": "image_url", "image_url": {"url": not_image}}, text]}, 400, "not an image"),
        "oversized image": ({"content": [{"type": "image_url", "image_url": {"url": huge}}, text]}, 413, "bytes"),
        "too many images": ({"content": [image] * 9 + [text]}, 400, "at most 8"),
        "too many tokens": ({"content": "red " * 3000}, 400, "tokens: at most 2048"),
        "local path": (
            {"content": [{"type": "image_url", "image_url": {"url": str(IMAGES / record["image"])}}, text]},
            400,
            "--allow-local-images",
        ),
        "remote url": (
            {"content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, text]},
            400,
            "--allow-remote-images",
        ),
        "no question": ({"content": [image]}, 400, "no question text"),
        "streaming": ({"stream": True}, 400, "streaming is not supported"),
        "sampling": ({"temperature": 0.7}, 400, "greedily"),
        "short max_tokens": ({"max_tokens": 3}, 400, "max_new_tokens"),
        "bad thought_top_k": ({"thought_top_k": 0}, 400, "thought_top_k"),
        "image placeholder in text": ({"content": [image, {"type": "text", "text": "<image> what?"}]}, 400, "<image>"),
    }
    for name, (change, status, words) in bad.items():
        body = {"model": MODEL, "messages": [{"role": "user", "content": [image, text]}]}
        if "content" in change:
            body["messages"] = [{"role": "user", "content": change.pop("content")}]
        body.update(change)
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == status, (name, response.text)
        assert words in response.json()["error"]["message"], (name, response.text)
    with pytest.raises(openai.NotFoundError):  # the official client raises on a 4xx as on OpenAI's own
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    malformed = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b'{"model": "demo-model", "messages": [',
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]["message"]
    assert_same_reply(ask(client, record["question"], [IMAGES / record["image"]]), infer_replies[0])


@pytest.mark.slow
def test_sigterm_drains_a_waiting_request_then_exits(stage2, infer_replies):  # noqa: F811 - the fixture
    _, checkpoint, _ = stage2
    server = Served(checkpoint, "--max-batch", "4", "--max-wait-ms", "3000")  # a request waits 3 s for mates
    record = val_records()[0]
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(ask, server.client(), record["question"], [IMAGES / record["image"]])
        deadline = time.monotonic() + 30
        while server.health()["pending"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.health()["pending"] == 1  # waiting for batch-mates when SIGTERM comes
        assert server.stop() == 0, server.process.stdout.read()[-3000:]
        assert_same_reply(waiting.result(timeout=60), infer_replies[0])
