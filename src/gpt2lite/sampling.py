"""Choosing the next token: small side-effect-free functions over logits.

Each filter takes logits ``(B, V)`` and returns new logits with the removed
tokens set to ``-inf``; nothing is modified in place. The order matches
``transformers``: repetition penalty, temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "SamplingConfig",
    "apply_repetition_penalty",
    "choose_next",
    "min_p_filter",
    "sample",
    "top_k_filter",
    "top_p_filter",
]


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens; ``temperature=0`` is greedy. Checked when built."""

    temperature: float = 1.0
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # 1.0 keeps every token
    min_p: float = 0.0  # 0.0 keeps every token
    repetition_penalty: float = 1.0  # 1.0 penalises nothing

    def __post_init__(self) -> None:
        t, k, p, m, r = self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {t!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {k!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {p!r}")
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 disables it), got {m!r}")
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 disables it), got {r!r}")

    @property
    def greedy(self) -> bool:
        """Whether the most likely token is always taken."""
        return self.temperature == 0


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


def choose_next(
    logits: torch.Tensor,
    config: SamplingConfig,
    *,
    history: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each row, ``(B,)``, under ``config``; ``history`` feeds the repetition penalty."""
    if history is not None:
        logits = apply_repetition_penalty(logits, history, config.repetition_penalty)
    if config.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / config.temperature
    logits = top_k_filter(logits, config.top_k)
    logits = top_p_filter(logits, config.top_p)
    logits = min_p_filter(logits, config.min_p)
    return sample(logits, generator=generator)
