"""Structured output's cost: constrained beside unconstrained decoding, the same model and run, alternating.

A random-weight GPT-2 124M (published layout) generates --new tokens per row at
batch 1 and 8, greedy, once free and once under a JSON schema (an array of
strings, at least 100: it cannot end before --new tokens); the free run
ignores the end token, so both make --new tokens. Prints the median tokens/s of each and
their ratio (the target: constrained >= 0.9x free).

    python benchmarks/bench_structured.py [--rounds 5] [--new 64] [--batch 1 8]
"""

from __future__ import annotations

import argparse
import platform

import torch
from timing import alternate

from gpt2lite import GPT2, GenerationOptions, GPT2Config, Tokenizer, generate

SCHEMA = {"type": "array", "items": {"type": "string"}, "minItems": 100}  # cannot end within --new tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_preset("gpt2")).eval()
    tokenizer = Tokenizer.gpt2()
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for batch in args.batch:
        prompt = torch.randint(0, 50257, (batch, args.prompt), generator=torch.Generator().manual_seed(1))
        free = GenerationOptions(max_new_tokens=args.new, ignore_eos=True, temperature=0)
        constrained = free.replace(ignore_eos=False, json_schema=SCHEMA)
        generate(model, prompt, constrained, tokenizer=tokenizer)  # warm: the vocabulary is built once
        medians = alternate({
            "free": lambda opts=free, p=prompt: generate(model, p, opts),
            "json_schema": lambda opts=constrained, p=prompt: generate(model, p, opts, tokenizer=tokenizer),
        }, args.rounds)
        rates = {name: batch * args.new / seconds for name, seconds in medians.items()}
        print(f"batch {batch}: free {rates['free']:.1f} tok/s, json_schema {rates['json_schema']:.1f} tok/s, "
              f"ratio {rates['json_schema'] / rates['free']:.3f}")


if __name__ == "__main__":
    main()
