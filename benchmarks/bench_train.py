"""Training throughput of one step (forward + backward + AdamW) of gpt2lite beside transformers.

Both libraries get the same random GPT-2 124M weights, the same batch and the same
optimizer settings, in one process, alternating steps; the script prints the median
training tokens/s of each and the ratio.

    python benchmarks/bench_train.py [--batch 4] [--block 128] [--rounds 5] [--device cpu|cuda] [--autocast bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile

import torch
import torch.nn.functional as F
from timing import alternate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=["bf16"], default=None)
    args = parser.parse_args()

    import transformers

    from gpt2lite import GPT2, GPT2Config

    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.autocast else contextlib.nullcontext

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        GPT2(GPT2Config.from_preset("gpt2")).save_pretrained(tmp)
        ours = GPT2.from_pretrained(tmp, device=device).train()
        theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp).to(device).train()
    with torch.no_grad():  # train() gives loaded weights their own memory; do the same here, untimed
        for p in ours.parameters():
            p.data = p.data.contiguous()

    def optimizer(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    opt_ours, opt_theirs = optimizer(ours), optimizer(theirs)
    batch = torch.randint(0, 50257, (args.batch, args.block + 1), generator=torch.Generator().manual_seed(0))
    x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)

    def step_ours():
        with amp():
            loss = F.cross_entropy(ours(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.item()

    def step_theirs():
        with amp():
            loss = theirs(input_ids=x, labels=batch[:, :-1].to(device)).loss  # shifts the labels itself
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        return loss.item()

    runners = {"gpt2lite": step_ours, "transformers": step_theirs}
    for run in runners.values():
        run()  # warm-up
    medians = alternate(runners, args.rounds, sync)
    tokens = args.batch * args.block
    print(f"device={device} autocast={args.autocast} threads={torch.get_num_threads()} batch={args.batch} "
          f"block={args.block}, {args.rounds} rounds, medians")
    base = medians["transformers"]
    for name, t in medians.items():
        print(f"  {name:>12}: {tokens / t:9.1f} train tok/s  ({t * 1000:7.1f} ms/step, {base / t:4.2f}x transformers)")


if __name__ == "__main__":
    main()
