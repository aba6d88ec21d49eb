"""The model card (``README.md``) a training run writes beside the model it saves.

It says what the model is (its base, its data, how long it trained) and how well
it did (the last training and validation losses, the perplexity or accuracy), in
the hub's format: YAML front matter, then Markdown. ``gpt2lite push`` uploads it
with the model, so it names local files and folders by their last part only, never
by a path of the training machine. Its usage example continues the first words
of the training text: a prompt in the model's own vocabulary.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from gpt2lite.io.files import atomic_write
from gpt2lite.tokenizers.protocol import TokenizerProtocol

__all__ = ["write_model_card"]


def _base_model(model: nn.Module) -> str | None:
    """Where the model's weights came from: the adapter's base, or the checkpoint it was loaded from."""
    lora = getattr(model, "lora_config", None)
    if lora is not None and lora.base_model_name_or_path:
        return str(lora.base_model_name_or_path)
    body = getattr(model, "transformer", model)
    return getattr(body, "name_or_path", None)


def _local_name(name: str) -> str:
    """A path on this machine by its last part (a hub id or a description as it is)."""
    return Path(name).name if os.path.isabs(name) or os.path.exists(name) else name


def _data(data: Any) -> str:
    for record in ("index.json", "manifest.json"):  # token shards, or one memmap (folders made before shards)
        path = Path(getattr(data, "directory", "")) / record
        if path.is_file():
            info = json.loads(path.read_text(encoding="utf-8"))
            return f"{_local_name(str(info.get('source', 'text')))} ({info.get('tokens', '?'):,} tokens)"
    if hasattr(data, "labels"):
        return f"{len(data.train_ids) + len(data.val_ids):,} labeled texts in {len(data.labels)} classes"
    return "text"


def _example_prompt(data: Any, tokenizer: TokenizerProtocol | None) -> str:
    """The first words of the training text (up to 12 tokens, its first line), "" where there are none."""
    tokens = getattr(data, "tokens", None)
    if tokenizer is None or tokens is None:
        return ""  # an empty prompt starts from the end token, in any vocabulary
    decoder = tokenizer.stream_decoder(skip_special_tokens=True)
    text = ""
    for token in np.asarray(tokens[:12]).tolist():
        if token == tokenizer.eot_token:
            break
        text += decoder.add(token)
    return text.split("\n")[0].strip()


def write_model_card(directory: str | os.PathLike[str], model: nn.Module, data: Any, steps: int,
                     losses: list[float], val_losses: list[tuple[int, float]],
                     val_metrics: list[tuple[int, dict[str, float]]],
                     tokenizer: TokenizerProtocol | None = None) -> Path:
    """Write ``directory/README.md`` for a model trained ``steps`` steps on ``data``; return its path.

    ``tokenizer`` (the model's) writes the usage example's prompt from the first words of ``data``.
    """
    directory = Path(directory)
    base = _base_model(model)
    base = _local_name(base) if base else None
    classifier = bool(val_metrics)
    front = ["---", "library_name: transformers", "tags: [gpt2, gpt2lite, "
             + ("text-classification]" if classifier else "text-generation]"),
             f"pipeline_tag: {'text-classification' if classifier else 'text-generation'}"]
    if base and base == _base_model(model):  # a hub id, not a folder of the training machine
        front.append(f"base_model: {base}")
    front.append("---")
    lines = [*front, "", f"# {directory.parent.name or directory.name}", "",
             f"{'Fine-tuned from `' + base + '`' if base else 'Trained from scratch'} with "
             f"gpt2lite on {_data(data)}, for {steps} steps.", "", "| | |", "| --- | --- |"]
    if losses:
        lines.append(f"| final training loss | {losses[-1]:.4f} |")
    if val_losses:
        step, val = val_losses[-1]
        lines.append(f"| validation loss (step {step}) | {val:.4f} |")
        if not classifier and val < 50:
            lines.append(f"| validation perplexity | {math.exp(val):.2f} |")
    if classifier:
        step, metrics = val_metrics[-1]
        lines.append(f"| validation accuracy (step {step}) | {metrics['accuracy']:.4f} |")
        lines.append(f"| validation macro-F1 | {metrics['macro_f1']:.4f} |")
    lines += ["", "## Use", "", "```python", "from gpt2lite import " + ("TextClassifier" if classifier
                                                                        else "TextGenerator"),
              "", ("model = TextClassifier.from_pretrained(\"THIS_REPO\")" if classifier
                   else "gen = TextGenerator.from_pretrained(\"THIS_REPO\")\n"
                        f"print(gen({_example_prompt(data, tokenizer)!r}, max_new_tokens=40))"),
              "```", "", "The files are transformers' layout (`AutoModelForCausalLM`, `AutoTokenizer`), or a LoRA "
              "adapter in PEFT's.", ""]
    path = directory / "README.md"
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    return path
