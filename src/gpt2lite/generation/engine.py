"""The decoding engine: a session that owns one decoding state, and the one decode loop built on it.

``DecodeSession`` holds the state of ``B`` rows (a ``KVCache`` for GPT-2) and
feeds tokens to any model that follows ``gpt2lite.models.protocol``. Nothing is
kept on the model: two sessions over one model never share a cache, and a
session's memory goes with it. ``generate`` and ``iter_tokens`` run the loop:
prefill the prompts, then pick a token per row, stop rows, feed the tokens back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from gpt2lite.errors import NonFiniteError
from gpt2lite.generation.options import GenerationKwargs, GenerationOptions
from gpt2lite.generation.sampling import choose_next
from gpt2lite.models.protocol import DecoderModel, DecodeState

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["DecodeSession", "generate", "iter_tokens", "left_pad"]

Prompt = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


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
        self._compiled = _compiled_step(self.state.device.type) if compile else None

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

        See ``DecoderModel.decode``.
        """
        if self._compiled is not None and rows is None and input_mask is None and input_ids.shape[1] == 1:
            logits = self._compiled(self.model, input_ids, self.state)
            # A CUDA graph reuses its output buffer at the next replay: hand out a copy.
            return logits.clone() if logits.device.type == "cuda" else logits
        return self.model.decode(input_ids, self.state, input_mask=input_mask, rows=rows, last_only=last_only)

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Empty ``rows`` (default: all) for new prompts."""
        self.state.reset(rows)

    def reorder(self, index: Sequence[int] | torch.Tensor) -> None:
        """Make row ``i`` a copy of row ``index[i]``."""
        self.state.reorder(index)

    def truncate(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        """Cut ``rows`` back to ``lengths`` tokens."""
        self.state.truncate(rows, lengths)


_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def _decode_one(model: DecoderModel, input_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
    return model.decode(input_ids, state)


def _compiled_step(device_type: str) -> Callable[..., torch.Tensor]:
    """The compiled one-token step, made once per device type and shared by every session.

    Sessions pass their own state in; its tensors are marked static, so a CUDA
    graph captured for one state's shapes is replayed for any state of the same
    shapes without copying the cache.
    """
    if device_type not in _COMPILED:
        mode = "reduce-overhead" if device_type == "cuda" else None
        _COMPILED[device_type] = torch.compile(_decode_one, mode=mode, fullgraph=True)
    return _COMPILED[device_type]


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(B, T)`` and attention mask ``(B, T)`` for prompts of any lengths, padded on the left.

    >>> ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("left_pad needs a non-empty list of non-empty prompts")
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return ids, mask


def generate(
    model: DecoderModel,
    input_ids: Prompt,
    options: GenerationOptions | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    **overrides: Unpack[GenerationKwargs],
) -> torch.Tensor:
    """Continue each prompt; returns ``(batch * num_return_sequences, time + new)`` token ids.

    ``input_ids`` is ``(batch, time)`` (a list of ids is one prompt);
    ``attention_mask`` marks left padding with 0. Options come from ``options``
    and keyword overrides (``temperature=0``, ``max_new_tokens=20``, ...). The
    result holds the prompt followed by the new tokens; it ends at the step
    where every row had finished, and rows that finished earlier are padded.
    """
    opts = GenerationOptions.build(options, overrides, "generate")
    prompt, mask = _prepare_prompt(model, input_ids, attention_mask, opts)
    steps = list(_decode(model, prompt, mask, opts, generator))
    if not steps:
        return prompt
    return torch.cat([prompt, torch.stack(steps, dim=1)], dim=1)


def iter_tokens(
    model: DecoderModel,
    input_ids: Prompt,
    options: GenerationOptions | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    **overrides: Unpack[GenerationKwargs],
) -> Iterator[torch.Tensor]:
    """Like ``generate``, but yield the new tokens of every row, ``(batch,)``, one step at a time."""
    opts = GenerationOptions.build(options, overrides, "iter_tokens")
    prompt, mask = _prepare_prompt(model, input_ids, attention_mask, opts)
    return _decode(model, prompt, mask, opts, generator)


def _device_of(model: DecoderModel) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")


def _prepare_prompt(
    model: DecoderModel, input_ids: Prompt, attention_mask: torch.Tensor | None, opts: GenerationOptions
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check the prompt against the model and options; return it (and its mask, if padded) on the model's device."""
    config = model.config
    vocab = config.vocab_size
    if not isinstance(input_ids, torch.Tensor):
        try:
            input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(
                "input_ids must be a list of ids or equal-length lists of ids (use attention_mask for "
                f"left padding, or the text API for strings): {exc}"
            ) from None
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids of shape (batch, time), got {input_ids.dtype} "
                         f"of shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if B == 0:
        raise ValueError("input_ids holds an empty batch")
    if T == 0:
        raise ValueError("input_ids holds no tokens; start from [[50256]] (<|endoftext|>) for unconditional text")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"token id {lo if lo < 0 else hi} in input_ids is outside the vocabulary (0..{vocab - 1})")
    for name in ("eos_token_id", "pad_token_id"):
        value = getattr(opts, name)
        if value is not None and value >= vocab:
            raise ValueError(f"{name} {value} is outside the vocabulary (0..{vocab - 1})")
    if any(t >= vocab for seq in opts.stop for t in seq):
        raise ValueError(f"a stop sequence holds an id outside the vocabulary (0..{vocab - 1})")
    context = config.n_positions
    if context is not None and T + opts.max_new_tokens > context:
        raise ValueError(
            f"prompt of {T} tokens + max_new_tokens={opts.max_new_tokens} exceeds the model's context of "
            f"{context} positions; shorten the prompt or lower max_new_tokens"
        )

    device = _device_of(model)
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            attention_mask = torch.as_tensor(attention_mask)
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must have the shape of input_ids {(B, T)}, "
                             f"got {tuple(attention_mask.shape)}")
        # Checked before any conversion: 0.5 must not quietly become 0.
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        attention_mask = attention_mask.to(device=device, dtype=torch.long)
        if (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
            raise ValueError("attention_mask has padding after a token: pad prompts on the left for generation")
        if (attention_mask[:, -1] == 0).any():
            raise ValueError("attention_mask has a row with no tokens")
        if bool(attention_mask.all()):
            attention_mask = None  # no padding: take the faster unmasked path
    n = opts.num_return_sequences
    if n > 1:
        input_ids = input_ids.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0) if attention_mask is not None else None
    return input_ids, attention_mask


def _decode(
    model: DecoderModel,
    prompt: torch.Tensor,
    mask: torch.Tensor | None,
    opts: GenerationOptions,
    generator: torch.Generator | None,
) -> Iterator[torch.Tensor]:
    """The decode loop: one forward over the prompt, then one token per step into the session's state.

    Each step runs under its own ``inference_mode`` so that the caller's code
    between yields runs in the grad mode it chose.
    """
    if opts.max_new_tokens == 0:
        return  # nothing to generate, so no forward pass either
    B, T = prompt.shape
    total = T + opts.max_new_tokens
    device = prompt.device
    config = model.config
    if generator is None and opts.seed is not None:
        generator = torch.Generator(device=device).manual_seed(opts.seed)
    end = opts.eos_token_id if opts.eos_token_id is not None else config.eos_token_id
    eos = None if opts.ignore_eos else end
    pad = next((t for t in (opts.pad_token_id, end) if t is not None), 0)
    stops = [torch.tensor(seq, device=device) for seq in opts.stop]
    # A compiled step is made for the whole context, so that one graph serves every prompt length.
    length = config.n_positions if opts.compile and config.n_positions is not None else total

    # Made outside inference mode: a compiled step's state outlives this call's first graph.
    session = DecodeSession(model, B, length, compile=opts.compile)
    with torch.inference_mode():
        # Every token so far, for the repetition penalty and stop sequences; padding is
        # replaced by the row's last prompt token so that it is never penalised.
        tokens = torch.empty(B, total, dtype=torch.long, device=device)
        tokens[:, :T] = prompt if mask is None else torch.where(mask.bool(), prompt, prompt[:, -1:])
        logits = session.feed(prompt, input_mask=mask)[:, -1]  # (B, vocab)
        finished = torch.zeros(B, dtype=torch.bool, device=device)

    for step in range(opts.max_new_tokens):
        with torch.inference_mode():
            cur = T + step
            history = tokens[:, :cur] if opts.repetition_penalty != 1.0 else None
            if opts.greedy:
                next_tokens = choose_next(logits, opts, history=history, generator=generator)
                # argmax picks NaN and +inf, and a row of -inf gives -inf: the chosen logit tells.
                _check_finite(logits.gather(1, next_tokens[:, None])[:, 0], step)
            else:
                logits = logits.contiguous()  # the batched LM head hands out a transposed view
                _check_finite(logits.amax(dim=-1), step)  # before sampling, which would fail on NaN
                next_tokens = choose_next(logits, opts, history=history, generator=generator)
            next_tokens = torch.where(finished, pad, next_tokens)
            tokens[:, cur] = next_tokens
            if eos is not None:
                finished |= next_tokens == eos
            for seq in stops:
                n = seq.numel()
                if step + 1 >= n:
                    finished |= (tokens[:, cur + 1 - n : cur + 1] == seq).all(dim=1)
            done = step + 1 == opts.max_new_tokens or bool(finished.all())
            out = next_tokens.clone()
        yield out  # before the next forward, so a stream shows each token as soon as it is chosen
        if done:
            return
        with torch.inference_mode():
            logits = session.feed(next_tokens[:, None])[:, -1]


def _check_finite(row_values: torch.Tensor, step: int) -> None:
    """Stop with one clear error when a row's deciding logit (its max, or the one chosen) is NaN or inf.

    NaN and +inf propagate to both; a row of -inf leaves nothing to choose.
    """
    bad = ~torch.isfinite(row_values)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise NonFiniteError(
            f"the model produced non-finite logits (NaN or inf) at generation step {step}, rows {rows[:8]}: its "
            "weights are likely non-finite (a diverged training run) or half precision overflowed; check the "
            "checkpoint, or load it in float32"
        )
