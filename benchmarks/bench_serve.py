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

With --loras N, one server holds N random LoRA adapters (rank 8, on --lora-targets)
and the runs alternate in it (twice each): every request on one adapter, the requests
spread over the N adapters (request i on adapter i mod N, so each batch mixes them),
and the base model alone; the ratio is N adapters against one.

    python benchmarks/bench_serve.py [--concurrency 1 8 32] [--new 64] [--max-batch 16] [--shared-prefix 512]
    python benchmarks/bench_serve.py --loras 4 --concurrency 8 [--lora-targets c_attn]
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
               prefix: list[int], models: tuple[str, ...] = ("gpt2",)) -> tuple[float, list[float], list[float]]:
    """Run ``requests`` streaming requests, ``concurrency`` at a time: (wall seconds, latencies, first-token times).

    Request ``i`` asks for ``models[i % len(models)]``.
    """
    prompts = [prefix + torch.randint(0, 50257, (32,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(requests)]
    queue: asyncio.Queue[tuple[list[int], str]] = asyncio.Queue()
    for i, p in enumerate(prompts):
        queue.put_nowait((p, models[i % len(models)]))
    latencies: list[float] = []
    first: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            prompt, model = queue.get_nowait()
            t0 = time.perf_counter()
            body = {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
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
    parser.add_argument("--loras", type=int, default=0,
                        help="serve this many LoRA adapters: requests on one of them, against spread over all")
    parser.add_argument("--lora-targets", default="c_attn", help="the adapters' layers (default: c_attn, PEFT's)")
    args = parser.parse_args()

    from gpt2lite import GPT2, GPT2Config

    tmp = tempfile.TemporaryDirectory()
    torch.manual_seed(0)
    GPT2(GPT2Config.from_preset("gpt2")).save_pretrained(tmp.name)
    if args.loras:
        loras(tmp.name, args)
        return
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


def loras(model_dir: str, args: argparse.Namespace) -> None:
    """One server holding ``args.loras`` adapters: every request on one, spread over all, the base alone."""
    from pathlib import Path

    from gpt2lite import GPT2, LoraConfig, add_lora, save_adapter

    flags = []
    for i in range(args.loras):
        model = add_lora(GPT2.from_pretrained(model_dir), LoraConfig(
            r=8, lora_alpha=16, target_modules=tuple(args.lora_targets.split(","))))
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)  # B starts at zero: give each adapter an effect of its own
        save_adapter(model, Path(model_dir) / f"lora{i}")
        flags += ["--lora", f"lora{i}={Path(model_dir) / f'lora{i}'}"]
    runs = (("one adapter", ("lora0",)), (f"{args.loras} adapters", tuple(f"lora{i}" for i in range(args.loras))),
            ("base alone", ("gpt2",)))
    print(f"server in its own process; {args.loras} LoRA adapters of rank 8 on {args.lora_targets}, prompt 32 "
          f"tokens, new={args.new} greedy, streaming clients; runs alternate in one server, twice each")
    with serving(model_dir, args.max_batch, *flags, "--max-loras", str(args.loras)) as url:
        for c in args.concurrency:
            requests = max(4, 2 * c)
            rates: dict[str, list[float]] = {name: [] for name, _ in runs}
            for _ in range(2):
                for name, models in runs:
                    before = generated_tokens(url)
                    wall, latencies, _ = asyncio.run(load(url, c, requests, args.new, [], models))
                    rates[name].append((generated_tokens(url) - before) / wall)
                    print(f"  concurrency {c:2d} {name:>12}: {rates[name][-1]:6.1f} tok/s, latency p50 "
                          f"{statistics.median(latencies):5.2f} s ({requests} requests)")
            one, many = (statistics.mean(rates[name]) for name, _ in runs[:2])
            print(f"  concurrency {c:2d} mean: one adapter {one:.1f} tok/s, {args.loras} adapters {many:.1f} tok/s, "
                  f"base {statistics.mean(rates['base alone']):.1f} tok/s; ratio {many / one:.2f}x")


if __name__ == "__main__":
    main()
