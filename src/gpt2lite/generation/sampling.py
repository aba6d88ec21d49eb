"""Choosing the next token: small side-effect-free functions over logits.

Each filter takes logits ``(B, V)`` and returns new logits with the removed
tokens set to ``-inf``; nothing is modified in place. Names, meanings and order
are ``transformers``': temperature, top-k, top-p, min-p, typical-p, epsilon and
eta sampling, after the penalties and bans of ``processors.py`` (the repetition
penalty is defined here and applied there). Every filter keeps at least the most
likely token.
"""

from __future__ import annotations

import torch

from gpt2lite.generation.options import GenerationOptions

__all__ = [
    "apply_repetition_penalty",
    "choose_next",
    "epsilon_filter",
    "eta_filter",
    "filtered_logits",
    "min_p_filter",
    "sample",
    "top_k_filter",
    "top_p_filter",
    "typical_filter",
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


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of log-probabilities ``(..., V)``, ``(..., 1)``; removed tokens (-inf) count nothing."""
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1, keepdim=True)


def typical_filter(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling (Meister et al., 2022): keep the tokens whose surprise is closest to the entropy.

    Tokens are taken in order of ``|-log p - H|`` until they hold ``mass`` of the
    probability; the token that crosses ``mass`` stays, and so does any tied with it.
    """
    if mass >= 1.0:
        return logits
    logp = logits.float().log_softmax(dim=-1)
    distance = (-logp - _entropy(logp)).abs()  # (B, V); removed tokens are at +inf
    order = distance.argsort(dim=-1, stable=True)
    held = logp.gather(-1, order).exp().cumsum(dim=-1)  # probability of the closest tokens, in that order
    crossing = (held < mass).sum(dim=-1, keepdim=True).clamp(max=logits.shape[-1] - 1)  # (B, 1)
    limit = distance.gather(-1, order).gather(-1, crossing)  # the distance of the token that crosses `mass`
    drop = distance > limit
    drop.scatter_(-1, order[..., :1], False)  # the closest token always stays
    return logits.masked_fill(drop, float("-inf"))


def _below(logits: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Drop tokens whose probability is under ``threshold``, keeping the most likely one(s)."""
    probs = logits.float().softmax(dim=-1)
    best = logits.amax(dim=-1, keepdim=True)
    return logits.masked_fill((probs < threshold) & (logits < best), float("-inf"))


def epsilon_filter(logits: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Epsilon sampling (Hewitt et al., 2022): drop tokens less likely than ``epsilon``."""
    if epsilon <= 0.0:
        return logits
    return _below(logits, epsilon)


def eta_filter(logits: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Eta sampling (Hewitt et al., 2022): drop tokens less likely than ``min(epsilon, sqrt(epsilon) * exp(-H))``."""
    if epsilon <= 0.0:
        return logits
    entropy = _entropy(logits.float().log_softmax(dim=-1))
    eta = torch.minimum(torch.tensor(epsilon), torch.tensor(epsilon).sqrt() * (-entropy).exp())  # (B, 1)
    return _below(logits, eta)


def sample(logits: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from ``softmax(logits)``; returns ``(B,)``."""
    probs = logits.float().softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def filtered_logits(logits: torch.Tensor, options: GenerationOptions) -> torch.Tensor:
    """The distribution that is sampled: temperature and every filter applied to logits ``(B, V)``."""
    logits = logits.float()
    # Shift the largest logit to 0 before scaling: the softmax is the same, and a tiny
    # temperature then sends the others to -inf instead of making inf - inf = NaN.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / options.temperature
    logits = top_k_filter(logits, options.top_k)
    logits = top_p_filter(logits, options.top_p)
    logits = min_p_filter(logits, options.min_p)
    logits = typical_filter(logits, options.typical_p)
    logits = epsilon_filter(logits, options.epsilon_cutoff)
    return eta_filter(logits, options.eta_cutoff)


def choose_next(
    logits: torch.Tensor, options: GenerationOptions, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token of each row, ``(B,)``: the most likely, or a draw from ``filtered_logits``."""
    if options.greedy:
        return logits.argmax(dim=-1)
    return sample(filtered_logits(logits, options), generator=generator)
