"""The decode loop behind ``generate``: prompts in, one token per row per step, on a ``DecodeSession``.

``generate``, ``iter_tokens`` and ``iter_steps`` run the loop: prefill the
prompts, then pick a token per row, stop rows, feed the tokens back. Beam search
(``beam.py``) and speculative decoding (``speculative.py``) are other loops over
sessions, reached through ``generate``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gpt2lite.errors import OptionError
from gpt2lite.generation.beam import beam_search
from gpt2lite.generation.context import fit_prompt, shifted
from gpt2lite.generation.options import GenerationKwargs, GenerationOptions
from gpt2lite.generation.rules import Step, TokenRules, end_tokens, prompt_logprobs
from gpt2lite.generation.session import DecodeSession
from gpt2lite.generation.speculative import speculative_generate
from gpt2lite.models.protocol import DecoderModel
from gpt2lite.tokenizers.protocol import TokenizerProtocol

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["GenerateOutput", "generate", "iter_steps", "iter_tokens"]

Prompt = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


@dataclass
class GenerateOutput:
    """What ``generate(..., return_dict=True)`` returns.

    Log-probabilities are those of the model's own distribution (log-softmax of
    the raw logits, before penalties, temperature and filters), as the OpenAI API
    reports them. Entries after a row finished hold 0 (logprobs) or the pad token.
    """

    sequences: torch.Tensor  # (N, T + new): prompts, then the new tokens
    logprobs: torch.Tensor  # (N, new)
    finish_reason: list[str]  # "stop" (end token or stop sequence) or "length", per row
    top_logprobs: torch.Tensor | None = None  # (N, new, k)
    top_ids: torch.Tensor | None = None  # (N, new, k)
    prompt_logprobs: torch.Tensor | None = None  # (N, T); NaN for the first token and for padding
    scores: torch.Tensor | None = None  # (N,) beam search: each sequence's final score


def generate(
    model: DecoderModel,
    input_ids: Prompt,
    options: GenerationOptions | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_dict: bool = False,
    draft_model: DecoderModel | None = None,
    tokenizer: TokenizerProtocol | None = None,
    **overrides: Unpack[GenerationKwargs],
) -> torch.Tensor | GenerateOutput:
    """Continue each prompt; returns ``(batch * num_return_sequences, time + new)`` token ids.

    ``input_ids`` is ``(batch, time)`` (a list of ids is one prompt);
    ``attention_mask`` marks left padding with 0. Options come from ``options``
    and keyword overrides (``temperature=0``, ``max_new_tokens=20``, ...). The
    result holds the prompt followed by the new tokens; it ends at the step
    where every row had finished, and rows that finished earlier are padded.
    ``return_dict=True`` returns a ``GenerateOutput`` with log-probabilities and
    finish reasons. ``num_beams > 1`` runs beam search; a ``draft_model`` (same
    vocabulary, smaller) or ``prompt_lookup_num_tokens`` runs speculative decoding;
    ``context_shift=True`` goes on past the model's context. A structured-output
    constraint (``json_schema``, ``regex``, ``choice``, ``grammar``) is compiled
    against ``tokenizer`` (default: GPT-2's, for a model of its vocabulary).
    """
    opts = GenerationOptions.build(options, overrides, "generate")
    prompt, mask = _prepare_prompt(model, input_ids, attention_mask, opts)
    if opts.num_beams > 1 or draft_model is not None or opts.prompt_lookup_num_tokens:
        if draft_model is not None and opts.constraint is not None:  # the options refuse beams, prompt lookup
            raise OptionError(opts.constraint, f"{opts.constraint} does not combine with a draft model")
        if opts.num_beams > 1 and draft_model is not None:
            raise ValueError("beam search and speculative decoding (draft_model) do not combine")
        if opts.context_shift:
            raise ValueError("context_shift works with sampling and greedy decoding, not with a draft model")
        if draft_model is not None or opts.prompt_lookup_num_tokens:
            sequences, reasons = speculative_generate(model, draft_model, prompt, mask, opts, generator)
            scores = None
        else:
            sequences, scores, reasons = beam_search(model, prompt, mask, opts)
        if not return_dict:
            return sequences
        return _scored_output(model, sequences, prompt.shape[1], mask, opts, reasons, scores)
    steps = list(_loop(model, prompt, mask, opts, generator, tokenizer, with_logprobs=return_dict))
    sequences = torch.cat([prompt, torch.stack([s.tokens for s in steps], dim=1)], dim=1) if steps else prompt
    if not return_dict:
        return sequences
    B = prompt.shape[0]
    empty = torch.zeros(B, 0, device=prompt.device)

    def stacked(name: str) -> torch.Tensor | None:
        values = [getattr(s, name) for s in steps]
        return torch.stack(values, dim=1) if values and values[0] is not None else None

    logprobs = stacked("logprobs")
    return GenerateOutput(
        sequences=sequences,
        logprobs=logprobs if logprobs is not None else empty,
        finish_reason=_finish_reasons(steps, B),
        top_logprobs=stacked("top_logprobs"),
        top_ids=stacked("top_ids"),
        prompt_logprobs=(steps[0].prompt_logprobs if steps else _score_prompt(model, prompt, mask))
        if opts.prompt_logprobs else None,
    )


def iter_tokens(
    model: DecoderModel,
    input_ids: Prompt,
    options: GenerationOptions | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    tokenizer: TokenizerProtocol | None = None,
    **overrides: Unpack[GenerationKwargs],
) -> Iterator[torch.Tensor]:
    """Like ``generate``, but yield the new tokens of every row, ``(batch,)``, one step at a time."""
    return (step.tokens for step in iter_steps(model, input_ids, options, attention_mask=attention_mask,
                                               generator=generator, tokenizer=tokenizer, **overrides))


def iter_steps(
    model: DecoderModel,
    input_ids: Prompt,
    options: GenerationOptions | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    tokenizer: TokenizerProtocol | None = None,
    **overrides: Unpack[GenerationKwargs],
) -> Iterator[Step]:
    """Like ``iter_tokens``, but yield a ``Step`` with each token's log-probability (and top alternatives)."""
    opts = GenerationOptions.build(options, overrides, "iter_steps")
    if opts.num_beams > 1:
        raise ValueError("beam search cannot stream: its best sequences are known only at the end")
    if opts.prompt_lookup_num_tokens:
        raise ValueError("prompt lookup makes tokens in rounds of several: call generate(), not a stream")
    prompt, mask = _prepare_prompt(model, input_ids, attention_mask, opts)
    return _loop(model, prompt, mask, opts, generator, tokenizer, with_logprobs=True)


def _finish_reasons(steps: list[Step], B: int) -> list[str]:
    """'stop' for rows that finished (end token or stop sequence), 'length' for the others."""
    if not steps:
        return ["length"] * B
    return ["stop" if f else "length" for f in steps[-1].finished.tolist()]


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
            raise OptionError(name, f"{name} {value} is outside the vocabulary (0..{vocab - 1})")
    if any(t >= vocab for seq in opts.stop for t in seq):
        raise OptionError("stop", f"a stop sequence holds an id outside the vocabulary (0..{vocab - 1})")
    keep = fit_prompt(T, config.n_positions, max_new_tokens=opts.max_new_tokens, context_shift=opts.context_shift,
                      n_keep=opts.n_keep, truncate_prompt=opts.truncate_prompt)
    if keep < T:  # each row's last tokens: the columns cut from the left are padding first
        input_ids = input_ids[:, T - keep :]
        attention_mask = None if attention_mask is None else torch.as_tensor(attention_mask)[:, T - keep :]
        T = keep

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
    n = opts.num_return_sequences if opts.num_beams == 1 else 1  # beam search returns its n best instead
    if n > 1:
        input_ids = input_ids.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0) if attention_mask is not None else None
    return input_ids, attention_mask


def _loop(
    model: DecoderModel,
    prompt: torch.Tensor,
    mask: torch.Tensor | None,
    opts: GenerationOptions,
    generator: torch.Generator | None,
    tokenizer: TokenizerProtocol | None = None,
    *,
    with_logprobs: bool = False,
) -> Iterator[Step]:
    """The decode loop: one forward over the prompt, then one token per step into the session's state.

    Each step runs under its own ``inference_mode`` so that the caller's code
    between yields runs in the grad mode it chose.
    """
    if opts.max_new_tokens == 0:
        return  # nothing to generate, so no forward pass either
    B, T = prompt.shape
    config = model.config
    shifting = opts.context_shift and config.n_positions is not None
    # A CUDA graph is captured for the whole context, so that one graph serves every prompt length.
    # On the CPU a compiled step reads every slot of its cache at each step (GPT-2 124M at batch 8:
    # 600 MB over 1024 slots, more than its weights), so it gets what this call needs; a second
    # length makes dynamo compile one graph for all lengths.
    whole = (opts.compile and prompt.device.type != "cpu") or shifting
    length = config.n_positions if whole and config.n_positions is not None else T + opts.max_new_tokens

    # Made outside inference mode: a compiled step's state outlives this call's first graph.
    session = DecodeSession(model, B, length, compile=opts.compile)
    with torch.inference_mode():
        rules = TokenRules(opts, config, prompt, mask, generator=generator, tokenizer=tokenizer)
        if shifting:
            window = _Window(session, prompt, mask, config.n_positions, opts.n_keep)
            logits = window.start()  # (B, vocab)
            prompt_lp = None
        else:
            logits = session.feed(prompt, input_mask=mask, last_only=not opts.prompt_logprobs)  # (B, T or 1, vocab)
            prompt_lp = prompt_logprobs(logits, prompt, mask).values if opts.prompt_logprobs else None
            logits = logits[:, -1]  # (B, vocab)
    first = True
    while True:
        with torch.inference_mode():
            out = rules.step(logits, logprobs=with_logprobs)
            if first:
                out.prompt_logprobs, first = prompt_lp, False
            done = rules.done
        yield out  # before the next forward, so a stream shows each token as soon as it is chosen
        if done:
            return
        with torch.inference_mode():
            logits = window.feed(out.tokens) if shifting else session.feed(out.tokens[:, None])[:, -1]


class _Window:
    """Each row's window of tokens in the session, shifted when it fills the context (see ``context.py``)."""

    def __init__(self, session: DecodeSession, prompt: torch.Tensor, mask: torch.Tensor | None, context: int,
                 n_keep: int) -> None:
        self.session, self.context, self.n_keep = session, context, n_keep
        rows = prompt.tolist() if mask is None else [[t for t, m in zip(r, k, strict=True) if m]
                                                     for r, k in zip(prompt.tolist(), mask.tolist(), strict=True)]
        self.windows: list[list[int]] = rows

    def start(self) -> torch.Tensor:
        """Prefill every row's prompt, without padding (rows then shift on their own); the last logits ``(B, V)``."""
        B = len(self.windows)
        if len({len(w) for w in self.windows}) == 1 and len(self.windows[0]) < self.context:
            device = self.session.state.device
            return self.session.feed(torch.tensor(self.windows, device=device))[:, -1]
        return torch.cat([self._refill(r, self.windows[r]) for r in range(B)])

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token to each row; rows it would fill shift and run their kept window again."""
        chosen = tokens.tolist()
        full = [r for r, w in enumerate(self.windows) if len(w) + 1 == self.context]
        going = [r for r in range(len(chosen)) if r not in full]
        logits: list[torch.Tensor | None] = [None] * len(chosen)
        if going:
            rows = None if not full else going
            out = self.session.feed(tokens[going][:, None] if full else tokens[:, None], rows=rows)[:, -1]
            for j, r in enumerate(going):
                self.windows[r].append(chosen[r])
                logits[r] = out[j : j + 1]
        for r in full:
            logits[r] = self._refill(r, [*self.windows[r], chosen[r]])
        return torch.cat(logits)  # type: ignore[arg-type]

    def _refill(self, row: int, window: list[int]) -> torch.Tensor:
        """Run ``window`` (shifted first if it fills the context) into an emptied ``row``; its last logits."""
        if len(window) >= self.context:
            window = shifted(window, self.context, self.n_keep)
        self.windows[row] = window
        self.session.reset([row])
        ids = torch.tensor([window], device=self.session.state.device)
        return self.session.feed(ids, rows=[row])[:, -1]


def _score_prompt(model: DecoderModel, prompt: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Prompt log-probabilities by a forward pass of their own (when nothing is generated)."""
    with torch.inference_mode():
        logits = model.feed(prompt, model.new_state(*prompt.shape), input_mask=mask, last_only=False)
        return prompt_logprobs(logits, prompt, mask).values


def _scored_output(
    model: DecoderModel, sequences: torch.Tensor, T: int, mask: torch.Tensor | None, opts: GenerationOptions,
    reasons: list[str], scores: torch.Tensor | None,
) -> GenerateOutput:
    """``GenerateOutput`` for sequences made by beam search or speculative decoding: one scoring pass."""
    N, total = sequences.shape
    if mask is not None and mask.shape[0] != N:
        mask = mask.repeat_interleave(N // mask.shape[0], dim=0)
    full_mask = None if mask is None else torch.cat([mask, torch.ones(N, total - T, dtype=mask.dtype,
                                                                       device=mask.device)], dim=1)
    with torch.inference_mode():
        state = model.new_state(N, total)
        every = model.feed(sequences, state, input_mask=full_mask, last_only=False)  # (N, total, V)
        logp = every[:, T - 1 : -1].float().log_softmax(-1)  # (N, new, V)
        new = sequences[:, T:]
        logprobs = logp.gather(2, new[..., None])[..., 0]
        eos, _ = end_tokens(model.config, opts)
        if eos is not None:  # padding after a row's end token
            ended = new == eos
            logprobs = logprobs.masked_fill(ended.cumsum(1) - ended.long() > 0, 0.0)
        top = logp.topk(opts.top_logprobs, dim=-1) if opts.top_logprobs else None
        prompt_lp = prompt_logprobs(every[:, :T], sequences[:, :T], mask).values if opts.prompt_logprobs else None
    return GenerateOutput(
        sequences=sequences, logprobs=logprobs, finish_reason=reasons,
        top_logprobs=top.values if top is not None else None, top_ids=top.indices if top is not None else None,
        prompt_logprobs=prompt_lp, scores=scores,
    )
