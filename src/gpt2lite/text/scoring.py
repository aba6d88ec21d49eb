"""Scoring text: perplexity over sliding windows, and log-probabilities of a continuation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from gpt2lite.errors import NonFiniteError
from gpt2lite.generation.context import check_window
from gpt2lite.models.protocol import DecoderModel

__all__ = ["perplexity", "token_logprobs"]

_NON_FINITE = (
    "the model produced non-finite logits (NaN or inf): its weights are likely non-finite (a diverged training "
    "run) or half precision overflowed; check the checkpoint, or load it in float32"
)


def _as_ids(ids: Sequence[int] | torch.Tensor, name: str, vocab_size: int) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long).flatten() if not isinstance(ids, torch.Tensor) else ids.flatten().long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
        raise ValueError(f"{name} holds ids outside the vocabulary (0..{vocab_size - 1})")
    return t


def _windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first)`` of each window: tokens ``[begin, end)``, scoring targets ``first..end-1``.

    Each token after the first is scored once, in the first window that holds it
    with context, as the ``transformers`` documentation on perplexity describes.
    """
    windows, scored_to = [], 1  # tokens [1, scored_to) are scored already
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        if end > scored_to:
            windows.append((begin, end, max(scored_to, begin + 1)))
            scored_to = end
        if end == n:
            break
    return windows


@torch.inference_mode()
def perplexity(
    model: DecoderModel,
    ids: Sequence[int] | torch.Tensor,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """Perplexity of a token sequence: ``exp`` of the mean loss of every token after the first.

    A sequence longer than ``max_length`` (default: the model's context, 1024 for a
    recurrent model) is
    scored in windows that start ``stride`` tokens apart (default: half a
    window), ``batch_size`` windows per forward pass; ``progress`` shows a bar.
    """
    ids = _as_ids(ids, "ids", model.config.vocab_size)
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    context = model.config.n_positions  # None for recurrent models: no limit
    if max_length is None:
        max_length = min(context or 1024, 1024)
    check_window(max_length, context, "max_length", least=2)
    if stride is None:
        stride = max(1, max_length // 2)
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= max_length:
        raise ValueError(f"stride must be an int in 1..max_length ({max_length}), got {stride!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    ids = ids.to(model.device)
    windows = _windows(ids.numel(), max_length, stride)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(windows), desc="perplexity", unit="window")
    total, count = 0.0, 0
    # Windows of equal length share a forward pass; only the last one can be shorter.
    groups: list[list[tuple[int, int, int]]] = []
    for w in windows:
        if groups and len(groups[-1]) < batch_size and groups[-1][0][1] - groups[-1][0][0] == w[1] - w[0]:
            groups[-1].append(w)
        else:
            groups.append([w])
    try:  # the bar is closed before any error leaves, so the error is the last thing shown
        for group in groups:
            batch = torch.stack([ids[begin:end] for begin, end, _ in group])  # (G, T)
            logits = model(batch).float()  # (G, T, vocab)
            for row, (begin, end, first) in enumerate(group):
                f = first - begin  # first target position within the window
                total += F.cross_entropy(logits[row, f - 1 : -1], batch[row, f:], reduction="sum").item()
                count += end - first
            if bar is not None:
                bar.update(len(group))
    finally:
        if bar is not None:
            bar.close()
    if not math.isfinite(total):
        raise NonFiniteError(_NON_FINITE)
    return math.exp(total / count)


@torch.inference_mode()
def token_logprobs(
    model: DecoderModel, prompt_ids: Sequence[int] | torch.Tensor, continuation_ids: Sequence[int] | torch.Tensor
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
    scores = logits.log_softmax(-1).gather(1, continuation.to(model.device)[:, None]).squeeze(1).cpu()
    if not bool(torch.isfinite(scores).all()):
        raise NonFiniteError(_NON_FINITE)
    return scores
