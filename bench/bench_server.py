"""What dynamic batching buys the server: `python -m bench.bench_server CHECKPOINT [--requests N] [--out FILE]`.

Starts `run.py --serve CHECKPOINT` twice as a subprocess on a free loopback port: batched (--max-batch 16)
and one at a time (--max-batch 1). Against each, clients at concurrency 1, 4 and 16 (threads, each its own
connection) ask the demo val questions with their images as data: URLs until N requests are answered;
requests/s and latency p50/p90/p99 per (mode, concurrency), plus the mean generate batch the server
ran (from GET /health). One JSON line per measurement, with the raw latencies, into --out; a table on
stdout with batched / one-at-a-time throughput. Every answer is checked against the first one-at-a-time
answer of the same question: batching must not change it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

import httpx

from storage import atomic

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
MODES = {"one_at_a_time": 1, "batched": 16}
CONCURRENCY = (1, 4, 16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: str, max_batch: int, max_wait_ms: float) -> tuple[subprocess.Popen, str]:
    """`run.py --serve` as a subprocess; its base URL once GET /health answers (within 300 s)."""
    port = free_port()
    argv = [sys.executable, str(REPO / "run.py"), "--serve", checkpoint, "--port", str(port), "--model-name", "m"]
    argv += ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--max-queue", "64"]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"server did not start: {' '.join(argv)}")


def bodies() -> list[dict[str, Any]]:
    """One chat request per demo val record: its image as a data: URL, its question."""
    records = json.loads((DEMO / "val.json").read_text())
    out = []
    for r in records:
        image = base64.b64encode((DEMO / "images" / r["image"]).read_bytes()).decode()
        content = [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            {"type": "text", "text": r["question"]},
        ]
        out.append({"model": "m", "messages": [{"role": "user", "content": content}]})
    return out


def measure(url: str, requests: list[dict[str, Any]], concurrency: int) -> tuple[float, list[float], list[str]]:
    """Wall time, each request's latency (s) and answer, for the requests sent by `concurrency` clients."""
    clients = [httpx.Client(timeout=300) for _ in range(concurrency)]

    def one(i: int) -> tuple[float, str]:
        start = time.perf_counter()
        response = clients[i % concurrency].post(f"{url}/v1/chat/completions", json=requests[i])
        response.raise_for_status()
        return time.perf_counter() - start, response.json()["choices"][0]["message"]["content"]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(len(requests))))
    wall = time.perf_counter() - start
    for c in clients:
        c.close()
    return wall, [r[0] for r in results], [r[1] for r in results]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--requests", type=int, default=48, help="requests per (mode, concurrency)")
    parser.add_argument("--max-wait-ms", type=float, default=0.0, help="the batched server's wait for batch-mates")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"cpu-server-{date.today()}.jsonl")
    args = parser.parse_args(argv)
    pool = bodies()
    requests = [pool[i % len(pool)] for i in range(args.requests)]
    lines, reference, throughput = [], {}, {}
    for mode, max_batch in MODES.items():
        process, url = start_server(args.checkpoint, max_batch, args.max_wait_ms)
        try:
            measure(url, pool[:4], 4)  # warm-up: first-call costs (allocations, lazy imports) not timed
            for concurrency in CONCURRENCY:
                before = httpx.get(f"{url}/health", timeout=10).json()
                wall, latencies, answers = measure(url, requests, concurrency)
                after = httpx.get(f"{url}/health", timeout=10).json()
                for i, answer in enumerate(answers):
                    if reference.setdefault(i % len(pool), answer) != answer:
                        raise SystemExit(f"{mode} c={concurrency}: request {i}'s answer differs from the reference")
                batches = after["batches"] - before["batches"]
                line = {
                    "bench": "server",
                    "mode": mode,
                    "max_batch": max_batch,
                    "max_wait_ms": args.max_wait_ms if max_batch > 1 else 0,
                    "concurrency": concurrency,
                    "requests": len(requests),
                    "requests_per_s": len(requests) / wall,
                    "p50_ms": 1e3 * percentile(latencies, 50),
                    "p90_ms": 1e3 * percentile(latencies, 90),
                    "p99_ms": 1e3 * percentile(latencies, 99),
                    "mean_batch": len(requests) / max(batches, 1),
                    "latencies_ms": [round(1e3 * t, 2) for t in latencies],
                    "checkpoint": args.checkpoint,
                    "host": platform.node(),
                    "cpus": os.cpu_count(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                }
                lines.append(line)
                throughput[mode, concurrency] = line["requests_per_s"]
                print(
                    f"{mode:>14} c={concurrency:<3} {line['requests_per_s']:7.2f} req/s  p50 {line['p50_ms']:7.1f} ms  "
                    f"p90 {line['p90_ms']:7.1f}  p99 {line['p99_ms']:7.1f}  mean batch {line['mean_batch']:.1f}",
                    flush=True,
                )
        finally:
            process.terminate()
            process.wait(timeout=60)
    for concurrency in CONCURRENCY:
        ratio = throughput["batched", concurrency] / throughput["one_at_a_time", concurrency]
        print(f"concurrency {concurrency}: batched / one-at-a-time throughput = {ratio:.2f}x")
    previous = args.out.read_text() if args.out.exists() else ""
    atomic.write_text(args.out, previous + "".join(json.dumps(line) + "\n" for line in lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
