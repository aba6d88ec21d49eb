"""Choosing the next token: small side-effect-free functions over logits.

Each filter takes logits ``(B, V)`` and returns new logits with the removed
tokens set to ``-inf``; nothing is modified in place. The order matches
``transformers``: temperature, top-k, top-p, min-p, after the penalties and bans
of ``processors.py`` (the repetition penalty is defined here and applied there).
"""

from __future__ import annotations

import torch

from gpt2lite.generation.options import GenerationOptions

__all__ = [
    "apply_repetition_penalty",
    "choose_next",
    "filtered_logits",
    "min_p_filter",
    "sample",
    "top_k_filter",
    "top_p_filter",
]


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens that occur in ``history`` ``(B, T)`` less likely (the CTRL paper's penalty).

    A positive logit is divided by ``penalty``, a negative one multiplied, once per distinct token.
    """
    if penalty == 1.0:
        return logits
    seen = logits.gather(1, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, history, seen)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (and any tied with the k-th)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability reaches ``p``.

    A token is kept when the tokens more likely than it sum to less than ``p``,
    so the most likely token always stays.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep tokens at least ``p`` times as likely as the most likely one."""
    if p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample(logits: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from ``softmax(logits)``; returns ``(B,)``."""
    probs = logits.float().softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def filtered_logits(logits: torch.Tensor, options: GenerationOptions) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p applied to logits ``(..., V)``: the distribution that is sampled."""
    logits = logits.float()
    # Shift the largest logit to 0 before scaling: the softmax is the same, and a tiny
    # temperature then sends the others to -inf instead of making inf - inf = NaN.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / options.temperature
    logits = top_k_filter(logits, options.top_k)
    logits = top_p_filter(logits, options.top_p)
    return min_p_filter(logits, options.min_p)


def choose_next(
    logits: torch.Tensor, options: GenerationOptions, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token of each row, ``(B,)``: the most likely, or a draw from ``filtered_logits``."""
    if options.greedy:
        return logits.argmax(dim=-1)
    return sample(filtered_logits(logits, options), generator=generator)
