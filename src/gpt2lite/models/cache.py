"""The key/value cache of a transformer's decoding state: allocated once, written at explicit slots.

One cache holds ``B`` rows of up to ``max_length`` slots each. Every forward pass
writes its new keys/values at each row's next free slots (``lengths``, a tensor
with one entry per row), so rows may be at different lengths: a row can be
emptied and refilled with a new prompt while the others keep decoding
(continuous batching), rows can be reordered (beam search) and a row can be cut
back to an earlier length (speculative decoding). ``valid`` marks which slots
hold real tokens (left padding does not), and is the attention mask.

In ``static`` mode every forward attends over all ``max_length`` slots, so each
decode step has the same shapes and a compiled step can be captured once as a
CUDA graph. Otherwise attention reads only the slots in use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["KVCache", "StepPlan", "visible_slots"]


def visible_slots(valid: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
    """Attention mask ``(R, 1, T, S)``: each query sees the valid slots up to its own, and always itself.

    ``valid`` ``(R, S)`` marks slots holding real tokens; ``query_slots`` ``(R, T)``
    is each new token's slot. Seeing itself keeps a padding query's row non-empty:
    an all-masked row would give NaN, which would then leak into later steps.
    """
    k_slot = torch.arange(valid.shape[1], device=valid.device)  # (S,)
    q_slot = query_slots[:, :, None]  # (R, T, 1)
    allowed = (valid[:, None, :] & (k_slot <= q_slot)) | (k_slot == q_slot)  # (R, T, S)
    return allowed[:, None]  # (R, 1, T, S)


@dataclass
class StepPlan:
    """Where one forward pass of ``T`` new tokens per row goes; made by ``KVCache.plan``."""

    rows: torch.Tensor | None  # (R,) rows written, or None for every row in order
    slots: torch.Tensor  # (R, T) cache slot of each new token
    position_ids: torch.Tensor  # (R, T) learned-position index of each new token
    mask: torch.Tensor | None  # (R, 1, T, S) which slots each query sees; None: see `is_causal`
    is_causal: bool  # with mask None: causal over the T new tokens (True) or everything (False)
    width: int  # S: the slots attention reads
    slot: int | None  # with every row at the same length and unpadded: the first slot, as an int
    span: tuple[int, int] | None = None  # `rows` as a contiguous range [start, stop): read as a view, not a copy


class KVCache:
    """Keys and values of every layer for ``batch_size`` rows; the decoding state of ``GPT2``.

    >>> cache = KVCache(n_layer=2, batch_size=3, n_head=4, max_length=16, head_dim=8)
    >>> len(cache.k), cache.k[0].shape  # one (B, nh, max_length, hs) buffer per layer
    (2, torch.Size([3, 4, 16, 8]))
    >>> cache.lengths.tolist()
    [0, 0, 0]
    """

    def __init__(
        self,
        *,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_length: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        static: bool = False,
    ) -> None:
        """Allocate zeroed buffers; ``static=True`` fixes the shapes of every step (for ``torch.compile``)."""
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"a cache needs batch_size >= 1 and max_length >= 1, got {batch_size}, {max_length}")
        shape = (batch_size, n_head, max_length, head_dim)
        # One buffer per layer, not one 5-D tensor: a compiled step writes each layer's buffer in
        # place, where a write into a slice of a shared tensor makes it copy the whole cache.
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        device = self.k[0].device
        self.valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # slots filled per row
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)  # next position id per row
        self.static = static
        # Host-side mirror of `lengths`, so that shapes, fast paths and the check for room need no
        # device sync. A step inside a compiled graph leaves it alone (the graph would guard on its
        # values): whoever runs compiled steps (DecodeSession) checks room before and counts after
        # them, and `recount` mends it after a step that failed part way.
        self._host_lengths = [0] * batch_size
        self.counts = 0  # how many times the host count moved: a compiled step that did not move it ran traced
        self._padded = False  # some slot below a row's length holds padding
        if static:
            for t in (*self.k, *self.v, self.valid, self.lengths, self.positions):
                torch._dynamo.mark_static_address(t)  # updated in place by a captured CUDA graph

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return self.valid.shape[0]

    @property
    def max_length(self) -> int:
        """Slots per row."""
        return self.valid.shape[1]

    @property
    def device(self) -> torch.device:
        """Where the buffers live."""
        return self.valid.device

    # the forward pass ------------------------------------------------------------

    def plan(self, T: int, input_mask: torch.Tensor | None = None, rows: Sequence[int] | None = None) -> StepPlan:
        """Reserve slots for ``T`` new tokens per row (of ``rows``, default all); mark them valid.

        ``input_mask`` ``(R, T)`` marks left padding among the new tokens with 0;
        padding gets a slot but is never attended to. Call ``commit`` after the
        forward pass that used the plan.
        """
        if rows is not None:
            rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        # Not inside a compiled step: the graph would guard on the host count's values.
        ends = None if torch.compiler.is_compiling() else self.check_room(T, rows)
        index = None if rows is None else torch.as_tensor(rows, dtype=torch.long, device=self.device)
        lengths = self.lengths if index is None else self.lengths[index]  # (R,)
        positions = self.positions if index is None else self.positions[index]  # (R,)
        offsets = torch.arange(T, device=self.device)
        slots = lengths[:, None] + offsets  # (R, T)
        if input_mask is None:
            position_ids = positions[:, None] + offsets  # (R, T)
            new_valid = torch.ones_like(slots, dtype=torch.bool)
        else:
            position_ids = positions[:, None] + (input_mask.long().cumsum(-1) - 1).clamp(min=0)  # (R, T)
            new_valid = input_mask.bool()
        row_index = torch.arange(self.batch_size, device=self.device) if index is None else index
        self.valid[row_index[:, None], slots] = new_valid

        if self.static:
            width = self.max_length
            return StepPlan(index, slots, position_ids, self._mask(index, slots, width), False, width, None)
        ends = self._ends(T, rows) if ends is None else ends
        width = max(ends)  # the rows fed hold nothing valid past their own ends
        uniform = rows is None and input_mask is None and not self._padded and len(set(ends)) == 1
        if not uniform:
            span = (rows[0], rows[-1] + 1) if rows and rows == list(range(rows[0], rows[-1] + 1)) else None
            return StepPlan(index, slots, position_ids, self._mask(index, slots, width), False, width, None, span)
        start = ends[0] - T
        if start == 0 or T == 1:  # all of the prompt causally, or one token that sees everything
            return StepPlan(None, slots, position_ids, None, T > 1, width, start)
        q = torch.arange(start, start + T, device=self.device)[:, None]  # (T, 1)
        mask = torch.arange(width, device=self.device)[None, :] <= q  # (T, S)
        return StepPlan(None, slots, position_ids, mask[None, None], False, width, start)

    def _mask(self, index: torch.Tensor | None, slots: torch.Tensor, width: int) -> torch.Tensor:
        """The slots each of the rows' queries may see, ``(R, 1, T, S)``: see ``visible_slots``."""
        return visible_slots((self.valid if index is None else self.valid[index])[:, :width], slots)

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: StepPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new ``k``/``v`` ``(R, nh, T, hs)`` at the planned slots; return what attention reads.

        The result is ``(R, nh, S, hs)``: a view of the buffers for all rows, a copy for a subset.
        """
        kl, vl = self.k[layer], self.v[layer]  # (B, nh, max_length, hs)
        T = k.shape[2]
        if plan.slot is not None:
            kl[:, :, plan.slot : plan.slot + T] = k
            vl[:, :, plan.slot : plan.slot + T] = v
        else:
            row_index = (torch.arange(kl.shape[0], device=kl.device) if plan.rows is None else plan.rows)[:, None]
            kl[row_index, :, plan.slots] = k.transpose(1, 2)  # indexed as (R, T, nh, hs)
            vl[row_index, :, plan.slots] = v.transpose(1, 2)
        if plan.span is not None:
            kl, vl = kl[plan.span[0] : plan.span[1]], vl[plan.span[0] : plan.span[1]]
        elif plan.rows is not None:
            kl, vl = kl[plan.rows], vl[plan.rows]
        return kl[:, :, : plan.width], vl[:, :, : plan.width]  # (R, nh, S, hs)

    def commit(self, plan: StepPlan, input_mask: torch.Tensor | None = None) -> None:
        """Advance the rows of ``plan`` past the tokens it placed."""
        T = plan.slots.shape[1]
        added = T if input_mask is None else input_mask.long().sum(-1)
        if plan.rows is None:
            self.lengths += T
            self.positions += added
        else:
            self.lengths.index_add_(0, plan.rows, torch.full_like(plan.rows, T))
            self.positions.index_add_(0, plan.rows, added if input_mask is not None else torch.full_like(plan.rows, T))
        if not torch.compiler.is_compiling():
            self.count(T, None if plan.rows is None else plan.rows.tolist())
        if not self.static:
            self._padded |= input_mask is not None

    def check_room(self, T: int, rows: Sequence[int] | None = None) -> list[int]:
        """Refuse ``T`` more tokens in ``rows`` (default: all) where a row has no room; else each row's new end."""
        ends = self._ends(T, rows)
        if max(ends) > self.max_length:
            raise ValueError(f"the cache holds {self.max_length} slots per row; {max(ends)} are needed")
        return ends

    def _ends(self, T: int, rows: Sequence[int] | torch.Tensor | None) -> list[int]:
        """Where each of ``rows`` (default: all) would end after ``T`` more tokens, from the host count."""
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else rows
        return [self._host_lengths[r] + T for r in (range(self.batch_size) if rows is None else rows)]

    def count(self, T: int, rows: Sequence[int] | None = None) -> None:
        """Count ``T`` more tokens in ``rows`` (default: all) on the host (``commit`` does, outside compiled steps)."""
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else rows
        for r in range(self.batch_size) if rows is None else rows:
            self._host_lengths[r] += T
        self.counts += 1

    def recount(self) -> None:
        """Take the host count from ``lengths`` again (one device sync), after a step that failed part way."""
        self._host_lengths = self.lengths.tolist()

    # row management ---------------------------------------------------------------

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Empty ``rows`` (default: all) so that a new prompt can be prefilled into them."""
        index = slice(None) if rows is None else torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.lengths[index] = 0
        self.positions[index] = 0
        self.valid[index] = False
        for r in range(self.batch_size) if rows is None else rows:
            self._host_lengths[r] = 0
        if rows is None:
            self._padded = False

    def reorder(self, index: Sequence[int] | torch.Tensor) -> None:
        """Make row ``i`` a copy of row ``index[i]`` (beam search), in place."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        if index.shape != (self.batch_size,):
            raise ValueError(
                f"reorder needs one source row per row: shape ({self.batch_size},), got {tuple(index.shape)}"
            )
        used = self.max_length if self.static else max(self._host_lengths)
        moved = (index != torch.arange(self.batch_size, device=self.device)).nonzero().flatten()
        if moved.numel() == 0:
            return
        source = index[moved]
        for buf in (*self.k, *self.v):  # only the rows that change are copied
            buf[moved, :, :used] = buf[source, :, :used]
        for buf in (self.valid, self.lengths, self.positions):
            buf[moved] = buf[source]
        before = self._host_lengths
        self._host_lengths = [before[i] for i in index.tolist()]

    def truncate(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        """Cut each of ``rows`` back to its entry of ``lengths`` filled slots (speculative decoding's rollback)."""
        for r, n in zip(rows, lengths, strict=True):
            current = self._host_lengths[r]
            if not 0 <= n <= current:
                raise ValueError(f"cannot truncate row {r} to {n} slots: it holds {current}")
            self.valid[r, n:] = False
            self.lengths[r] = n
            self.positions[r] = self.valid[r, :n].sum()
            self._host_lengths[r] = n
