"""Scoring text: perplexity with a sliding window, and log-probabilities of a continuation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from gpt2lite.model import GPT2

__all__ = ["perplexity", "token_logprobs"]


def _as_ids(ids: Sequence[int] | torch.Tensor, name: str, vocab_size: int) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long).flatten() if not isinstance(ids, torch.Tensor) else ids.flatten().long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
        raise ValueError(f"{name} holds ids outside the vocabulary (0..{vocab_size - 1})")
    return t


@torch.inference_mode()
def perplexity(
    model: GPT2, ids: Sequence[int] | torch.Tensor, *, max_length: int | None = None, stride: int | None = None
) -> float:
    """Perplexity of a token sequence: ``exp`` of the mean loss of every token after the first.

    A sequence longer than ``max_length`` (default: the model's context) is
    scored in windows that start ``stride`` tokens apart (default: half a
    window); each token is scored once, in the first window that holds it with
    context, as the ``transformers`` documentation describes.
    """
    ids = _as_ids(ids, "ids", model.config.vocab_size)
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    max_length = max_length or model.config.n_positions
    if not 1 < max_length <= model.config.n_positions:
        raise ValueError(f"max_length must be in 2..{model.config.n_positions}, got {max_length}")
    stride = stride or max(1, max_length // 2)
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    ids = ids.to(model.device)
    total, count, scored_to = 0.0, 0, 1  # tokens [1, scored_to) are scored already
    for begin in range(0, ids.numel(), stride):
        end = min(begin + max_length, ids.numel())
        if end <= scored_to:
            continue
        window = ids[begin:end]
        logits = model(window[None])[0].float()  # (T, vocab)
        first = max(scored_to, begin + 1) - begin  # first target position within the window
        nll = F.cross_entropy(logits[first - 1 : -1], window[first:], reduction="sum")
        total += nll.item()
        count += end - begin - first
        scored_to = end
        if end == ids.numel():
            break
    return math.exp(total / count)


@torch.inference_mode()
def token_logprobs(
    model: GPT2, prompt_ids: Sequence[int] | torch.Tensor, continuation_ids: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """Log-probability of each continuation token given the prompt and the tokens before it: ``(n,)``."""
    prompt = _as_ids(prompt_ids, "prompt_ids", model.config.vocab_size)
    continuation = _as_ids(continuation_ids, "continuation_ids", model.config.vocab_size)
    if prompt.numel() == 0:
        raise ValueError("prompt_ids is empty; start from [50256] (<|endoftext|>) to score text on its own")
    if continuation.numel() == 0:
        raise ValueError("continuation_ids is empty: nothing to score")
    seq = torch.cat([prompt, continuation]).to(model.device)
    logits = model(seq[None])[0, prompt.numel() - 1 : -1].float()  # (n, vocab)
    return logits.log_softmax(-1).gather(1, continuation.to(model.device)[:, None]).squeeze(1).cpu()
