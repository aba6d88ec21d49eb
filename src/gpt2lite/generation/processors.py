"""Logits processors: penalties, bans and biases applied to each step's logits before a token is chosen.

Each function takes logits ``(B, V)`` and returns new logits; nothing is changed
in place. ``LogitsProcessors`` applies the ones an options object asks for, in
this order (the order of ``transformers`` where it has the same control):

1. ``repetition_penalty`` over the prompt and the generated tokens (not padding);
2. ``presence_penalty`` and ``frequency_penalty`` over the generated tokens (OpenAI);
3. ``logit_bias`` (OpenAI);
4. ``no_repeat_ngram_size``, 5. ``bad_words_ids``, 6. ``min_new_tokens``: bans;
7. the user's ``logits_processor`` hooks, in their order.

Temperature, top-k, top-p and min-p come after all of these (``sampling.py``).
Beam search applies the same processors to log-probabilities, as ``transformers`` does.
"""

from __future__ import annotations

import torch

from gpt2lite.generation.options import GenerationOptions
from gpt2lite.generation.sampling import apply_repetition_penalty

__all__ = [
    "LogitsProcessors",
    "apply_logit_bias",
    "apply_presence_frequency_penalty",
    "ban_bad_words",
    "ban_repeated_ngrams",
]


def apply_presence_frequency_penalty(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: ``logit[j] - counts[j] * frequency - (counts[j] > 0) * presence``.

    ``counts`` ``(B, V)`` holds how often each token was generated in each row.
    """
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def apply_logit_bias(logits: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Add ``bias[i]`` to the logit of token ``ids[i]`` in every row."""
    return logits.index_add(1, ids, bias.to(logits.dtype).expand(logits.shape[0], -1))


def ban_repeated_ngrams(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Forbid every token that would complete an ``n``-gram already present in ``tokens`` ``(B, T)``."""
    T = tokens.shape[1]
    if n < 1 or n > T:
        return logits  # no n-gram complete yet
    if n == 1:
        return logits.scatter(1, tokens, float("-inf"))
    grams = tokens.unfold(1, n, 1)  # (B, T - n + 1, n): every n-gram so far
    prefix = tokens[:, T - n + 1 :]  # (B, n - 1): the n-1 tokens a new token would follow
    hit = (grams[:, :, :-1] == prefix[:, None, :]).all(-1)  # (B, W)
    rows, cols = hit.nonzero(as_tuple=True)
    banned = torch.zeros_like(logits, dtype=torch.bool)
    banned[rows, grams[rows, cols, -1]] = True
    return logits.masked_fill(banned, float("-inf"))


def ban_bad_words(logits: torch.Tensor, tokens: torch.Tensor, bad_words: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """Forbid the last token of each sequence in ``bad_words`` where ``tokens`` end with the rest of it."""
    banned = torch.zeros_like(logits, dtype=torch.bool)
    T = tokens.shape[1]
    single = [seq[0] for seq in bad_words if len(seq) == 1]
    if single:  # one write for every single-token ban (a padded vocabulary bans dozens)
        banned[:, single] = True
    for seq in bad_words:
        if len(seq) > 1 and len(seq) - 1 <= T:
            before = torch.tensor(seq[:-1], device=tokens.device)
            banned[:, seq[-1]] |= (tokens[:, T - len(seq) + 1 :] == before).all(dim=1)
    return logits.masked_fill(banned, float("-inf"))


class LogitsProcessors:
    """The processors ``options`` asks for, over rows whose tokens so far are given at each call."""

    def __init__(self, options: GenerationOptions, vocab_size: int, eos: int | None, device: torch.device) -> None:
        """Prepare what the processors need once (the bias as tensors)."""
        self.options = options
        self.eos = eos
        self.vocab_size = vocab_size
        self.bias_ids = self.bias = None
        if options.logit_bias:
            ids, values = zip(*options.logit_bias, strict=True)
            if max(ids) >= vocab_size:
                raise ValueError(f"logit_bias names token {max(ids)}, outside the vocabulary (0..{vocab_size - 1})")
            self.bias_ids = torch.tensor(ids, device=device)
            self.bias = torch.tensor(values, device=device)
        if any(t >= vocab_size for seq in options.bad_words_ids for t in seq):
            raise ValueError(f"bad_words_ids holds an id outside the vocabulary (0..{vocab_size - 1})")
        # As in transformers, the end token alone is not a bad word (ban it with logit_bias instead).
        self.bad_words = tuple(seq for seq in options.bad_words_ids if seq != (eos,))
        self.active = bool(
            options.repetition_penalty != 1.0 or options.presence_penalty or options.frequency_penalty
            or self.bias is not None or options.no_repeat_ngram_size or self.bad_words
            or (options.min_new_tokens and eos is not None) or options.logits_processor
        )

    @property
    def needs_counts(self) -> bool:
        """Whether the caller must keep counts of the generated tokens."""
        return bool(self.options.presence_penalty or self.options.frequency_penalty)

    def __call__(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        *,
        penalty_history: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
        new_tokens: int = 0,
    ) -> torch.Tensor:
        """Apply the processors to ``logits`` ``(B, V)`` of rows whose tokens so far are ``tokens`` ``(B, T)``.

        ``penalty_history`` is ``tokens`` with padding replaced (for the repetition
        penalty), ``counts`` ``(B, V)`` counts the generated tokens and
        ``new_tokens`` is how many have been generated.
        """
        o = self.options
        if not self.active:
            return logits
        if o.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, penalty_history if penalty_history is not None else tokens,
                                              o.repetition_penalty)
        if counts is not None and self.needs_counts:
            logits = apply_presence_frequency_penalty(logits, counts, o.presence_penalty, o.frequency_penalty)
        if self.bias is not None:
            logits = apply_logit_bias(logits, self.bias_ids, self.bias)
        if o.no_repeat_ngram_size:
            logits = ban_repeated_ngrams(logits, tokens, o.no_repeat_ngram_size)
        if self.bad_words:
            logits = ban_bad_words(logits, tokens, self.bad_words)
        if new_tokens < o.min_new_tokens and self.eos is not None:
            logits = logits.index_fill(1, torch.tensor([self.eos], device=logits.device), float("-inf"))
        for hook in o.logits_processor:
            logits = hook(tokens, logits)
            if not isinstance(logits, torch.Tensor) or logits.shape != (tokens.shape[0], self.vocab_size):
                raise ValueError(f"logits_processor {hook!r} must return logits of shape "
                                 f"{(tokens.shape[0], self.vocab_size)}")
        return logits
