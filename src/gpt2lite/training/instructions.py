"""Instruction data for supervised fine-tuning: prompt/completion pairs, the loss on the completions only.

``load_instructions`` reads JSONL rows of ``{"prompt": ..., "completion": ...}``,
or ``{"messages": [...]}`` chats rendered with the model's chat template (the last
assistant message is the completion, everything before it the prompt). Each
completion ends with the end token, so the model learns where to stop.

Batches pack several examples into each row of ``block`` tokens, with
``segment_ids`` so that no example attends to another and each starts at position
0 (``GPT2.forward``): packing wastes no compute on padding and changes no logit.
Prompt tokens (and padding) get the label -100, so only completion tokens count in
the loss, as transformers' ``ignore_index`` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gpt2lite.io.records import iter_records
from gpt2lite.tokenizers.protocol import TokenizerProtocol

__all__ = ["IGNORE_INDEX", "InstructionData", "load_instructions"]

IGNORE_INDEX = -100  # labels the loss skips (transformers' and PyTorch's default)

Example = tuple[list[int], list[int]]  # (prompt ids, completion ids)


@dataclass
class InstructionData:
    """Tokenized prompt/completion examples, split into training and validation."""

    train: list[Example]
    val: list[Example]
    pad_token_id: int
    fingerprint: str = ""

    def part(self, part: str) -> list[Example]:
        """The examples of ``"train"`` or ``"val"``."""
        if part not in ("train", "val"):
            raise ValueError(f"part must be 'train' or 'val', got {part!r}")
        return self.train if part == "train" else self.val

    def batch(self, part: str, indices: Sequence[int],
              block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Examples ``indices`` packed into rows of ``block`` tokens: ids, labels and segment ids, each ``(R, block)``.

        An example longer than ``block`` keeps its completion and as much of its
        prompt's end as fits (a completion longer than ``block`` keeps its start).
        """
        examples = self.part(part)
        rows: list[list[tuple[list[int], list[int]]]] = [[]]
        used = 0
        for i in indices:
            prompt, completion = examples[i]
            completion = completion[:block]
            prompt = prompt[max(0, len(prompt) - (block - len(completion))) :] if len(completion) < block else []
            size = len(prompt) + len(completion)
            if used + size > block:
                rows.append([])
                used = 0
            rows[-1].append((prompt, completion))
            used += size
        ids = torch.full((len(rows), block), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), block), IGNORE_INDEX, dtype=torch.long)
        segments = torch.full((len(rows), block), -1, dtype=torch.long)  # padding: a segment of its own
        for r, row in enumerate(rows):
            at = 0
            for s, (prompt, completion) in enumerate(row):
                tokens = prompt + completion
                ids[r, at : at + len(tokens)] = torch.tensor(tokens)
                # Position t predicts token t + 1: a completion token's label sits one before it (a
                # completion with no prompt left has no position before its first token).
                first = max(len(prompt), 1)
                labels[r, at + first - 1 : at + len(tokens) - 1] = torch.tensor(tokens[first:])
                segments[r, at : at + len(tokens)] = s
                at += len(tokens)
        return ids, labels, segments


def load_instructions(
    path: str | os.PathLike[str],
    tokenizer: TokenizerProtocol,
    *,
    chat_prompt: Callable[[list[dict[str, Any]]], str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> InstructionData:
    """Read, check and tokenize prompt/completion (or chat) examples; hold out ``val_fraction`` of them.

    ``chat_prompt`` renders the messages before a chat's last assistant message
    (``TextGenerator.chat_prompt``); rows with ``messages`` need it. Example::

        data = load_instructions("qa.jsonl", Tokenizer.gpt2())
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    eot = tokenizer.eot_token
    examples: list[Example] = []
    for where, row in iter_records(path, suffixes=(".jsonl",), what="instruction data"):
        if "messages" in row:
            messages = row["messages"]
            if chat_prompt is None:
                raise ValueError(f"{where}: chat rows need a chat template (chat_prompt=)")
            if not isinstance(messages, list) or len(messages) < 2 or not isinstance(messages[-1], dict) \
                    or messages[-1].get("role") != "assistant" or not isinstance(messages[-1].get("content"), str):
                raise ValueError(f"{where}: messages must end with the assistant's message, the one to learn")
            prompt_text, completion_text = chat_prompt(messages[:-1]), messages[-1]["content"]
            prompt_ids = tokenizer.encode(prompt_text, allowed_special="all")
        else:
            prompt_text, completion_text = row.get("prompt"), row.get("completion")
            if not isinstance(prompt_text, str) or not isinstance(completion_text, str) or not completion_text:
                raise ValueError(f"{where}: each row needs a 'prompt' string and a non-empty 'completion' string "
                                 "(or 'messages')")
            prompt_ids = tokenizer.encode(prompt_text)
        examples.append((prompt_ids or [eot], [*tokenizer.encode(completion_text), eot]))
    if len(examples) < 2:
        raise ValueError(f"{str(path)!r} holds {len(examples)} example: too few to hold out a validation part")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * val_fraction))
    held = set(order[:n_val])
    digest = hashlib.sha256(json.dumps([examples, sorted(held)]).encode()).hexdigest()[:16]
    return InstructionData(train=[e for i, e in enumerate(examples) if i not in held],
                           val=[e for i, e in enumerate(examples) if i in held], pad_token_id=eot,
                           fingerprint=digest)
