"""Train a tanh RNN, an LSTM, a GRU and a small GPT-2 on the same text with the same token budget; compare them.

The text is Python's own documentation (shipped with Python, so offline). Every
model sees the same batches of the same windows: ``--steps`` x ``--batch-size`` x
``--block-size`` tokens. Writes a Markdown table (parameters, training time,
held-out perplexity, generation speed) and a PNG plot of validation loss against
training time. The default run takes about 6 minutes on 2 CPU cores (about 90 s of
training a model, as in the README's table); a progress bar shows each model's.

    pip install -r examples/requirements.txt
    python examples/compare_generators.py [--steps 150] [--out runs/compare]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from gpt2lite import GPT2, GPT2Config, RecurrentConfig, RecurrentLM, TrainConfig, generate, prepare_data, train
from gpt2lite.training.objectives import evaluate_loss


def python_docs() -> list[str]:
    """Python's documentation topics, one document each."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def models(width: int) -> dict[str, torch.nn.Module]:
    """The four generators, each freshly seeded."""
    out: dict[str, torch.nn.Module] = {}
    for cell in ("rnn", "lstm", "gru"):
        torch.manual_seed(0)
        out[cell.upper() if cell != "rnn" else "RNN (tanh)"] = RecurrentLM(
            RecurrentConfig(cell=cell, n_embd=width, n_layer=2, dropout=0.1))
    torch.manual_seed(0)
    out["GPT-2 (2 layers)"] = GPT2(GPT2Config(n_layer=2, n_head=4, n_embd=width, n_positions=256, embd_pdrop=0.1,
                                              attn_pdrop=0.1, resid_pdrop=0.1))
    return out


def main(steps: int = 150, batch_size: int = 16, block_size: int = 64, width: int = 128, out: str | None = None,
         plot: bool = True, progress: bool = True) -> list[dict[str, float | str]]:
    out_dir = Path(out) if out else Path(tempfile.mkdtemp(prefix="gpt2lite-compare-"))
    data = prepare_data(python_docs(), out_dir / "data", val_fraction=0.05)
    config = TrainConfig(steps=steps, batch_size=batch_size, block_size=block_size, lr=1e-2, min_lr=1e-3,
                         warmup_steps=max(1, steps // 20), eval_interval=max(1, steps // 10), eval_batches=8,
                         save_interval=0, progress=progress)
    rows, curves = [], {}
    generators = models(width)
    for i, (name, model) in enumerate(generators.items()):
        print(f"training {name} ({i + 1} of {len(generators)}): {steps} steps", flush=True)
        times: dict[int, float] = {}  # step -> seconds since the start of training
        t0 = time.perf_counter()

        def record(done: int, entry: object, times: dict[int, float] = times, t0: float = t0) -> None:
            times[done] = time.perf_counter() - t0

        result = train(model, data, out_dir / name.split()[0].lower(), config, callbacks=[record])
        seconds = time.perf_counter() - t0
        curves[name] = [(times[step], loss) for step, loss in result.val_losses]
        val = evaluate_loss(model, data, block_size=block_size, batches=32, batch_size=batch_size)
        prompt = torch.from_numpy(data.val[:16].astype("int64"))[None]  # (1, 16)
        generate(model, prompt, max_new_tokens=8, temperature=0)  # warm-up
        t1 = time.perf_counter()
        generate(model, prompt, max_new_tokens=128, temperature=0, ignore_eos=True)
        speed = 128 / (time.perf_counter() - t1)
        rows.append({"model": name, "parameters": model.num_parameters(), "train_seconds": seconds,
                     "val_perplexity": math.exp(val), "generate_tok_s": speed})
        print(f"{name}: {model.num_parameters() / 1e6:.2f}M parameters, {seconds:.0f} s, held-out perplexity "
              f"{math.exp(val):.0f}, {speed:.0f} tok/s", flush=True)

    tokens = steps * batch_size * block_size
    table = [f"Same {tokens:,} training tokens each ({steps} steps of {batch_size} x {block_size}), 2 CPU threads.",
             "", "| model | parameters | training time | held-out perplexity | generation, batch 1 |",
             "| --- | --- | --- | --- | --- |"]
    table += [f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['train_seconds']:.0f} s | "
              f"{r['val_perplexity']:.0f} | {r['generate_tok_s']:.0f} tok/s |" for r in rows]
    (out_dir / "comparison.md").write_text("\n".join(table) + "\n", encoding="utf-8")
    print("\n".join(table))
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, points in curves.items():
            ax.plot([t for t, _ in points], [v for _, v in points], marker="o", label=name)
        ax.set_xlabel("training time (s), 2 CPU cores")
        ax.set_ylabel("held-out loss (nats per token)")
        ax.set_title(f"Same {tokens:,} tokens of Python's documentation")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "comparison.png", dpi=110)
        print(f"wrote {out_dir / 'comparison.png'}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    main(steps=args.steps, width=args.width, out=args.out)
