"""A decoding session: ``B`` rows over one decoding state that the session owns.

``DecodeSession`` feeds tokens to any model that follows
``gpt2lite.models.protocol`` and owns the state it made: nothing is kept on the
model, two sessions never share a cache, and a session's memory goes with it. The
decode loop (``loop.py``), beam search, speculative decoding and the server's
scheduler all run on sessions.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from gpt2lite.models.protocol import DecoderModel, DecodeState

__all__ = ["DecodeSession"]


class DecodeSession:
    """``batch_size`` rows decoding together over one state that this session owns.

    Rows are fed independently: prefill some, step all, empty one and prefill a
    new prompt into it while the others go on (continuous batching), reorder
    them (beam search), cut them back (speculative decoding). With
    ``compile=True`` the state has fixed shapes and one-token steps of the whole
    batch run a ``torch.compile``'d step (CUDA graphs on a GPU); everything else
    runs eagerly on the same state.

    >>> import torch
    >>> from gpt2lite import GPT2, GPT2Config
    >>> model = GPT2(GPT2Config.from_preset("tiny")).eval()
    >>> session = DecodeSession(model, batch_size=2, max_length=16)
    >>> session.feed(torch.tensor([[1, 2, 3], [4, 5, 6]])).shape  # logits of each row's last token
    torch.Size([2, 1, 50257])
    >>> session.feed(torch.tensor([[7]]), rows=[1]).shape  # row 1 alone goes on
    torch.Size([1, 1, 50257])
    """

    def __init__(self, model: DecoderModel, batch_size: int, max_length: int, *, compile: bool = False) -> None:
        """Make an empty state for ``batch_size`` rows of up to ``max_length`` tokens each."""
        self.model = model
        self.state: DecodeState = model.new_state(batch_size, max_length, static=compile)
        self._compiled = _compiled_step(model, self.state.device.type) if compile else None

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return self.state.batch_size

    def feed(
        self,
        input_ids: torch.Tensor,
        *,
        input_mask: torch.Tensor | None = None,
        rows: Sequence[int] | None = None,
        last_only: bool = True,
    ) -> torch.Tensor:
        """Append tokens ``(R, T)`` to ``rows`` (default: all); logits ``(R, T or 1, vocab)``.

        See ``DecoderModel.feed``.
        """
        if self._compiled is not None and rows is None and input_mask is None and input_ids.shape[1] == 1:
            return self._compiled_feed(input_ids)
        return self.model.feed(input_ids, self.state, input_mask=input_mask, rows=rows, last_only=last_only)

    def _compiled_feed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One token for every row through the compiled step (eagerly once dynamo refuses another graph)."""
        # Inside the graph the cache cannot refuse a full row or count on the host (KVCache's
        # check_room, count and recount, where the state has them): done around it.
        state = self.state
        counts = getattr(state, "counts", None)
        if counts is not None:
            state.check_room(1)
        try:
            # Without gradients: a compiled step that records them failed on its cache writes
            # ("The size of tensor a (16) must match the size of tensor b (2)").
            with torch.no_grad():
                logits = self._compiled(self.model, input_ids, state)
        except Exception as e:
            if counts is not None:
                state.recount()  # the graph may have advanced the cache before it raised
            # Dynamo's limit of graphs per function, which fullgraph=True makes an error; it is
            # raised before the step runs, so the state is untouched.
            if not isinstance(e, _recompile_limit_errors()):
                raise
            warnings.warn("this model's compiled step has as many graphs as dynamo allows "
                          "(torch._dynamo.config.recompile_limit): this session goes on eagerly",
                          RuntimeWarning, stacklevel=3)
            self._compiled = None
            return self.model.feed(input_ids, state)
        if counts is not None and state.counts == counts:  # it ran traced: nothing counted it
            state.count(1)
        # A CUDA graph reuses its output buffer at the next replay: hand out a copy.
        return logits.clone() if logits.device.type == "cuda" else logits

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Empty ``rows`` (default: all) for new prompts."""
        self.state.reset(rows)

    def reorder(self, index: Sequence[int] | torch.Tensor) -> None:
        """Make row ``i`` a copy of row ``index[i]``."""
        self.state.reorder(index)

    def truncate(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        """Cut ``rows`` back to ``lengths`` tokens."""
        self.state.truncate(rows, lengths)


_COMPILED: dict[tuple[object, ...], Callable[..., torch.Tensor]] = {}


def _feed_one(model: DecoderModel, input_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
    return model.feed(input_ids, state)


def _recompile_limit_errors() -> tuple[type[Exception], ...]:
    """What dynamo raises when a fullgraph function reaches its graph limit (older releases: FailOnCacheLimitHit)."""
    exc = torch._dynamo.exc  # imported by now: a compiled step has just run
    names = ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")
    return tuple(getattr(exc, name) for name in names if hasattr(exc, name))


def _structure(model: DecoderModel) -> tuple[object, ...]:
    """The layers' types and the tensors' names, shapes and dtypes: models that differ here never share graphs.

    Dynamo's guards still check everything else on each call (a GELU against a
    ReLU, an epsilon), so models that match here but differ there only cost
    graphs of the same function, never a wrong step.
    """
    if not isinstance(model, nn.Module):
        return (type(model),)
    layers = tuple(type(m) for m in model.modules())
    tensors = tuple((name, tuple(t.shape), t.dtype) for name, t in (*model.named_parameters(),
                                                                      *model.named_buffers()))
    return layers, tensors


def _compiled_step(model: DecoderModel, device_type: str) -> Callable[..., torch.Tensor]:
    """The compiled one-token step for models shaped like ``model``, made once and shared by their sessions.

    Sessions pass their own state in; its tensors are marked static, so a CUDA
    graph captured for one state's shapes is replayed for any state of the same
    shapes without copying the cache. Dynamo keeps a function's graphs, and its
    limit of 8 of them (``fullgraph=True`` makes passing it an error), on the
    function's code object: each model structure gets a code object of its own,
    so a process that compiles many different models never runs into another's
    limit. (torch 2.13's ``torch.compile(isolate_recompiles=True)`` does the same;
    a copied code object does it on every torch we support.)
    """
    key = (device_type, _structure(model))
    if key not in _COMPILED:
        step = types.FunctionType(_feed_one.__code__.replace(), _feed_one.__globals__, _feed_one.__name__)
        mode = "reduce-overhead" if device_type == "cuda" else None
        _COMPILED[key] = torch.compile(step, mode=mode, fullgraph=True)
    return _COMPILED[key]
