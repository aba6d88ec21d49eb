"""Server throughput and latency under concurrent load: batching against one at a time, prefix cache against none.

A random-weight GPT-2 124M (published layout) is served on 127.0.0.1 by `gpt2lite serve`
in a second process, twice: with continuous batching (--max-batch rows) and with
--max-batch 1 (one request at a time, the rest queued). At each concurrency, that many streaming
clients send requests of a 32-token prompt and --new greedy tokens until --requests
have finished (bounded in count and time). Prints generated tokens/s over the whole
run, the p50/p95 latency of a request (sent to last token) and the time to its first
token, and the ratio.

With --shared-prefix N, every prompt is the same N-token few-shot prefix and a
32-token question of its own, and the two servers are the same but for
--no-prefix-cache: the cache's saving in time to first token and tokens/s.

    python benchmarks/bench_serve.py [--concurrency 1 8 32] [--new 64] [--max-batch 16] [--shared-prefix 512]
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
def serving(model_dir: str, max_batch: int, *extra: str):
    """`gpt2lite serve` in its own process on 127.0.0.1; yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "gpt2lite", "serve", "--model", model_dir, "--port", str(port),
               "--max-batch", str(max_batch), "--max-queue", "1024", "--device", "cpu",
               "--served-model-name", "gpt2", *extra]
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


async def load(url: str, concurrency: int, requests: int, new: int,
               prefix: list[int]) -> tuple[float, list[float], list[float]]:
    """Run ``requests`` streaming requests, ``concurrency`` at a time: (wall seconds, latencies, first-token times)."""
    prompts = [prefix + torch.randint(0, 50257, (32,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(requests)]
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    latencies: list[float] = []
    first: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            t0 = time.perf_counter()
            body = {"model": "gpt2", "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            seen_first = False
            async with http.stream("POST", url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not seen_first and line.startswith("data:") and '"text"' in line:
                        first.append(time.perf_counter() - t0)
                        seen_first = True
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.wait_for(asyncio.gather(*(client(http) for _ in range(concurrency))), timeout=1200)
    return time.perf_counter() - t0, latencies, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--shared-prefix", type=int, default=0,
                        help="prompts share a prefix of this many tokens: compare the prefix cache with none")
    args = parser.parse_args()

    from gpt2lite import GPT2, GPT2Config

    tmp = tempfile.TemporaryDirectory()
    torch.manual_seed(0)
    GPT2(GPT2Config.from_preset("gpt2")).save_pretrained(tmp.name)
    prefix = torch.randint(0, 50257, (args.shared_prefix,), generator=torch.Generator().manual_seed(-1)).tolist()
    if args.shared_prefix:
        servers = (("prefix cache", args.max_batch, ()), ("no cache", args.max_batch, ("--no-prefix-cache",)))
    else:
        servers = (("batched", args.max_batch, ()), ("one at a time", 1, ()))

    print(f"server in its own process, torch threads there: {torch.get_num_threads()}; prompt="
          f"{args.shared_prefix} shared + 32 own, new={args.new} greedy, streaming clients; "
          "tokens/s = generated tokens / wall time; TTFT = time to the first token")
    for c in args.concurrency:
        results = {}
        for name, max_batch, extra in servers:
            requests = max(4, 2 * c) if max_batch > 1 else max(4, c)
            with serving(tmp.name, max_batch, *extra) as url:
                wall, latencies, first = asyncio.run(load(url, c, requests, args.new, prefix))
                done = generated_tokens(url)
            q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
            results[name] = done / wall
            print(f"  concurrency {c:2d} {name:>14}: {done / wall:6.1f} tok/s, latency p50 "
                  f"{statistics.median(latencies):5.2f} s p95 {q[18]:5.2f} s, "
                  f"TTFT p50 {statistics.median(first):5.2f} s ({requests} requests)")
        a, b = (name for name, _, _ in servers)
        print(f"  concurrency {c:2d} ratio: {results[a] / results[b]:.2f}x")


if __name__ == "__main__":
    main()
