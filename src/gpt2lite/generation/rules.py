"""The per-token rules of decoding, written once for every decode loop.

``generate`` (``loop.py``), beam search, speculative decoding and the server's
scheduler all go through a ``TokenRules`` for the rows they decode, so the same
options give the same behaviour everywhere. At each step it

1. adjusts the logits: penalties over each row's history and counts, bias, bans,
   ``min_new_tokens`` and the user's hooks (``processors.py``), then the mask of a
   structured-output constraint, one matcher per row (``constraints.py``);
2. chooses a token per row: the argmax, or a draw from the filtered distribution
   (``sampling.py``) with the rows' seeded ``torch.Generator``, after checking that
   the deciding logit is finite (``NonFiniteError``, the one error for this);
3. records it: a row that had finished gets the pad token, the history and counts
   grow, and a row finishes on the end token or at the end of a stop sequence (not
   before ``min_new_tokens``).

It also reports what the OpenAI API reports: the log-probability of each chosen
token and its ``top_logprobs`` alternatives, from the model's raw logits.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from gpt2lite.errors import NonFiniteError, OptionError
from gpt2lite.generation.constraints import RowConstraints
from gpt2lite.generation.options import GenerationOptions
from gpt2lite.generation.processors import LogitsProcessors
from gpt2lite.generation.sampling import choose_next
from gpt2lite.models.protocol import ModelConfig
from gpt2lite.tokenizers.bpe import Tokenizer
from gpt2lite.tokenizers.protocol import TokenizerProtocol

__all__ = [
    "PromptLogprobs",
    "Step",
    "TokenRules",
    "check_finite",
    "chosen_logprobs",
    "end_tokens",
    "prompt_logprobs",
    "step_rows",
]


@dataclass
class Step:
    """One step of every row: the tokens chosen and, when asked for, their log-probabilities."""

    tokens: torch.Tensor  # (B,)
    finished: torch.Tensor  # (B,) rows finished with this token or before
    logprobs: torch.Tensor | None = None  # (B,) log-softmax of the raw logits at the chosen tokens
    top_logprobs: torch.Tensor | None = None  # (B, k)
    top_ids: torch.Tensor | None = None  # (B, k)
    prompt_logprobs: torch.Tensor | None = None  # (B, T), on the first step only, when asked for


def end_tokens(config: ModelConfig, opts: GenerationOptions) -> tuple[int | None, int]:
    """The token that ends rows (None with ignore_eos), and the one that pads rows that ended."""
    end = opts.eos_token_id if opts.eos_token_id is not None else config.eos_token_id
    pad = next((t for t in (opts.pad_token_id, end) if t is not None), 0)
    return (None if opts.ignore_eos else end), pad


def check_finite(row_values: torch.Tensor, step: int) -> None:
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


def chosen_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-softmax of raw logits ``(B, V)`` at the chosen tokens ``(B,)``, and the ``k`` most likely (or None)."""
    logp = logits.float().log_softmax(dim=-1)
    chosen_lp = logp.gather(1, chosen[:, None])[:, 0]
    if k == 0:
        return chosen_lp, None, None
    top = logp.topk(k, dim=-1)
    return chosen_lp, top.values, top.indices


class PromptLogprobs(NamedTuple):
    """Each prompt token's log-probability, and the alternatives at its position (see ``prompt_logprobs``)."""

    values: torch.Tensor  # (B, T): NaN for each row's first token and for padding
    ranks: torch.Tensor  # (B, T): 1 for the most likely token; 0 where there is no value
    top_values: torch.Tensor | None  # (B, T, k), with k
    top_ids: torch.Tensor | None  # (B, T, k), with k


def prompt_logprobs(
    logits: torch.Tensor, prompt: torch.Tensor, mask: torch.Tensor | None = None, k: int = 0
) -> PromptLogprobs:
    """Each prompt token's log-probability from the prompt's logits ``(B, T, V)``, its rank, and the ``k`` best.

    The first token of a row has no context, nor has padding: both get NaN.
    Position ``t`` holds token ``t``'s value and the alternatives to it (from
    the distribution after tokens ``0..t-1``), so the values and the top ones
    come from the same numbers and compare exactly.
    """
    B, T = prompt.shape
    values = torch.full((B, T), float("nan"), device=prompt.device)
    ranks = torch.zeros((B, T), dtype=torch.long, device=prompt.device)
    top_values = top_ids = None
    if k:
        top_values = torch.full((B, T, k), float("nan"), device=prompt.device)
        top_ids = torch.zeros((B, T, k), dtype=torch.long, device=prompt.device)
    if T > 1:
        logp = logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V): the distribution of tokens 1..T-1
        chosen = logp.gather(2, prompt[:, 1:, None])  # (B, T-1, 1)
        values[:, 1:] = chosen[..., 0]
        ranks[:, 1:] = (logp > chosen).sum(-1) + 1
        if k:
            top = logp.topk(k, dim=-1)
            top_values[:, 1:], top_ids[:, 1:] = top.values, top.indices
    if mask is not None:
        none = mask == 0
        none[torch.arange(B), mask.argmax(dim=1)] = True  # each row's first real token
        values[none] = float("nan")
        ranks[none] = 0
    return PromptLogprobs(values, ranks, top_values, top_ids)


class TokenRules:
    """The per-step rules of ``B`` rows that share one ``GenerationOptions``: adjust, choose, record, stop.

    ``prompt`` ``(B, T)`` holds each row's prompt (left padding as given, marked 0
    in ``mask``). Rows usually advance together, one token per step; speculative
    decoding records a different number of tokens per row (``append(..., rows=)``).

    >>> from gpt2lite import GPT2Config
    >>> rules = TokenRules(GenerationOptions(temperature=0, max_new_tokens=2, eos_token_id=3),
    ...                    GPT2Config.from_preset("tiny"), torch.tensor([[5, 6]]))
    >>> rules.step(torch.tensor([[0.0, 1.0, 0.0, 9.0]])).tokens.tolist(), rules.done
    ([3], True)
    """

    def __init__(
        self,
        options: GenerationOptions,
        config: ModelConfig,
        prompt: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        tokenizer: TokenizerProtocol | None = None,
    ) -> None:
        """Prepare the rows' history, counts and generator (default: one seeded with ``options.seed``).

        ``tokenizer`` gives a structured-output constraint its vocabulary (default:
        the bundled GPT-2 one, for a model with GPT-2's vocabulary).
        """
        B, T = prompt.shape
        device = prompt.device
        self.options = options
        self.vocab_size = config.vocab_size
        self.eos, self.pad = end_tokens(config, options)
        self.stops = [torch.tensor(seq, device=device) for seq in options.stop]
        self.processors = LogitsProcessors(options, config.vocab_size, self.eos, device)
        if generator is None and options.seed is not None:
            generator = torch.Generator(device=device).manual_seed(options.seed)
        self.generator = generator
        self.prompt_length = T
        self.generated = [0] * B  # tokens recorded per row
        # Every token so far: the prompts (padding as given), then the new tokens.
        self.tokens = torch.empty(B, T + options.max_new_tokens, dtype=torch.long, device=device)
        self.tokens[:, :T] = prompt
        # The repetition penalty skips padding: it sees the row's last prompt token there instead.
        self.penalty_tokens = None
        if options.repetition_penalty != 1.0:
            self.penalty_tokens = self.tokens.clone()
            if mask is not None:
                self.penalty_tokens[:, :T] = torch.where(mask.bool(), prompt, prompt[:, -1:])
        self.counts = torch.zeros(B, config.vocab_size, device=device) if self.processors.needs_counts else None
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.constraints = None
        if options.constraint is not None:
            self.constraints = RowConstraints(options, _constraint_tokenizer(tokenizer, config, options),
                                              self.eos if self.eos is not None else self.pad, B)

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return self.tokens.shape[0]

    @property
    def done(self) -> bool:
        """Whether every row has finished or reached ``max_new_tokens``."""
        return min(self.generated) >= self.options.max_new_tokens or bool(self.finished.all())

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """The processors (penalties, bias, bans, ``min_new_tokens``, hooks) applied to logits ``(B, V)``.

        The rows must be at the same length (every path but speculative decoding,
        which refuses these options).
        """
        if self.processors.active:
            new = self.generated[0]
            cur = self.prompt_length + new
            history = self.penalty_tokens[:, :cur] if self.penalty_tokens is not None else None
            logits = self.processors(logits.float(), self.tokens[:, :cur], penalty_history=history,
                                     counts=self.counts, new_tokens=new)
        if self.constraints is not None:  # last: what the constraint forbids stays forbidden
            logits = self.constraints.mask(logits, self.finished)
        return logits

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row of adjusted logits ``(B, V)``: the argmax, or a seeded draw; ``(B,)``."""
        step = max(self.generated)
        if self.options.greedy:
            tokens = choose_next(logits, self.options)
            # argmax picks NaN and +inf, and a row of -inf gives -inf: the chosen logit tells.
            check_finite(logits.gather(1, tokens[:, None])[:, 0], step)
            return tokens
        logits = logits.contiguous()  # the batched LM head hands out a transposed view
        check_finite(logits.amax(dim=-1), step)  # before sampling, which would fail on NaN
        return choose_next(logits, self.options, generator=self.generator)

    def step(self, logits: torch.Tensor, *, logprobs: bool = False, chosen: torch.Tensor | None = None) -> Step:
        """Adjust, choose and record one token for every row from their raw logits ``(B, V)``.

        With ``logprobs`` the ``Step`` carries each token's log-probability under
        the raw logits (0 for rows that had finished) and the ``top_logprobs`` best.
        ``chosen`` passes tokens a batched argmax already took for rows of plain
        greedy decoding (see ``step_rows``); they are checked, not chosen again.
        """
        before = self.finished.clone() if logprobs else None
        if chosen is None:
            chosen = self.choose(self.adjust(logits))
        else:
            if not self.options.greedy or self.processors.active or self.constraints is not None:
                raise ValueError("only rows of plain greedy decoding take a token chosen for them")
            check_finite(logits.gather(1, chosen[:, None])[:, 0], max(self.generated))
        tokens = self.append(chosen)
        out = Step(tokens, self.finished.clone())
        if logprobs:
            lp, out.top_logprobs, out.top_ids = chosen_logprobs(logits, tokens, self.options.top_logprobs)
            out.logprobs = lp.masked_fill(before, 0.0)  # padding after a row's end
        return out

    def append(self, tokens: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Record one token for each of ``rows`` (default: all); return them, with pad for rows that had finished.

        A row finishes when its token is the end token or completes a stop
        sequence, once it has ``min_new_tokens`` tokens.
        """
        device = self.tokens.device
        if rows is None:
            row_list: Sequence[int] = range(self.batch_size)
            index = torch.arange(self.batch_size, device=device)
            at: torch.Tensor | int = self.prompt_length + self.generated[0]
        else:
            row_list = list(rows)
            index = torch.tensor(row_list, dtype=torch.long, device=device)
            at = torch.tensor([self.prompt_length + self.generated[r] for r in row_list], device=device)
        if any(self.generated[r] >= self.options.max_new_tokens for r in row_list):
            raise ValueError("a row already holds max_new_tokens tokens")
        was_finished = self.finished[index]
        tokens = torch.where(was_finished, self.pad, tokens)
        self.tokens[index, at] = tokens
        if self.penalty_tokens is not None:
            self.penalty_tokens[index, at] = tokens
        if self.counts is not None:
            self.counts.index_put_((index, tokens), (~was_finished).float(), accumulate=True)
        for r in row_list:
            self.generated[r] += 1
        ends = self._ends(self.tokens[index], at, [self.generated[r] for r in row_list])
        self.finished[index] = was_finished | ends
        if self.constraints is not None:
            for r, token, finished in zip(row_list, tokens.tolist(), was_finished.tolist(), strict=True):
                if not finished:
                    self.constraints.consume(token, r)
        return tokens

    def ends(self, sequences: torch.Tensor, generated: int) -> torch.Tensor:
        """Whether each of ``sequences`` ``(N, L)``, holding ``generated`` new tokens, ends with its last token.

        Beam search asks this of its candidates before choosing among them.
        """
        return self._ends(sequences, sequences.shape[1] - 1, [generated])

    def reorder(self, index: torch.Tensor) -> None:
        """Make row ``i`` a copy of row ``index[i]`` (beam search); rows must be at the same length."""
        for name in ("tokens", "penalty_tokens", "counts", "finished"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[index])


    def _ends(self, tokens: torch.Tensor, at: torch.Tensor | int, generated: list[int]) -> torch.Tensor:
        """Rows of ``tokens`` ``(N, L)`` whose token at column ``at`` ends them (end token, stop sequence).

        ``at`` is one column for all rows or one per row; ``generated`` the rows'
        new-token counts (one shared count, or one per row).
        """
        device = tokens.device
        ended = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
        allowed = [g >= self.options.min_new_tokens for g in generated]
        if not any(allowed):
            return ended  # before min_new_tokens, neither the end token nor a stop sequence ends a row
        uniform = isinstance(at, int)
        last = tokens[:, at] if uniform else tokens.gather(1, at[:, None])[:, 0]
        if self.eos is not None:
            ended |= last == self.eos
        for seq in self.stops:
            n = seq.numel()
            if uniform:
                if generated[0] >= n:
                    ended |= (tokens[:, at + 1 - n : at + 1] == seq).all(dim=1)
            else:  # each row at its own column
                columns = (at[:, None] + 1 - n + torch.arange(n, device=device)).clamp(min=0)  # (N, n)
                long_enough = torch.tensor([g >= n for g in generated], device=device)
                ended |= long_enough & (tokens.gather(1, columns) == seq).all(dim=1)
        if not all(allowed):
            ended &= torch.tensor(allowed, device=device)
        return ended


@functools.cache
def _gpt2_tokenizer() -> Tokenizer:
    """The bundled GPT-2 tokenizer, made once: a constraint's vocabulary is built once per tokenizer."""
    return Tokenizer.gpt2()


def _constraint_tokenizer(tokenizer: TokenizerProtocol | None, config: ModelConfig,
                          options: GenerationOptions) -> TokenizerProtocol:
    """The vocabulary a constraint is compiled against: the one given, else GPT-2's for a GPT-2-sized model."""
    if tokenizer is not None:
        return tokenizer
    if 50257 <= config.vocab_size < 50257 + 128:  # GPT-2's, or padded to a multiple of 64
        return _gpt2_tokenizer()
    name = options.constraint or "json_schema"
    raise OptionError(name, f"{name} needs the model's tokenizer to know each token's text: pass tokenizer=")


def step_rows(rules: Sequence[TokenRules], logits: torch.Tensor) -> list[Step | Exception]:
    """One step of rows that each follow their own rules (the server's batch): a ``Step`` or the error, per row.

    ``logits`` ``(n, V)`` holds row ``i``'s raw logits at ``i``; each ``rules[i]``
    has one row. Rows of plain greedy decoding share one argmax; a row whose
    choice fails (non-finite logits, a hook that raises) fails alone.
    """
    out: list[Step | Exception] = []
    plain = [i for i, r in enumerate(rules)
             if r.options.greedy and not r.processors.active and r.constraints is None]
    argmax = dict(zip(plain, logits[plain].argmax(-1)[:, None], strict=True)) if len(plain) > 1 else {}
    for i, r in enumerate(rules):
        try:
            out.append(r.step(logits[i : i + 1], logprobs=True, chosen=argmax.get(i)))
        except Exception as exc:  # one bad row fails alone
            out.append(exc)
    return out
