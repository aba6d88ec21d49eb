"""Encode throughput of gpt2lite's pure-Python tokenizer beside tiktoken's, in one process.

Each round builds a fresh gpt2lite tokenizer (so its word cache starts cold:
first use included) and encodes the same few MB of mixed text as tiktoken,
alternating the two; it prints the median MB/s of each and their ratio.

    python benchmarks/bench_tokenizer.py [--mb 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

from gpt2lite import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from oracles import tiktoken_gpt2

MULTILINGUAL = [
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇫🇷 and more 😀😃😄",
    "Ελληνικά русский текст עברית العربية हिन्दी",
    "It's we've they're I'm you'll he'd DON'T   \n\n\t  spaces",
    "numbers 1234567890 3.14159 -42 1e10 0x1F 1,000,000",
]


def mixed_text(megabytes: float, seed: int = 0) -> str:
    """Python's own standard library (prose and code), spliced with multilingual lines."""
    rng = random.Random(seed)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng.shuffle(files)
    parts, size = [], 0
    target = int(megabytes * 1e6)
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        parts.append(rng.choice(MULTILINGUAL) * rng.randint(1, 20))
        size += len(text.encode())
        if size >= target:
            break
    return "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    text = mixed_text(args.mb)
    nbytes = len(text.encode())
    enc = tiktoken_gpt2()
    ours_mbs, ours_warm_mbs, tik_mbs = [], [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        tok = Tokenizer.gpt2()
        t1 = time.perf_counter()
        ours = tok.encode(text)
        t2 = time.perf_counter()
        theirs = enc.encode_ordinary(text)
        t3 = time.perf_counter()
        assert ours == theirs, "outputs differ"
        ours_mbs.append(nbytes / 1e6 / (t2 - t0))
        ours_warm_mbs.append(nbytes / 1e6 / (t2 - t1))
        tik_mbs.append(nbytes / 1e6 / (t3 - t2))

    ours, warm, tik = (statistics.median(x) for x in (ours_mbs, ours_warm_mbs, tik_mbs))
    print(f"text: {nbytes / 1e6:.2f} MB, {len(theirs)} tokens, {args.rounds} rounds, single thread")
    print(f"gpt2lite (fresh tokenizer, load included): {ours:6.2f} MB/s")
    print(f"gpt2lite (fresh tokenizer, encode only):   {warm:6.2f} MB/s")
    print(f"tiktoken encode_ordinary:                  {tik:6.2f} MB/s")
    print(f"ratio gpt2lite/tiktoken: {ours / tik:.2f}x (load included), {warm / tik:.2f}x (encode only)")


if __name__ == "__main__":
    main()
