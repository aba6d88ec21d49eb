"""Sentence embeddings from a GPT-2: its final hidden states, pooled over a text's tokens and normalised.

GPT-2 was not trained for embeddings; pooled hidden states are still what
``/v1/embeddings`` serves for it (as vLLM and llama.cpp's server do for decoder
models): the mean over the tokens by default, or the last token's state (which
has read the whole text, causal attention seeing only leftwards).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from gpt2lite.generation.batching import right_pad
from gpt2lite.models.gpt2 import GPT2

__all__ = ["POOLINGS", "Pooling", "embed"]

Pooling = Literal["mean", "last"]
POOLINGS: tuple[Pooling, ...] = ("mean", "last")


@torch.inference_mode()
def embed(model: GPT2, token_lists: Sequence[Sequence[int]], *, pooling: Pooling = "mean", normalize: bool = True,
          batch_size: int = 16) -> torch.Tensor:
    """One vector per token list, ``(N, n_embd)`` float32: hidden states after ``ln_f``, pooled, L2-normalised.

    Example::

        ids = [tokenizer.encode("A cat sat."), tokenizer.encode("A dog ran.")]
        vectors = embed(model, ids)          # (2, 768), each of length 1
        similarity = vectors[0] @ vectors[1]
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if any(len(ids) == 0 for ids in token_lists):
        raise ValueError("a text to embed has no tokens")
    out = []
    for start in range(0, len(token_lists), batch_size):
        ids, mask = right_pad(token_lists[start : start + batch_size], 0)  # (B, T) each
        ids, mask = ids.to(model.device), mask.to(model.device)
        hidden = model.hidden_states(ids, attention_mask=mask).float()  # (B, T, C)
        if pooling == "mean":
            weights = mask.to(hidden.dtype)[:, :, None]  # (B, T, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1)  # (B, C)
        else:
            last = mask.long().sum(1) - 1  # (B,): each row's last real token
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, C)
        out.append(F.normalize(pooled, dim=-1) if normalize else pooled)
    return torch.cat(out).cpu()
