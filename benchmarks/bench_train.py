"""Training throughput of one step (forward + backward + AdamW) of gpt2lite beside transformers, or beside nanoGPT.

Both libraries get the same random GPT-2 124M weights, the same batch and the same
optimizer settings, in one process, alternating steps; the script prints the median
training tokens/s of each and the ratio.

With ``--nanogpt DIR`` (a checkout of karpathy/nanoGPT; nothing of it is copied
here) the peer is nanoGPT's own ``train.py``, run as nanoGPT users run it, on the
same tokens (Python's documentation topics, prepared by gpt2lite and written in
nanoGPT's ``train.bin``/``val.bin`` layout in a temporary folder), model shape
(biases on, dropout 0, GPT-2's 50257 tokens), batch, schedule and steps, beside
``gpt2lite.train``; run after run, alternating. Each run's tokens/s is the median
of its steps after the first ``--skip``; the script prints the median over runs
and both losses at the same steps (different random initialisations and batches:
close, not equal).

    python benchmarks/bench_train.py [--batch 4] [--block 128] [--rounds 5] [--device cpu|cuda] [--autocast bf16]
    python benchmarks/bench_train.py --nanogpt /tmp/nanoGPT [--shape 4,4,128] [--batch 8] [--block 128] \
        [--steps 30] [--rounds 3] [--device cpu] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

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
    parser.add_argument("--nanogpt", default=None, help="a nanoGPT checkout: compare with its train.py instead")
    parser.add_argument("--shape", default="4,4,128", help="--nanogpt: n_layer,n_head,n_embd (12,12,768 is 124M)")
    parser.add_argument("--steps", type=int, default=30, help="--nanogpt: optimizer steps a run")
    parser.add_argument("--skip", type=int, default=5, help="--nanogpt: first steps of a run left out of its median")
    parser.add_argument("--compile", action="store_true", help="--nanogpt: both compile their model")
    args = parser.parse_args()
    if args.nanogpt:
        side_by_side_with_nanogpt(args)
        return

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


def side_by_side_with_nanogpt(args: argparse.Namespace) -> None:
    """nanoGPT's train.py and gpt2lite.train on the same tokens, shape, batch and schedule, alternating runs."""
    from pydoc_data.topics import topics

    from gpt2lite import GPT2, GPT2Config, TrainConfig, prepare_data, train

    n_layer, n_head, n_embd = (int(v) for v in args.shape.split(","))
    lr, min_lr, warmup = 6e-4, 6e-5, max(1, args.steps // 10)
    nanogpt = Path(args.nanogpt).resolve()
    times: dict[str, list[float]] = {"gpt2lite": [], "nanoGPT": []}
    losses: dict[str, list[list[float]]] = {"gpt2lite": [], "nanoGPT": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data([topics[k] for k in sorted(topics)], Path(tmp) / "tokens", val_fraction=0.05)
        dataset = Path(tmp) / "nanogpt-data"  # nanoGPT's layout: train.bin, val.bin (uint16), meta.pkl
        dataset.mkdir()
        data.train[:].astype("uint16").tofile(dataset / "train.bin")
        data.val[:].astype("uint16").tofile(dataset / "val.bin")
        with open(dataset / "meta.pkl", "wb") as f:  # GPT-2's vocabulary, not nanoGPT's default 50304
            pickle.dump({"vocab_size": 50257}, f)
        print(f"tokens: {len(data.train)} training, {len(data.val)} held out; n_layer={n_layer} n_head={n_head} "
              f"n_embd={n_embd} block={args.block} batch={args.batch} steps={args.steps} device={args.device} "
              f"compile={args.compile} threads={torch.get_num_threads()}")

        def run_nanogpt(round_: int) -> None:
            # Its configurator takes --key=value; data/<dataset> with an absolute dataset is that folder.
            flags = dict(dataset=str(dataset), out_dir=f"{tmp}/nanogpt-out{round_}", device=args.device,
                         dtype="bfloat16" if args.autocast else "float32", compile=args.compile, n_layer=n_layer,
                         n_head=n_head, n_embd=n_embd, block_size=args.block, batch_size=args.batch,
                         gradient_accumulation_steps=1, bias=True, dropout=0.0, learning_rate=lr, min_lr=min_lr,
                         warmup_iters=warmup, lr_decay_iters=args.steps, max_iters=args.steps - 1,
                         eval_interval=10**9, eval_iters=1, log_interval=1, always_save_checkpoint=False)
            proc = subprocess.run([sys.executable, str(nanogpt / "train.py"),
                                   *(f"--{k}={v}" for k, v in flags.items())],
                                  cwd=nanogpt, capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.exit(f"nanoGPT's train.py failed:\n{proc.stderr[-3000:]}")
            steps = re.findall(r"iter (\d+): loss ([\d.]+), time ([\d.]+)ms", proc.stdout)
            assert len(steps) == args.steps, proc.stdout[-2000:]
            times["nanoGPT"].append(statistics.median(float(t) / 1000 for _, _, t in steps[args.skip:]))
            losses["nanoGPT"].append([float(v) for _, v, _ in steps])

        def run_ours(round_: int) -> None:
            torch.manual_seed(round_)
            config = GPT2Config(n_positions=args.block, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
            out = Path(tmp) / f"gpt2lite-out{round_}"
            train(GPT2(config).to(args.device), data, out,
                  TrainConfig(steps=args.steps, batch_size=args.batch, block_size=args.block, lr=lr, min_lr=min_lr,
                              warmup_steps=warmup, eval_interval=0, eval_batches=1, save_interval=0,
                              compile=args.compile, progress=False, seed=round_))
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            times["gpt2lite"].append(statistics.median(args.batch * args.block / r["tokens_per_s"]
                                                       for r in records[args.skip:]))
            losses["gpt2lite"].append([r["train_loss"] for r in records])

        for round_ in range(args.rounds):
            run_nanogpt(round_)
            run_ours(round_)
    tokens = args.batch * args.block
    print(f"{args.rounds} rounds; each run's median step after its first {args.skip}, then the median over runs:")
    base = statistics.median(times["nanoGPT"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"  {name:>9}: {tokens / t:9.1f} train tok/s  ({t * 1000:7.1f} ms/step, {base / t:4.2f}x nanoGPT; "
              f"runs: {', '.join(f'{tokens / x:.0f}' for x in ts)})")
    print("training loss (median over runs) at step: " + "  ".join(f"{s:>6}" for s in _report_steps(args.steps)))
    for name, runs in losses.items():
        print(f"  {name:>9}: " + " ".join(
            f"{statistics.median(r[s - 1] for r in runs):6.3f}" for s in _report_steps(args.steps)))


def _report_steps(steps: int) -> list[int]:
    return sorted({1, *range(max(1, steps // 5), steps + 1, max(1, steps // 5)), steps})


if __name__ == "__main__":
    main()
