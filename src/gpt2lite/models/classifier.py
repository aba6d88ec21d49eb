"""GPT-2 with a classification head: ``transformers``' ``GPT2ForSequenceClassification``, in plain PyTorch.

The GPT-2 body (``transformer``) reads the text; a bias-free linear layer
(``score``) maps the final hidden state of each row's last real token to one
logit per class. Parameter names, ``config.json`` (``id2label``, ``label2id``)
and the safetensors layout are those of ``transformers``, so checkpoints go both
ways.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from gpt2lite.models.config import GPT2Config
from gpt2lite.models.gpt2 import GPT2
from gpt2lite.models.weights import load_checkpoint, save_checkpoint

__all__ = ["GPT2ForSequenceClassification"]


class GPT2ForSequenceClassification(nn.Module):
    """GPT-2 body plus a bias-free ``score`` layer over the hidden state of each row's last real token."""

    def __init__(self, config: GPT2Config) -> None:
        """A classifier with random weights for ``config.labels`` (at least two class names)."""
        super().__init__()
        if not config.labels:
            raise ValueError("a sequence classifier needs class names: GPT2Config(labels=('neg', 'pos'), ...)")
        self.config = config
        self.transformer = GPT2(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        if not self.score.weight.is_meta:
            nn.init.normal_(self.score.weight, mean=0.0, std=0.02)

    @property
    def labels(self) -> tuple[str, ...]:
        """The class names, by id."""
        assert self.config.labels is not None  # checked in __init__
        return self.config.labels

    @property
    def device(self) -> torch.device:
        """Where the parameters live."""
        return self.score.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return self.score.weight.dtype

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits ``(B, num_labels)`` for token ids ``(B, T)``.

        ``attention_mask`` ``(B, T)`` marks real tokens with 1 and padding (left
        or right) with 0; each row is read at its last real token. Without a
        mask every row is read at its last position.
        """
        hidden = self.transformer.hidden_states(input_ids, attention_mask=attention_mask)  # (B, T, C)
        B, T, _ = hidden.shape
        if attention_mask is None:
            last = torch.full((B,), T - 1, device=hidden.device)  # (B,)
        else:
            real = attention_mask.bool()
            if input_ids.device.type == "cpu" and not bool(real.any(-1).all()):
                raise ValueError("a row of attention_mask has no real token (all 0)")
            # The rightmost 1 of each row: T-1 minus the index of the first 1 from the right.
            last = T - 1 - real.flip(-1).int().argmax(-1)  # (B,)
        pooled = hidden[torch.arange(B, device=hidden.device), last]  # (B, C)
        return self.score(pooled)  # (B, num_labels)

    # loading and saving ---------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        labels: Sequence[str] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
    ) -> GPT2ForSequenceClassification:
        """Load a classifier checkpoint (ours or ``transformers``'), or a GPT-2 language model with a new head.

        A checkpoint that has a ``score`` head and ``id2label`` in its config
        loads as it is. A language-model checkpoint (``"gpt2"``, a fine-tuned
        directory) needs ``labels``: the body is loaded and the head starts
        random, ready for training (``gpt2lite.load_model`` also puts LoRA
        adapters on it). Example::

            clf = GPT2ForSequenceClassification.from_pretrained("gpt2", labels=["negative", "positive"])
        """
        def head(config: GPT2Config) -> dict[str, tuple[int, ...]]:
            n = len(labels) if labels is not None else config.num_labels
            return {"score.weight": (n, config.n_embd)} if n else {}

        config, state = load_checkpoint(
            name_or_path, device=device, dtype=dtype, revision=revision, cache_dir=cache_dir,
            local_files_only=local_files_only, heads=head,
        )
        if labels is not None:
            if config.labels is not None and tuple(labels) != config.labels:
                raise ValueError(f"{str(name_or_path)!r} classifies into {list(config.labels)}, not {list(labels)}; "
                                 "leave labels out to use its own, or start from its base language model")
            config = dataclasses.replace(config, labels=tuple(labels))
        if not config.labels:
            raise ValueError(f"{str(name_or_path)!r} is a language model without class names: "
                             "pass labels=[...] to put a new classification head on it")
        if config.pad_token_id is None:
            # transformers' classifier finds each row's last token by its pad id; GPT-2 pads with its end token.
            config = dataclasses.replace(config, pad_token_id=config.eos_token_id)
        with torch.device("meta"):
            model = cls(config)
        score = state.pop("score.weight", None)
        model.transformer.load_state_dict(state, strict=True, assign=True)
        if score is None:  # a new head on a language model
            score = torch.empty(config.num_labels, config.n_embd, device=device, dtype=model.transformer.dtype)
            nn.init.normal_(score, mean=0.0, std=0.02)
        model.score.load_state_dict({"weight": score}, assign=True)
        model.transformer.name_or_path = str(name_or_path)
        return model.eval()

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` as ``transformers`` saves this class.

        With LoRA adapters, save it with ``gpt2lite.save_model``.
        """
        state = {f"transformer.{k}": v for k, v in self.transformer.state_dict().items()}
        state["score.weight"] = self.score.weight
        return save_checkpoint(state, self.config, directory)

    def num_parameters(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters())
