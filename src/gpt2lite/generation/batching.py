"""Batches of token lists of different lengths: padded to one tensor, with an attention mask.

Generation pads prompts on the left (every row's next token then sits in the last
column); training and classification pad on the right.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["left_pad", "right_pad"]


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(B, T)`` and attention mask ``(B, T)`` for prompts of any lengths, padded on the left.

    >>> ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    return _pad(prompts, pad_token_id, left=True)


def right_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(B, T)`` and attention mask ``(B, T)`` for rows of any lengths, padded on the right.

    >>> ids, mask = right_pad([[5, 6, 7], [8]], pad_token_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    """
    return _pad(rows, pad_token_id, left=False)


def _pad(rows: Sequence[Sequence[int]], pad_token_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not rows or any(len(r) == 0 for r in rows):
        side = "left" if left else "right"
        raise ValueError(f"{side}_pad needs a non-empty list of non-empty {'prompts' if left else 'rows'}")
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.as_tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask
