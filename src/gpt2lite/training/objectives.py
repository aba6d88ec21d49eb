"""The two things the trainer can teach a model, each with its data, loss and evaluation.

- ``LanguageModeling`` over ``TokenData`` (``prepare_data``): next-token
  prediction on windows of a token stream. Any model with ``forward(input_ids) ->
  logits`` and a ``config`` trains here: GPT-2 and the recurrent models alike.
- ``Classification`` over ``LabeledData`` (``load_labeled``): a
  ``GPT2ForSequenceClassification`` learns class ids; evaluation reports accuracy
  and macro-F1 beside the loss.
- ``InstructionTuning`` over ``InstructionData`` (``load_instructions``):
  prompt/completion pairs packed into rows, the loss on the completion tokens only.

``train(..., objective=)`` takes one explicitly (any object with the
``Objective`` protocol's methods); left out, ``objective_for(data)`` picks the one a
data set stands for. The trainer itself never asks which one it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gpt2lite.training.data import Part, TokenData
from gpt2lite.training.instructions import IGNORE_INDEX, InstructionData
from gpt2lite.training.labeled import LabeledData

__all__ = [
    "Classification",
    "InstructionTuning",
    "LanguageModeling",
    "Objective",
    "classification_metrics",
    "evaluate_classifier",
    "evaluate_loss",
    "objective_for",
]

Forward = Callable[..., torch.Tensor]


class LanguageModeling:
    """Next-token prediction on windows of ``block`` tokens drawn from a token stream."""

    def __init__(self, data: TokenData) -> None:
        """Train on ``data`` (from ``prepare_data``)."""
        self.data = data

    def check(self, model: nn.Module, block: int) -> None:
        """Refuse a classifier, and parts too short for one window."""
        if hasattr(model, "score"):
            raise ValueError("a classifier trains on labeled data (load_labeled), not on a token stream")
        for part in ("train", "val"):
            n = len(self.data.part(part))
            if n < block + 1:
                raise ValueError(f"the {part} part holds {n} tokens, fewer than block_size + 1 = {block + 1}: "
                                 "give more text or a smaller block_size")

    def population(self, block: int) -> int:
        """How many training rows (window starts) batches are drawn from."""
        return len(self.data.train) - block

    def loss(self, forward: Forward, rows: torch.Tensor, block: int, device: torch.device) -> torch.Tensor:
        """The mean next-token loss of the windows starting at ``rows``."""
        x, y = self.data.windows("train", rows, block)
        logits = forward(x.to(device))
        return F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten())

    def evaluate(self, model: nn.Module, block: int, batches: int, batch_size: int) -> dict[str, float]:
        """The validation loss (over the same evenly spaced windows every time)."""
        return {"loss": evaluate_loss(model, self.data, block_size=block, batches=batches, batch_size=batch_size)}


class Classification:
    """Class ids for labeled texts, read at each text's last token (the first ``block`` tokens of longer ones)."""

    def __init__(self, data: LabeledData) -> None:
        """Train on ``data`` (from ``load_labeled``)."""
        self.data = data

    def check(self, model: nn.Module, block: int) -> None:
        """Refuse a model without a classification head, or one for other classes."""
        if not hasattr(model, "score"):
            raise ValueError("labeled data (load_labeled) trains a GPT2ForSequenceClassification, not a "
                             f"{type(model).__name__}")
        if tuple(model.config.labels) != self.data.labels:
            raise ValueError(f"the model classifies into {list(model.config.labels)} but the data's classes are "
                             f"{list(self.data.labels)}: build the model with labels=data.labels")

    def population(self, block: int) -> int:
        """How many training rows (examples) batches are drawn from."""
        return len(self.data.train_ids)

    def loss(self, forward: Forward, rows: torch.Tensor, block: int, device: torch.device) -> torch.Tensor:
        """The mean cross-entropy of the examples ``rows``."""
        x, mask, y = self.data.batch("train", rows.tolist(), block)
        logits = forward(x.to(device), attention_mask=mask.to(device))
        return F.cross_entropy(logits.float(), y.to(device))

    def evaluate(self, model: nn.Module, block: int, batches: int, batch_size: int) -> dict[str, float]:
        """Loss, accuracy and macro-F1 over every validation example."""
        return evaluate_classifier(model, self.data, max_length=block, batch_size=batch_size)


class InstructionTuning:
    """Completions of prompts: examples packed into rows, the loss on the completion tokens only."""

    def __init__(self, data: InstructionData) -> None:
        """Train on ``data`` (from ``load_instructions``)."""
        self.data = data

    def check(self, model: nn.Module, block: int) -> None:
        """Refuse a classifier, and a model that cannot keep packed examples apart."""
        if hasattr(model, "score") or model.config.n_positions is None:
            raise ValueError("instruction data trains a GPT-2 language model (packed examples need its "
                             "segment_ids)")

    def population(self, block: int) -> int:
        """How many training rows (examples) batches are drawn from."""
        return len(self.data.train)

    def loss(self, forward: Forward, rows: torch.Tensor, block: int, device: torch.device) -> torch.Tensor:
        """The mean loss over the completion tokens of the examples ``rows``, packed."""
        x, labels, segments = self.data.batch("train", rows.tolist(), block)
        logits = forward(x.to(device), segment_ids=segments.to(device))
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.to(device).flatten(), ignore_index=IGNORE_INDEX)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, block: int, batches: int, batch_size: int) -> dict[str, float]:
        """The mean loss over the completion tokens of every validation example."""
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        val = self.data.val
        for start in range(0, len(val), batch_size):
            x, labels, segments = self.data.batch("val", range(start, min(start + batch_size, len(val))), block)
            logits = model(x.to(model.device), segment_ids=segments.to(model.device)).float()
            labels = labels.to(model.device).flatten()
            total += F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
        model.train(was_training)
        return {"loss": total / max(1, count)}


class Objective(Protocol):
    """What ``train`` needs of an objective: the three above, or one of your own."""

    data: Any  # what it trains on; train() checks that it is the data it was given

    def check(self, model: nn.Module, block: int) -> None:
        """Refuse a model (or data) this objective cannot train, before any step."""

    def population(self, block: int) -> int:
        """How many training rows batches are drawn from."""

    def loss(self, forward: Forward, rows: torch.Tensor, block: int, device: torch.device) -> torch.Tensor:
        """The mean loss of the training rows ``rows``, through ``forward`` (the model, maybe wrapped)."""

    def evaluate(self, model: nn.Module, block: int, batches: int, batch_size: int) -> dict[str, float]:
        """Validation metrics; ``"loss"`` among them."""


def objective_for(data: TokenData | LabeledData | InstructionData) -> Objective:
    """The objective ``data`` is for: language modelling, classification or instruction tuning."""
    if isinstance(data, TokenData):
        return LanguageModeling(data)
    if isinstance(data, LabeledData):
        return Classification(data)
    if isinstance(data, InstructionData):
        return InstructionTuning(data)
    raise TypeError("train() takes TokenData (prepare_data), LabeledData (load_labeled) or InstructionData "
                    f"(load_instructions), got {type(data).__name__}")


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: TokenData, *, part: Part = "val", block_size: int, batches: int,
                  batch_size: int) -> float:
    """Mean next-token loss over evenly spaced windows of a part (the same windows every time)."""
    stream = data.part(part)
    last = len(stream) - block_size - 1
    count = batches * batch_size
    starts = torch.linspace(0, last, count).round().long()
    was_training = model.training
    model.eval()
    total = 0.0
    for chunk in starts.split(batch_size):
        x, y = data.windows(part, chunk, block_size)
        logits = model(x.to(model.device))
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.to(model.device).flatten()).item() * len(chunk)
    model.train(was_training)
    return total / count


def classification_metrics(predicted: Sequence[int], actual: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of each class's F1; a class never predicted nor present counts 0)."""
    if len(predicted) != len(actual) or not actual:
        raise ValueError("need as many predictions as labels, and at least one")
    accuracy = sum(p == a for p, a in zip(predicted, actual, strict=True)) / len(actual)
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and a == c for p, a in zip(predicted, actual, strict=True))
        fp = sum(p == c and a != c for p, a in zip(predicted, actual, strict=True))
        fn = sum(p != c and a == c for p, a in zip(predicted, actual, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / num_labels}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, data: LabeledData, *, part: Part = "val", max_length: int,
                        batch_size: int) -> dict[str, float]:
    """Mean cross-entropy, accuracy and macro-F1 of a classifier over every example of a part."""
    ids, labels = data.part(part)
    was_training = model.training
    model.eval()
    total, predicted = 0.0, []
    for start in range(0, len(ids), batch_size):
        x, mask, y = data.batch(part, range(start, min(start + batch_size, len(ids))), max_length)
        logits = model(x.to(model.device), attention_mask=mask.to(model.device)).float()
        total += F.cross_entropy(logits, y.to(model.device), reduction="sum").item()
        predicted += logits.argmax(-1).tolist()
    model.train(was_training)
    return {"loss": total / len(ids), **classification_metrics(predicted, labels, len(data.labels))}
