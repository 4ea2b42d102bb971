"""An OpenAI-compatible HTTP server that answers with the latent loop, exactly as `run.py --infer`.

    python run.py --serve checkpoints/demo/checkpoint_9 --port 8000
    POST /v1/chat/completions   GET /v1/models   GET /health

A plain server of the export (vLLM, lmdeploy) decodes without the continuous thoughts; this one loads the
checkpoint through deploy.inference.Inference (prompt format, stage, tiling, precision from the
checkpoint's coconut_config.yaml) and answers every request with Inference.ask_many, the code --infer
runs. Requests that arrive together are gathered by one worker thread into one generate batch (at most
max_batch, waiting at most max_wait_ms for batch-mates); a batched answer equals the one asked alone, as
evaluation's batches equal single records.

Starlette + uvicorn (both imported here, only by this mode): the request checks are written out below so
that every refusal is one OpenAI-style error body naming what is wrong.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import queue
import signal
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deploy.inference import Inference, Question
from utils import USER_ERRORS

MAX_THOUGHT_TOP_K = 20


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """The server's bounds; every one keeps a request or the queue from growing without limit."""

    max_batch: int = 16  # questions in one generate batch (1: one at a time)
    max_wait_ms: float = 0.0  # how long the first request of a batch waits for batch-mates (0: only those waiting)
    max_queue: int = 64  # requests waiting beyond it are refused with 503
    max_images: int = 8  # per request
    max_image_bytes: int = 8 * 2**20  # per image, decoded
    max_prompt_tokens: int = 2048  # the question's text tokens
    allow_local_images: bool = False  # file:// URLs and plain paths read the server's own files
    allow_remote_images: bool = False  # http(s) URLs make the server fetch what a client names
    model_name: str | None = None  # the name clients ask for (default: the checkpoint directory's name)


class RequestError(Exception):
    """A request the server refuses: an HTTP status and one line saying why."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclasses.dataclass
class Job:
    question: Question
    top_k: int
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


class Batcher:
    """One worker thread answering queued jobs in batches: up to max_batch jobs, gathered for at most
    max_wait seconds after the first. A batch that fails on a user error is answered job by job, so a bad
    request fails alone."""

    def __init__(
        self, answer: Callable[[Sequence[Question], int], list[dict[str, Any]]], options: ServeOptions
    ) -> None:
        self.answer, self.options = answer, options
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=options.max_queue)
        # GET /health: generate batches run, questions answered; requests taken and finished (the
        # event loop counts the first, the worker the second: each counter has one writer).
        self.batches = self.answered = self.submitted = self.finished = 0
        self.thread = threading.Thread(target=self._loop, name="coconut-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(503, f"server busy: {self.options.max_queue} requests already queued") from None
        self.submitted += 1
        return job.future

    def close(self) -> None:
        """Answer what is queued, then stop the worker."""
        self.jobs.put(None)
        self.thread.join()

    def _loop(self) -> None:
        while (first := self.jobs.get()) is not None:
            batch, deadline = [first], time.monotonic() + self.options.max_wait_ms / 1000
            stop = False
            while len(batch) < self.options.max_batch:  # the queued jobs join; more are awaited until deadline
                left = deadline - time.monotonic()
                try:
                    job = self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[Job]) -> None:
        try:
            self._answer(batch)
        finally:
            self.finished += len(batch)

    def _answer(self, batch: list[Job]) -> None:
        try:
            replies = self.answer([j.question for j in batch], max(j.top_k for j in batch))
        except USER_ERRORS as e:
            if len(batch) > 1:
                for job in batch:
                    self._answer([job])
                return
            batch[0].future.set_exception(RequestError(400, str(e)))
            return
        except Exception as e:  # noqa: BLE001 - handed to the waiting request (500), the worker goes on
            for job in batch:
                job.future.set_exception(e)
            return
        self.batches, self.answered = self.batches + 1, self.answered + len(batch)
        for job, reply in zip(batch, replies):
            job.future.set_result(reply)


def read_image(url: Any, options: ServeOptions, where: str) -> bytes:
    """An image_url's bytes: a data: URL (base64); file paths and http(s) URLs only where allowed."""
    if not isinstance(url, str) or not url:
        raise RequestError(400, f"{where}: image_url.url must be a non-empty string", "messages")
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError(400, f"{where}: a data: URL must be base64 (data:image/...;base64,...)", "messages")
        if len(payload) > options.max_image_bytes * 4 // 3 + 4:
            raise RequestError(413, f"{where}: image over {options.max_image_bytes} bytes", "messages")
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error as e:
            raise RequestError(400, f"{where}: data: URL is not valid base64 ({e})", "messages") from None
    if url.startswith(("http://", "https://")):
        if not options.allow_remote_images:
            raise RequestError(
                400, f"{where}: remote image URLs are refused (start the server with --allow-remote-images)", "messages"
            )
        try:
            with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - http(s) only, by the check above
                return response.read(options.max_image_bytes + 1)
        except OSError as e:
            raise RequestError(400, f"{where}: cannot fetch {url}: {e}", "messages") from None
    if not options.allow_local_images:
        raise RequestError(
            400,
            f"{where}: image_url must be a data: URL (local paths need --allow-local-images, "
            "remote URLs --allow-remote-images)",
            "messages",
        )
    path = Path(url.removeprefix("file://"))
    if not path.is_file():
        raise RequestError(400, f"{where}: image not found: {path}", "messages")
    with path.open("rb") as f:
        return f.read(options.max_image_bytes + 1)


def checked_image(data: bytes, options: ServeOptions, where: str) -> str:
    """The image's file suffix once PIL reads it as an image within the size bound."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > options.max_image_bytes:
        raise RequestError(413, f"{where}: image over {options.max_image_bytes} bytes", "messages")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
            return "." + (img.format or "img").lower()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise RequestError(400, f"{where}: not an image ({e})", "messages") from None


def parse_request(body: Any, server: Server, tmp: Path) -> tuple[Question, int | None]:
    """A chat-completions body as one question (its images written under tmp) and the thought top-k asked."""
    options, config = server.options, server.model.config
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    if body.get("model") != server.name:
        raise RequestError(404, f"model {body.get('model')!r} not found: this server serves {server.name!r}", "model")
    if body.get("stream"):
        raise RequestError(400, "streaming is not supported: the answer is sent whole", "stream")
    if body.get("n", 1) != 1:
        raise RequestError(400, "n must be 1: decoding is greedy, every choice would be the same", "n")
    for key, plain in (("temperature", 0), ("top_p", 1)):
        if body.get(key) not in (None, plain, float(plain)):
            raise RequestError(400, f"{key} must be {plain} or absent: this server decodes greedily", key)
    for key in ("max_tokens", "max_completion_tokens"):
        limit = body.get(key)
        if limit is not None and (not isinstance(limit, int) or limit < config.max_new_tokens):
            raise RequestError(
                400, f"{key} must be an integer >= {config.max_new_tokens}, the checkpoint's max_new_tokens", key
            )
    top_k = body.get("thought_top_k")
    if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k <= MAX_THOUGHT_TOP_K):
        raise RequestError(400, f"thought_top_k must be an integer from 1 to {MAX_THOUGHT_TOP_K}", "thought_top_k")
    messages = body.get("messages")
    if not isinstance(messages, list) or len(messages) != 1 or not isinstance(messages[0], dict):
        raise RequestError(
            400, "messages must hold exactly one user message: the model was trained on single questions", "messages"
        )
    message = messages[0]
    if message.get("role") != "user":
        raise RequestError(400, f"the one message must have role 'user', not {message.get('role')!r}", "messages")
    content = message.get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise RequestError(400, "message content must be a string or a list of content parts", "messages")
    texts, images = [], []
    for i, part in enumerate(parts):
        where = f"messages[0].content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            images.append((where, part["image_url"].get("url")))
        else:
            raise RequestError(400, f"{where}: expected a text or image_url part", "messages")
    question = "\n".join(texts)
    if not question.strip():
        raise RequestError(400, "the message has no question text", "messages")
    if images and not config.multimodal:
        raise RequestError(400, "this model is text-only (multimodal: false): it takes no images", "messages")
    if len(images) > options.max_images:
        raise RequestError(400, f"{len(images)} images: at most {options.max_images} per request", "messages")
    n_tokens = len(server.model.tokenizer(question, add_special_tokens=False)["input_ids"])
    if n_tokens > options.max_prompt_tokens:
        raise RequestError(400, f"question of {n_tokens} tokens: at most {options.max_prompt_tokens}", "messages")
    paths = []
    for n, (where, url) in enumerate(images):
        data = read_image(url, options, where)
        path = tmp / f"image_{n}{checked_image(data, options, where)}"
        path.write_bytes(data)
        paths.append(path)
    return Question(question, tuple(paths)), top_k


def completion(reply: dict[str, Any], name: str, top_k: int | None) -> dict[str, Any]:
    """The chat.completion object; the latent loop's answer, latents and (when asked) thoughts under "coconut"."""
    coconut: dict[str, Any] = {"answer": reply["answer"], "latents": reply["latents"]}
    if top_k is not None:  # the batch asked for the largest k of its requests: this one's first k
        coconut["thoughts"] = [thought[:top_k] for thought in reply["thoughts"]]
    prompt, generated = reply["prompt_tokens"], reply["completion_tokens"]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply["output"]},
                "finish_reason": reply["finish_reason"],
            }
        ],
        "usage": {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated},
        "coconut": coconut,
    }


class Server:
    """The loaded model, its batcher and the Starlette app that hands requests to it."""

    def __init__(self, model: Inference, name: str, options: ServeOptions) -> None:
        self.model, self.name, self.options = model, name, options
        self.batcher = Batcher(model.ask_many, options)
        self.draining = False

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.routing import Route

        @contextlib.asynccontextmanager
        async def lifespan(_app: Any):  # noqa: ANN202 - Starlette's lifespan protocol
            yield
            self.draining = True  # uvicorn has let the in-flight requests finish; answer what is queued
            await asyncio.to_thread(self.batcher.close)

        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ]
        return Starlette(routes=routes, lifespan=lifespan)

    async def chat(self, request: Any) -> Any:
        from starlette.concurrency import run_in_threadpool

        try:
            if self.draining:
                raise RequestError(503, "server shutting down")
            limit = self.options.max_images * (self.options.max_image_bytes * 4 // 3 + 1024) + 2**20
            declared = request.headers.get("content-length", "0")
            if not declared.isdigit() or int(declared) > limit:
                raise RequestError(413, f"request body over {limit} bytes")
            raw = await request.body()
            if len(raw) > limit:
                raise RequestError(413, f"request body over {limit} bytes")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"request body is not valid JSON: {e}") from None
            # The images live until the worker is done with them, even if the client goes away first.
            tmp = tempfile.TemporaryDirectory(prefix="coconut-serve-")
            try:
                question, top_k = await run_in_threadpool(parse_request, body, self, Path(tmp.name))
                job = Job(question, top_k or 1)
                future = self.batcher.submit(job)
            except BaseException:
                tmp.cleanup()
                raise
            future.add_done_callback(lambda _: tmp.cleanup())
            reply = await asyncio.wrap_future(future)
            return _json(200, completion(reply, self.name, top_k))
        except RequestError as e:
            kind = "invalid_request_error" if e.status < 500 else "server_error"
            return _json(e.status, {"error": {"message": e.message, "type": kind, "param": e.param, "code": None}})

    async def models(self, _request: Any) -> Any:
        return _json(200, {"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "coconut-vl"}]})

    async def health(self, _request: Any) -> Any:
        status = "draining" if self.draining else "ok"
        batcher = self.batcher
        counts = {
            "pending": batcher.submitted - batcher.finished,
            "batches": batcher.batches,
            "answered": batcher.answered,
        }
        return _json(503 if self.draining else 200, {"status": status, **counts})


def _json(status: int, content: dict[str, Any]) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(content, status_code=status)


def build_server(checkpoint: str | Path, options: ServeOptions = ServeOptions()) -> Server:
    """Load the checkpoint as --infer does and put a batcher in front of it."""
    model = Inference.load(checkpoint)
    name = options.model_name or Path(checkpoint).resolve().name
    return Server(model, name, options)


def main(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> int:
    """Serve a checkpoint until SIGTERM/SIGINT: uvicorn stops taking connections, lets the in-flight
    requests finish, then the batcher answers what is queued and the process exits 0."""
    import uvicorn

    server = build_server(checkpoint, ServeOptions(**options))
    print(f"serving {server.name!r} (stage {server.model.stage}) on http://{host}:{port}/v1", flush=True)
    # uvicorn drains on SIGTERM, then re-raises it to the handler it found: this one ends the process as a
    # planned stop (status 0) rather than as killed by the signal.
    signal.signal(signal.SIGTERM, _stopped)
    uvicorn.run(server.app(), host=host, port=port, log_level="warning")
    return 0


def _stopped(_signum: int, _frame: Any) -> None:
    raise SystemExit(0)
