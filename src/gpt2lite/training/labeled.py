"""Labeled text for classification: read CSV or JSONL, map label names to ids, tokenize, split.

``load_labeled`` reads a file (or two: training and validation), checks every
row, and returns ``LabeledData`` that ``gpt2lite.train`` takes in place of a
token stream. Class ids follow the order of ``labels`` when given, otherwise the
sorted label names; ``GPT2ForSequenceClassification`` stores them as
``id2label``, as ``transformers`` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpt2lite.generation.batching import right_pad
from gpt2lite.io.records import column, iter_records
from gpt2lite.tokenizers.bpe import Tokenizer

__all__ = ["LabeledData", "load_labeled", "read_labeled"]


@dataclass
class LabeledData:
    """Tokenized examples with class ids, split into training and validation."""

    labels: tuple[str, ...]  # class names by id
    train_ids: list[list[int]]
    train_labels: list[int]
    val_ids: list[list[int]]
    val_labels: list[int]
    fingerprint: str = ""  # of the examples and settings, so a resumed run can check its data

    def part(self, part: str) -> tuple[list[list[int]], list[int]]:
        """Token ids and class ids of ``"train"`` or ``"val"``."""
        if part not in ("train", "val"):
            raise ValueError(f"part must be 'train' or 'val', got {part!r}")
        return (self.train_ids, self.train_labels) if part == "train" else (self.val_ids, self.val_labels)

    def batch(self, part: str, indices: Sequence[int], max_length: int,
              pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids ``(B, T)``, attention mask ``(B, T)`` and class ids ``(B,)`` of some examples.

        Texts longer than ``max_length`` tokens keep their first ``max_length``.
        """
        ids, labels = self.part(part)
        x, mask = right_pad([ids[i][:max_length] for i in indices], pad_id)
        return x, mask, torch.tensor([labels[i] for i in indices], dtype=torch.long)


def read_labeled(path: str | os.PathLike[str], text_column: str = "text",
                 label_column: str = "label") -> list[tuple[str, str, str]]:
    """(text, label name, where) rows of a ``.csv`` (with a header) or ``.jsonl`` file, each row checked.

    ``where`` names the file and line, for errors about the row later. A UTF-8
    byte-order mark (Excel's CSV) is dropped.
    """
    rows = []
    for where, record in iter_records(path, suffixes=(".csv", ".tsv", ".jsonl", ".json"), what="labeled data"):
        text = column(where, record, text_column, "text_column= (--text-column)")
        label = column(where, record, label_column, "label_column= (--label-column)")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: the text is empty or not a string")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label).strip() == "":
            raise ValueError(f"{where}: the label {label!r} is not a class name or number")
        rows.append((text, str(label).strip(), where))
    if not rows:
        raise ValueError(f"{str(path)!r} holds no examples")
    return rows


def load_labeled(
    path: str | os.PathLike[str],
    *,
    tokenizer: Tokenizer | None = None,
    labels: Sequence[str] | None = None,
    text_column: str = "text",
    label_column: str = "label",
    val_path: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> LabeledData:
    """Read, check and tokenize labeled examples; hold out ``val_fraction`` of them (or use ``val_path``).

    The held-out examples are a seeded random sample, the same for the same
    file and seed. A label that is not among ``labels`` is an error naming its
    row. Example::

        data = load_labeled("reviews.csv", labels=["negative", "positive"])
    """
    tokenizer = tokenizer or Tokenizer.gpt2()
    rows = read_labeled(path, text_column, label_column)
    if val_path is not None:
        train_rows, val_rows = rows, read_labeled(val_path, text_column, label_column)
    else:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(len(rows) * val_fraction))
        if n_val >= len(rows):
            raise ValueError(f"{str(path)!r} holds {len(rows)} examples: too few to hold out a validation part")
        held = set(order[:n_val])
        train_rows = [r for i, r in enumerate(rows) if i not in held]
        val_rows = [r for i, r in enumerate(rows) if i in held]
    names = tuple(labels) if labels is not None else tuple(sorted({label for _, label, _ in train_rows + val_rows}))
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"classification needs at least 2 distinct class names, got {list(names)[:20]}")
    ids = {name: i for i, name in enumerate(names)}
    for text, label, where in train_rows + val_rows:
        if label not in ids:
            raise ValueError(f"{where}: label {label!r} (text {text[:40]!r}) is not one of the classes "
                             f"{list(names)[:20]}")
    train_rows = [(text, label) for text, label, _ in train_rows]
    val_rows = [(text, label) for text, label, _ in val_rows]
    digest = hashlib.sha256(json.dumps([names, train_rows, val_rows]).encode("utf-8")).hexdigest()[:16]
    return LabeledData(
        labels=names,
        train_ids=[tokenizer.encode(text) for text, _ in train_rows],
        train_labels=[ids[label] for _, label in train_rows],
        val_ids=[tokenizer.encode(text) for text, _ in val_rows],
        val_labels=[ids[label] for _, label in val_rows],
        fingerprint=digest,
    )
