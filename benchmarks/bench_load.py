"""Checkpoint load time and peak memory: gpt2lite beside a raw safetensors load of the same file.

A random-weight GPT-2 124M checkpoint is written in the hub layout to a temporary
directory; then, alternating, fresh child processes load it with
`safetensors.torch.load_file` (the floor: just reading the file into tensors),
`GPT2.from_pretrained`, and `transformers` `GPT2LMHeadModel.from_pretrained`.
Each child reports its load time and how much its peak RSS (VmHWM) grew during the load;
the raw load touches every tensor, since safetensors maps the file lazily.

    python benchmarks/bench_load.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
mode, path = sys.argv[1], sys.argv[2]
if mode == "transformers":
    import transformers
    transformers.logging.set_verbosity_error()
from safetensors.torch import load_file
from gpt2lite import GPT2
def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
before = hwm_mb()
t0 = time.perf_counter()
if mode == "raw":
    obj = load_file(path + "/model.safetensors")
    for t in obj.values():  # safetensors maps the file lazily: touch every byte so it is really read
        t.sum()
elif mode == "gpt2lite":
    obj = GPT2.from_pretrained(path)
else:
    obj = transformers.GPT2LMHeadModel.from_pretrained(path)
dt = time.perf_counter() - t0
peak = hwm_mb() - before
t0 = time.perf_counter()
if mode != "raw":  # the first forward pays for the pages a lazy load did not read yet
    with torch.no_grad():
        obj(torch.zeros(1, 1, dtype=torch.long))
first = time.perf_counter() - t0
print(json.dumps({"s": dt, "peak_mb": peak, "first_s": first}))
"""

MODES = ("raw", "gpt2lite", "transformers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import torch

    from gpt2lite import GPT2, GPT2Config

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        GPT2(GPT2Config.from_preset("gpt2")).save_pretrained(tmp)
        size_mb = (Path(tmp) / "model.safetensors").stat().st_size / 2**20
        results: dict[str, list[dict]] = {m: [] for m in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                out = subprocess.run([sys.executable, "-c", CHILD, mode, tmp], capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(out.stderr)
                results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))

    print(f"GPT-2 124M fp32 checkpoint, {size_mb:.0f} MiB, {args.rounds} rounds, medians")
    raw_s = statistics.median(r["s"] for r in results["raw"])
    for mode in MODES:
        s = statistics.median(r["s"] for r in results[mode])
        peak = statistics.median(r["peak_mb"] for r in results[mode])
        first = statistics.median(r["first_s"] for r in results[mode])
        print(
            f"{mode:>13}: load {s * 1000:7.1f} ms ({s / raw_s:5.2f}x raw), peak RSS growth {peak:4.0f} MiB"
            + (f", then first 1-token forward {first * 1000:6.1f} ms" if mode != "raw" else "")
        )


if __name__ == "__main__":
    main()
