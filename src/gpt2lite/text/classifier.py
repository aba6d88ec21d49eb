"""Text classification with a fine-tuned GPT-2: texts in, class names and probabilities out."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpt2lite.generation.batching import right_pad
from gpt2lite.generation.context import check_window
from gpt2lite.loading import load_model, load_tokenizer
from gpt2lite.models.classifier import GPT2ForSequenceClassification
from gpt2lite.tokenizers.protocol import TokenizerProtocol

__all__ = ["Classification", "TextClassifier"]


@dataclass(frozen=True)
class Classification:
    """The predicted class of one text, its probability, and every class's probability."""

    label: str
    score: float
    probabilities: dict[str, float]


class TextClassifier:
    """A ``GPT2ForSequenceClassification`` and its tokenizer: ``classify(texts)`` in batches.

    Example::

        clf = TextClassifier.from_pretrained("runs/sentiment/final")
        clf.classify("a fine, warm film").label   # 'positive'
    """

    def __init__(self, model: GPT2ForSequenceClassification, tokenizer: TokenizerProtocol) -> None:
        """Pair a classifier with the tokenizer it was trained with."""
        if tokenizer.n_vocab > model.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.n_vocab} tokens but the model only {model.config.vocab_size}")
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        adapter: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
    ) -> TextClassifier:
        """Load a classifier directory (ours or ``transformers``'), or a LoRA adapter directory saved by training."""
        model = load_model(name_or_path, kind="classifier", device=device, dtype=dtype, adapter=adapter,
                           merge_adapter=True, local_files_only=local_files_only)
        tokenizer = load_tokenizer(name_or_path, model.config.vocab_size, local_files_only=local_files_only)
        return cls(model, tokenizer)  # type: ignore[arg-type]

    @property
    def labels(self) -> tuple[str, ...]:
        """The class names, by id."""
        return self.model.labels

    @torch.no_grad()
    def classify(
        self, texts: str | Sequence[str], *, batch_size: int = 16, max_length: int | None = None
    ) -> Classification | list[Classification]:
        """Classify one text (one ``Classification``) or many (a list, in order).

        Texts longer than ``max_length`` tokens (default: the model's context)
        are read from their start, as training reads them.
        """
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        if not all(isinstance(t, str) for t in items):
            raise TypeError("classify takes a string or a sequence of strings")
        context = self.model.config.n_positions
        if max_length is not None:
            check_window(max_length, context, "max_length")
        limit = max_length or context
        results = self.classify_ids([self.tokenizer.encode(t)[:limit] for t in items], batch_size=batch_size)
        return results[0] if single else results

    @torch.no_grad()
    def classify_ids(self, encoded: Sequence[Sequence[int]], *, batch_size: int = 16) -> list[Classification]:
        """Classify texts already encoded (each at most the model's context): one ``Classification`` each, in order."""
        context = self.model.config.n_positions
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        empty = next((i for i, ids in enumerate(encoded) if not ids), None)
        if empty is not None:
            raise ValueError(f"text {empty} is empty: there is nothing to classify")
        long = next((i for i, ids in enumerate(encoded) if len(ids) > context), None)
        if long is not None:
            raise ValueError(f"text {long} has {len(encoded[long])} tokens; the model reads at most {context}")
        # Similar lengths share a batch, so little of each batch is padding.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        probs: list[torch.Tensor | None] = [None] * len(encoded)
        device = self.model.device
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = right_pad([list(encoded[i]) for i in chunk], 0)
            p = self.model(ids.to(device), attention_mask=mask.to(device)).float().softmax(-1).cpu()  # (B, L)
            for row, i in enumerate(chunk):
                probs[i] = p[row]
        results = []
        for p in probs:
            assert p is not None
            best = int(p.argmax())
            results.append(Classification(
                label=self.labels[best], score=float(p[best]),
                probabilities={name: float(v) for name, v in zip(self.labels, p.tolist(), strict=True)},
            ))
        return results

    __call__ = classify
