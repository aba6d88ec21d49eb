"""Quality of int8 and int4 inference on a GPT-2 trained from scratch on real text, beside float32.

Random checkpoints are too chaotic to judge quantization, so this trains a small
GPT-2 (GPT-2's own tokenizer and vocabulary, 4 layers, 256 wide) on the Python
documentation that ships with Python (``pydoc_data.topics``), once, into
``--work``; later runs reuse it. It then reports, for each precision:

- held-out perplexity (the last 5% of the text, never trained on) and its change from float32;
- teacher-forced top-1 agreement with float32 over the held-out tokens;
- greedy agreement: how many of 64 generated tokens equal float32's, over 16 held-out prompts.

Each quantized model takes gpt2lite's own CPU kernels where they are built
("int4 torch": PyTorch's int4 route, for comparison).

    python benchmarks/quant_quality.py [--work runs/quant-quality] [--steps 600]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from gpt2lite import GPT2, GPT2Config, TrainConfig, generate, load_model, prepare_data, quantize, train
from gpt2lite.text.scoring import perplexity
from gpt2lite.transforms.quantize import QUANTIZE_MODES


def python_docs() -> list[str]:
    """Python's own documentation topics, one document each."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def trained_model(work: Path, steps: int) -> tuple[Path, torch.Tensor]:
    """Train the model once (or reuse it); return its directory and the held-out token ids."""
    data = prepare_data(python_docs(), work / "data", val_fraction=0.05)
    final = work / "final"
    if not (final / "model.safetensors").is_file():
        torch.manual_seed(0)
        config = GPT2Config(n_layer=4, n_head=4, n_embd=256, n_positions=256, embd_pdrop=0.0, attn_pdrop=0.0,
                            resid_pdrop=0.0)
        t0 = time.perf_counter()
        result = train(GPT2(config), data, work, TrainConfig(
            steps=steps, batch_size=16, block_size=128, lr=2e-3, min_lr=2e-4, warmup_steps=50,
            eval_interval=max(1, steps // 4), save_interval=steps, progress=False,
        ))
        print(f"trained {steps} steps in {(time.perf_counter() - t0) / 60:.1f} min; held-out loss "
              + ", ".join(f"{v:.3f}@{s}" for s, v in result.val_losses))
    return final, torch.as_tensor(data.val.astype("int64"))


@torch.no_grad()
def top1(model: GPT2, val: torch.Tensor, block: int) -> torch.Tensor:
    """The model's top-1 next-token pick at every position of non-overlapping held-out windows."""
    n = (len(val) // block) * block
    windows = val[:n].view(-1, block)  # (W, block)
    return torch.cat([model(chunk).argmax(-1) for chunk in windows.split(16)])  # (W, block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/quant-quality", help="where the trained model is kept")
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()

    final, val = trained_model(Path(args.work), args.steps)
    block = 128  # the window length it was trained on: later positions never were
    models = {"float32": GPT2.from_pretrained(final)}
    models.update({mode: load_model(final, quantize=mode) for mode in QUANTIZE_MODES})
    for group_size in (32, 128):  # int4's default groups are 64 inputs wide
        models[f"int4/{group_size}"] = quantize(GPT2.from_pretrained(final), "int4", group_size=group_size)
    models["int4+head4"] = quantize(GPT2.from_pretrained(final), "int4", head="int4")
    # PyTorch's int4 route (bfloat16 activations) beside gpt2lite's kernel (int8 activations in blocks of 32)
    models["int4 torch"] = load_model(final, quantize="int4", kernels="torch")
    prompts = [val[i : i + 32] for i in torch.linspace(0, len(val) - 200, 16).long().tolist()]
    reference: dict[str, object] = {}
    print(f"held-out: {len(val)} tokens; model {final}")
    print(f"{'precision':>9} {'perplexity':>10} {'change':>8} {'top-1 = fp32':>13} {'greedy = fp32 (of 64)':>22}")
    for name, model in models.items():
        ppl = perplexity(model, val, max_length=block, stride=block // 2)
        picks = top1(model, val, block)
        greedy = [generate(model, p[None], max_new_tokens=64, temperature=0, ignore_eos=True)[0, 32:]
                  for p in prompts]
        if name == "float32":
            reference = {"ppl": ppl, "picks": picks, "greedy": greedy}
        agree = (picks == reference["picks"]).float().mean().item()
        same = [_leading_equal(g, r) for g, r in zip(greedy, reference["greedy"], strict=True)]
        print(f"{name:>9} {ppl:10.3f} {100 * (ppl / reference['ppl'] - 1):+7.2f}% {100 * agree:12.1f}% "
              f"   median {statistics.median(same):4.0f}, all 64 in {sum(s == 64 for s in same)}/16")


def _leading_equal(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading tokens two sequences share."""
    differ = (a != b).nonzero()
    return len(a) if len(differ) == 0 else int(differ[0])


if __name__ == "__main__":
    main()
