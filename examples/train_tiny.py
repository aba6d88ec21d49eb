"""Train a tiny GPT-2 from scratch on a few hundred KB of real English, then sample from it.

The text is the documentation that ships with Python (`pydoc_data.topics`,
about 600 KB), so this runs offline. On a 2-core CPU the default run takes a few
minutes and prints the held-out loss before and after, then text from the saved
checkpoint.

    python examples/train_tiny.py [--steps 240] [--out runs/tiny]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from gpt2lite import GPT2, GPT2Config, TextGenerator, TrainConfig, prepare_data, train
from gpt2lite.training.objectives import evaluate_loss


def python_docs() -> list[str]:
    """Python's own documentation topics, one document each."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def main(steps: int = 240, out: str | None = None, progress: bool = True, eval_batches: int = 8) -> dict[str, float]:
    out_dir = Path(out) if out else Path(tempfile.mkdtemp(prefix="gpt2lite-tiny-"))
    docs = python_docs()
    data = prepare_data(docs, out_dir / "data", val_fraction=0.05)
    print(f"data: {sum(map(len, docs)) / 1e3:.0f} KB of text, {len(data.train)} training and "
          f"{len(data.val)} held-out tokens")

    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_preset("tiny", embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0))
    config = TrainConfig(steps=steps, batch_size=16, block_size=128, lr=3e-3, min_lr=3e-4,
                         warmup_steps=min(50, steps // 10), eval_interval=max(1, steps // 3), eval_batches=eval_batches,
                         save_interval=max(1, steps // 3), progress=progress)
    before = evaluate_loss(model, data, block_size=128, batches=eval_batches, batch_size=16)
    t0 = time.perf_counter()
    result = train(model, data, out_dir, config)
    minutes = (time.perf_counter() - t0) / 60
    after = result.val_losses[-1][1]
    print(f"held-out loss: {before:.3f} before training, {after:.3f} after {steps} steps ({minutes:.1f} min)")
    for step, val in result.val_losses:
        print(f"  step {step:5d}: held-out loss {val:.3f}")

    gen = TextGenerator.from_pretrained(result.final_dir)
    sample = gen("The with statement", max_new_tokens=60, temperature=0.8, top_k=40, seed=0)
    print("sample from the saved checkpoint:\n  The with statement" + sample.replace("\n", "\n  "))
    return {"before": before, "after": after, "minutes": minutes}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    args = parser.parse_args()
    main(args.steps, args.out)
