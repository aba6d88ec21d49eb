"""Speculative decoding speed as a function of the draft's acceptance rate, beside plain greedy decoding.

Random weights cannot show real acceptance rates, so the drafts are made to span
them on a random-weight GPT-2 124M target (prompt 32, --new tokens, greedy, batch 1):

- the target itself: every proposal is accepted (the upper bound), at the full cost of a draft step;
- the target with its weights perturbed by noise: fewer proposals accepted, same cost;
- the target's first 6 of 12 blocks (distilgpt2's shape), sharing its embeddings: a cheaper draft.

Each runs alternately with plain greedy decoding in one process; medians. Prints tok/s,
the speed-up over plain decoding, the acceptance rate alpha and the draft's cost per
token relative to the target's, c. With k proposals per round, a round yields
(1 - alpha**(k+1)) / (1 - alpha) tokens for k draft steps and one verification, so
speculative decoding pays off where that exceeds k * c + v (v: the cost of verifying
k+1 tokens relative to one decode step; on a bandwidth-bound CPU about 1).

    python benchmarks/bench_speculative.py [--rounds 3] [--new 64] [--k 2 4]

With --prompt-lookup, prompt-lookup decoding (proposals copied from the text, no
draft model) on a GPT-2 trained on Python's documentation (quant_quality.py's
model, trained once into --work), on two workloads of held-out text: "copy", a
passage followed by its own first sentence again (the continuation can copy the
passage, as a quoting summary or an edit does), and "free", a passage's beginning
(the continuation is new text).

    python benchmarks/bench_speculative.py --prompt-lookup [--work runs/quant-quality] [--steps 600] [--k 2 4 8]
        [--prepack]

A verification feeds k+1 rows at once; on CPUs where MKL's product of 2 to 8 rows
is slow (AMD EPYC: 3 rows of the LM head take 3x one row), ``--prepack`` shows
the same runs with ``prepack()``'s oneDNN kernels.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from timing import alternate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--prompt-lookup", action="store_true", help="measure prompt lookup instead of drafts")
    parser.add_argument("--work", default="runs/quant-quality", help="--prompt-lookup: the trained model's folder")
    parser.add_argument("--steps", type=int, default=600, help="--prompt-lookup: training steps, if not trained yet")
    parser.add_argument("--prepack", action="store_true", help="--prompt-lookup: run the model prepacked")
    args = parser.parse_args()
    if args.prompt_lookup:
        prompt_lookup(args)
        return

    from gpt2lite import GPT2, GenerationOptions, GPT2Config, generate
    from gpt2lite.generation.speculative import speculative_generate

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        GPT2(GPT2Config.from_preset("gpt2")).save_pretrained(tmp)
        target = GPT2.from_pretrained(tmp)
    drafts = {"itself (alpha=1)": target}
    for sigma in (0.5, 2.0):
        noisy = copy.deepcopy(target)
        with torch.no_grad():
            for p in noisy.parameters():
                p.add_(torch.randn_like(p) * p.std() * sigma)
        drafts[f"perturbed x{sigma}"] = noisy
    half = GPT2(GPT2Config.from_preset("distilgpt2")).eval()
    half.load_state_dict({k: v for k, v in target.state_dict().items() if not k.startswith("h.") or
                          int(k.split(".")[1]) < 6})
    drafts["first 6 blocks"] = half

    ids = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(0))
    plain_opts = dict(max_new_tokens=args.new, temperature=0, ignore_eos=True)
    reference = generate(target, ids, **plain_opts)

    def step_time(model: GPT2) -> float:
        state = model.new_state(1, 64)
        with torch.inference_mode():
            model.feed(ids, state)
            times = []
            for t in range(16):
                t0 = time.perf_counter()
                model.feed(ids[:, t : t + 1], state)
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    target_step = step_time(target)
    print(f"threads={torch.get_num_threads()} prompt=32 new={args.new} greedy batch 1, {args.rounds} rounds, medians")
    for name, draft in drafts.items():
        cost = step_time(draft) / target_step
        for k in args.k:
            opts = GenerationOptions(num_draft_tokens=k, **plain_opts)
            stats: dict[str, int] = {}
            with torch.inference_mode():
                out, _ = speculative_generate(target, draft, ids, None, opts, None, stats)
            assert torch.equal(out, reference), "speculative greedy output differs from plain greedy"
            alpha = stats["accepted"] / max(1, stats["proposed"])
            medians = alternate({
                "plain": lambda: generate(target, ids, **plain_opts),
                "speculative": lambda d=draft, k=k: generate(target, ids, draft_model=d, num_draft_tokens=k,
                                                              **plain_opts),
            }, args.rounds)
            speed = {n: args.new / t for n, t in medians.items()}
            print(f"  draft {name:>18}, k={k}: alpha={alpha:.2f} c={cost:.2f} | plain {speed['plain']:5.1f} tok/s, "
                  f"speculative {speed['speculative']:5.1f} tok/s ({speed['speculative'] / speed['plain']:.2f}x)")



def prompt_lookup(args: argparse.Namespace) -> None:
    """Prompt lookup against plain greedy decoding, on text that copies and on text that does not."""
    from pathlib import Path

    from quant_quality import trained_model

    from gpt2lite import GPT2, GenerationOptions, generate, prepack
    from gpt2lite.generation.speculative import speculative_generate

    final, val = trained_model(Path(args.work), args.steps)
    model = prepack(GPT2.from_pretrained(final)) if args.prepack else GPT2.from_pretrained(final)
    starts = torch.linspace(0, len(val) - 400, 6).long().tolist()
    workloads = {
        "copy": [torch.cat([val[s : s + 96], val[s : s + 12]]) for s in starts],
        "free": [val[s : s + 64] for s in starts],
    }
    plain_opts = dict(max_new_tokens=args.new, temperature=0, ignore_eos=True)
    print(f"threads={torch.get_num_threads()} new={args.new} greedy batch 1, {len(starts)} prompts per workload, "
          f"{args.rounds} rounds, medians{', prepacked' if args.prepack else ''}")
    for name, prompts in workloads.items():
        for k in args.k:
            opts = GenerationOptions(prompt_lookup_num_tokens=k, **plain_opts)
            stats: dict[str, int] = {}
            for p in prompts:
                with torch.inference_mode():
                    out, _ = speculative_generate(model, None, p[None], None, opts, None, stats)
                assert torch.equal(out, generate(model, p[None], **plain_opts)), "differs from plain greedy"
            alpha = stats["accepted"] / max(1, stats["proposed"])
            per_round = (stats["accepted"] + stats["rounds"]) / stats["rounds"]
            medians = alternate({
                "plain": lambda ps=prompts: [generate(model, p[None], **plain_opts) for p in ps],
                "lookup": lambda ps=prompts, k=k: [generate(model, p[None], prompt_lookup_num_tokens=k, **plain_opts)
                                                   for p in ps],
            }, args.rounds)
            speed = {n: args.new * len(prompts) / t for n, t in medians.items()}
            print(f"  {name:>4}, k={k}: accepted {alpha:.2f} of proposals, {per_round:.2f} tokens per forward | "
                  f"plain {speed['plain']:6.1f} tok/s, lookup {speed['lookup']:6.1f} tok/s "
                  f"({speed['lookup'] / speed['plain']:.2f}x)")


if __name__ == "__main__":
    main()
