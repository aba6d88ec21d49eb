"""Server throughput and latency under concurrent load, beside the same server taking one request at a time.

A random-weight GPT-2 124M (published layout) is served on 127.0.0.1 by `gpt2lite serve`
in a second process, twice: with continuous batching (--max-batch rows) and with
--max-batch 1 (one request at a time, the rest queued). At each concurrency, that many streaming
clients send requests of a 32-token prompt and --new greedy tokens until --requests
have finished (bounded in count and time). Prints generated tokens/s over the whole
run and the p50/p95 latency of a request (sent to last token), and the ratio.

    python benchmarks/bench_serve.py [--concurrency 1 8 32] [--new 64] [--max-batch 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model_dir: str, max_batch: int):
    """`gpt2lite serve` in its own process on 127.0.0.1; yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "gpt2lite", "serve", "--model", model_dir, "--port", str(port),
               "--max-batch", str(max_batch), "--max-queue", "1024", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def generated_tokens(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith("gpt2lite_generated_tokens_total ")))


async def load(url: str, concurrency: int, requests: int, new: int) -> tuple[float, list[float], int]:
    """Run ``requests`` streaming requests, ``concurrency`` at a time: (wall seconds, latencies, tokens)."""
    prompts = [torch.randint(0, 50257, (32,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(requests)]
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    latencies: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            prompt = queue.get_nowait()
            t0 = time.perf_counter()
            body = {"model": "gpt2", "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True}
            async with http.stream("POST", url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data:") and "[DONE]" not in line:
                        tokens += 1 if '"text"' in line else 0
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.wait_for(asyncio.gather(*(client(http) for _ in range(concurrency))), timeout=1200)
    return time.perf_counter() - t0, latencies, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()

    from gpt2lite import GPT2, GPT2Config

    tmp = tempfile.TemporaryDirectory()
    torch.manual_seed(0)
    GPT2(GPT2Config.from_preset("gpt2")).save_pretrained(tmp.name)

    print(f"server in its own process, torch threads there: {torch.get_num_threads()}; prompt=32 new={args.new} "
          "greedy, streaming clients; tokens/s = generated tokens / wall time")
    for c in args.concurrency:
        results = {}
        for name, max_batch in (("batched", args.max_batch), ("one at a time", 1)):
            requests = max(4, 2 * c) if max_batch > 1 else max(4, c)
            with serving(tmp.name, max_batch) as url:
                wall, latencies, _ = asyncio.run(load(url, c, requests, args.new))
                done = generated_tokens(url)
            q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
            results[name] = done / wall
            print(f"  concurrency {c:2d} {name:>14}: {done / wall:6.1f} tok/s, latency p50 "
                  f"{statistics.median(latencies):5.2f} s p95 {q[18]:5.2f} s ({requests} requests)")
        print(f"  concurrency {c:2d} ratio: {results['batched'] / results['one at a time']:.2f}x")


if __name__ == "__main__":
    main()
