"""``prepare_data`` on a large corpus: 1 worker against N, beside tiktoken on the same text, in one run.

The corpus (outside the repository; built once) is Python's own source code and
the documentation topics that ship with it, in files of about 4 MB. Each round
prepares it with 1 worker, then with ``--workers``, then with ``--workers`` and the
tiktoken fast path (``gpt2lite prepare --fast``), then encodes it with tiktoken
itself (one thread, then ``--workers`` threads); the script checks that all give the same
tokens and prints the time and MB/s of each, and the ratio of N workers to 1.

    python benchmarks/bench_prepare.py [--mb 100] [--workers 2] [--corpus /tmp/gpt2lite-corpus] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from gpt2lite import Tokenizer, prepare_data
from gpt2lite.tokenizers.fast import TiktokenTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from oracles import tiktoken_gpt2


def build_corpus(folder: Path, megabytes: float) -> list[Path]:
    """Files of about 4 MB of Python source and documentation, ``megabytes`` in all (reused if already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("part-*.txt"))
    if existing and sum(p.stat().st_size for p in existing) >= megabytes * 1e6:
        return existing
    from pydoc_data.topics import topics

    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    sources = (p for root in roots for p in sorted(root.rglob("*.py")))
    target, size, part, parts = int(megabytes * 1e6), 0, [], []
    docs = "\n\n".join(topics[k] for k in sorted(topics))
    for source in sources:
        try:
            text = source.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        part.append(text)
        size += len(text.encode())
        if sum(map(len, part)) > 4_000_000 or size >= target:
            parts.append("".join(part) + docs[: 200_000])  # some prose in every file
            size += 200_000
            part = []
        if size >= target:
            break
    for i, text in enumerate(parts):
        (folder / f"part-{i:03d}.txt").write_text(text, encoding="utf-8")
    return sorted(folder.glob("part-*.txt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--corpus", default=os.path.join(tempfile.gettempdir(), "gpt2lite-corpus"))
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    files = build_corpus(Path(args.corpus), args.mb)
    texts = [p.read_text(encoding="utf-8") for p in files]
    nbytes = sum(len(t.encode()) for t in texts)
    enc = tiktoken_gpt2()
    print(f"corpus: {nbytes / 1e6:.1f} MB in {len(files)} files ({args.corpus})")
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        results = {}
        runs = (("gpt2lite, 1 worker", 1, Tokenizer), (f"gpt2lite, {args.workers} workers", args.workers, Tokenizer),
                (f"--fast, {args.workers} workers", args.workers, TiktokenTokenizer))
        for name, workers, kind in runs:
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                data = prepare_data(args.corpus, out, workers=workers, tokenizer=kind.gpt2())
                times.setdefault(name, []).append(time.perf_counter() - t0)
                results[name] = np.asarray(data.tokens)
                del data
        t0 = time.perf_counter()
        ids = [t for text in texts for t in [*enc.encode_ordinary(text), 50256]]
        times.setdefault("tiktoken, 1 thread", []).append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        batch = enc.encode_ordinary_batch(texts, num_threads=args.workers)
        times.setdefault(f"tiktoken, {args.workers} threads", []).append(time.perf_counter() - t0)
        assert [t for row in batch for t in [*row, 50256]] == ids
        for name, tokens in results.items():
            assert tokens.tolist() == ids, f"{name}: tokens differ from tiktoken's"
    print(f"tokens: {len(ids):,}, equal in all ({args.rounds} rounds; best time of each)")
    best = {name: min(t) for name, t in times.items()}
    for name, seconds in best.items():
        print(f"{name:>24}: {seconds:7.1f} s  {nbytes / 1e6 / seconds:6.2f} MB/s")
    one, many = best["gpt2lite, 1 worker"], best[f"gpt2lite, {args.workers} workers"]
    print(f"{args.workers} workers / 1 worker: {many / one:.2f}x the time")


if __name__ == "__main__":
    main()
