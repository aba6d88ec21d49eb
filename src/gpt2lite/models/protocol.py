"""The protocol between the decoding engine and a model: what a model must offer to be generated from.

``gpt2lite.generation`` drives any model through these few calls and never
through anything else, so a transformer with a key/value cache (``GPT2``) and a
recurrent network whose state is ``(h, c)`` serve the same ``generate()``.

A model makes an empty state for ``B`` rows, then ``feed`` runs new tokens
into some or all rows and returns logits; the state remembers each row's past.
The engine empties rows to refill them (continuous batching), reorders them
(beam search) and cuts them back (speculative decoding) through the state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

__all__ = ["DecodeState", "DecoderModel", "ModelConfig"]


@runtime_checkable
class ModelConfig(Protocol):
    """What the engine reads of a model's config."""

    vocab_size: int  # logits have this many columns
    n_positions: int | None  # most tokens a row can hold (prompt included); None: no limit
    eos_token_id: int | None  # the end-of-text token that stops a row by default


@runtime_checkable
class DecodeState(Protocol):
    """The memory of ``batch_size`` rows between decode calls (a key/value cache, recurrent ``(h, c)``)."""

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the state (and so the model) lives: the engine puts its tensors there."""
        ...

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Empty ``rows`` (default: all), as if nothing had been fed to them."""
        ...

    def reorder(self, index: Sequence[int] | torch.Tensor) -> None:
        """Make row ``i`` a copy of row ``index[i]``."""
        ...

    def truncate(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        """Forget all but the first ``lengths[j]`` tokens of row ``rows[j]``; may raise if the model cannot."""
        ...


@runtime_checkable
class DecoderModel(Protocol):
    """A language model the engine can decode from."""

    config: ModelConfig

    def new_state(self, batch_size: int, max_length: int, *, static: bool = False) -> DecodeState:
        """An empty state for ``batch_size`` rows of up to ``max_length`` tokens each.

        ``static=True`` asks for fixed shapes at every one-token step, so that a
        compiled step can be reused (a model whose steps always have fixed shapes
        may ignore it).
        """
        ...

    def feed(
        self,
        input_ids: torch.Tensor,
        state: DecodeState,
        *,
        input_mask: torch.Tensor | None = None,
        rows: Sequence[int] | None = None,
        last_only: bool = True,
    ) -> torch.Tensor:
        """Feed ``input_ids`` ``(R, T)`` to ``rows`` of ``state`` (default: all rows, in order).

        Returns logits ``(R, T, vocab_size)``, or ``(R, 1, vocab_size)`` for the
        last token only when ``last_only``. ``input_mask`` ``(R, T)`` marks left
        padding with 0: such tokens change nothing that later tokens see.
        """
        ...
