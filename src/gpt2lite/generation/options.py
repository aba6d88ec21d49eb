"""The options of every decoding entry point, declared once: ``GenerationOptions``.

``generate``, ``iter_tokens``, ``TextGenerator`` and the CLI all take these; the
CLI builds its flags from the fields (names, types and help below), so a new
option appears everywhere by being added here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from gpt2lite.errors import OptionError

__all__ = ["CONSTRAINTS", "GREEDY_BELOW", "MAX_TOP_LOGPROBS", "GenerationKwargs", "GenerationOptions",
           "LogitsProcessor"]

MAX_TOP_LOGPROBS = 20  # as the OpenAI API allows

# A user hook: (token ids so far (B, T), logits (B, vocab)) -> new logits (B, vocab).
LogitsProcessor = Callable[[Any, Any], Any]

# Temperatures below float32's smallest normal number cannot scale float32 logits (1/T
# overflows), and sampling at them is greedy to within rounding: they decode greedily.
GREEDY_BELOW = 2.0**-126  # torch.finfo(torch.float32).tiny, without importing torch for the CLI's start-up


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class GenerationOptions:
    """How to decode: length, sampling, stopping. Every value is checked when the object is built.

    >>> GenerationOptions(temperature=0, max_new_tokens=5).greedy
    True
    >>> GenerationOptions(top_p=1.5)
    Traceback (most recent call last):
    ...
    gpt2lite.errors.OptionError: top_p must be in (0, 1] (1 disables it), got 1.5
    """

    max_new_tokens: int = _option(64, "tokens to generate at most")
    min_new_tokens: int = _option(0, "the end token and stop sequences cannot end a row before this many tokens")
    temperature: float = _option(1.0, "softmax temperature; 0 is greedy")
    top_k: int = _option(0, "sample only among the k most likely tokens; 0 disables it")
    top_p: float = _option(1.0, "nucleus sampling: the smallest set of tokens holding this mass; 1 disables it")
    min_p: float = _option(0.0, "drop tokens less likely than min_p times the most likely one; 0 disables it")
    typical_p: float = _option(1.0, "locally typical sampling: the tokens nearest the entropy holding this mass; 1 "
                                    "disables it")
    epsilon_cutoff: float = _option(0.0, "drop tokens less likely than this (epsilon sampling); 0 disables it")
    eta_cutoff: float = _option(0.0, "eta sampling: drop tokens less likely than min(eta, sqrt(eta) * exp(-entropy)); "
                                     "0 disables it")
    repetition_penalty: float = _option(1.0, "divide the positive logits of tokens seen so far by this, multiply the "
                                             "negative ones (CTRL; 0.001..1000); 1 disables it")
    presence_penalty: float = _option(0.0, "subtract this from the logit of every token generated so far (OpenAI)")
    frequency_penalty: float = _option(0.0, "subtract this times its count from each generated token's logit (OpenAI)")
    no_repeat_ngram_size: int = _option(0, "never repeat an n-gram of this size; 0 disables it")
    logit_bias: tuple[tuple[int, float], ...] = _option(
        (), "{token id: bias} added to the logits; -100 bans a token, +100 forces it (OpenAI)"
    )
    bad_words_ids: tuple[tuple[int, ...], ...] = _option((), "token sequences that are never produced")
    logits_processor: tuple[LogitsProcessor, ...] = _option(
        (), "hooks (tokens (B, T), logits (B, V)) -> logits, run after the built-in penalties, before temperature"
    )
    num_beams: int = _option(1, "beam search with this many beams (greedy, temperature 0); 1 disables it")
    length_penalty: float = _option(1.0, "beam search: a finished beam scores sum(logprobs) / length ** this")
    early_stopping: bool | Literal["never"] = _option(
        False, "beam search: stop when num_beams beams finished (True), heuristically (False), or never"
    )
    top_logprobs: int = _option(0, f"also report the k most likely tokens at each step (k <= {MAX_TOP_LOGPROBS})")
    prompt_logprobs: bool = _option(False, "also report the log-probability of each prompt token (OpenAI's echo)")
    truncate_prompt: Literal["error", "left"] = _option(
        "error", "a prompt too long for the context: an error, or keep its last tokens ('left')"
    )
    num_draft_tokens: int = _option(4, "speculative decoding: tokens the draft model proposes per step")
    prompt_lookup_num_tokens: int = _option(
        0, "prompt-lookup decoding: propose up to this many tokens that followed the last 2 tokens earlier in the "
           "text, verified like a draft model's; 0 disables it")
    context_shift: bool = _option(
        False, "go on past the context: when it is full, keep n_keep tokens and the later half of the rest")
    n_keep: int = _option(0, "context shift: the first tokens of the prompt that always stay")
    eos_token_id: int | None = _option(None, "the end token; default: the model's (the tokenizer's in the text API)")
    ignore_eos: bool = _option(False, "never stop at the end token")
    pad_token_id: int | None = _option(None, "fills rows that finished early; default: the end token")
    stop: tuple[tuple[int, ...], ...] = _option((), "token sequences that end a row (kept in the output)")
    seed: int | None = _option(None, "seed for reproducible sampling")
    num_return_sequences: int = _option(1, "sequences to generate per prompt")
    compile: bool = _option(False, "decode with a torch.compile'd fixed-shape step (CUDA graphs on a GPU)")
    json_schema: str | None = _option(
        None, "structured output: text valid under this JSON schema (a dict, JSON text or a pydantic model class)")
    regex: str | None = _option(None, "structured output: text that matches this regular expression, whole")
    choice: tuple[str, ...] = _option((), "structured output: one of these strings")
    grammar: str | None = _option(None, "structured output: text of this grammar (llguidance's Lark, or GBNF)")

    def __post_init__(self) -> None:
        _check_int(self, "max_new_tokens", 0)
        _check_int(self, "num_return_sequences", 1)
        _check_int(self, "top_k", 0, note=" (0 disables it)")
        _check_int(self, "min_new_tokens", 0)
        _check_int(self, "no_repeat_ngram_size", 0, note=" (0 disables it)")
        _check_int(self, "num_beams", 1)
        _check_int(self, "num_draft_tokens", 1)
        _check_int(self, "prompt_lookup_num_tokens", 0, note=" (0 disables it)")
        _check_int(self, "n_keep", 0)
        _check_int(self, "top_logprobs", 0)
        if self.top_logprobs > MAX_TOP_LOGPROBS:
            raise OptionError("top_logprobs",
                              f"top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        for name in ("eos_token_id", "pad_token_id", "seed"):
            if getattr(self, name) is not None:
                _check_int(self, name, 0, none_ok=True)
        if self.seed is not None and self.seed >= 2**64:
            raise OptionError("seed", f"seed must be below 2**64, got {self.seed}")
        for name in ("ignore_eos", "compile", "prompt_logprobs", "context_shift"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(name, f"{name} must be True or False, got {getattr(self, name)!r}")
        t, p, m, r = self.temperature, self.top_p, self.min_p, self.repetition_penalty
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            raise OptionError("temperature", f"temperature must be a finite number >= 0 (0 means greedy), got {t!r}")
        if not _is_number(p) or not 0 < p <= 1:
            raise OptionError("top_p", f"top_p must be in (0, 1] (1 disables it), got {p!r}")
        if not _is_number(m) or not 0 <= m <= 1:
            raise OptionError("min_p", f"min_p must be in [0, 1] (0 disables it), got {m!r}")
        if not _is_number(self.typical_p) or not 0 < self.typical_p <= 1:
            raise OptionError("typical_p", f"typical_p must be in (0, 1] (1 disables it), got {self.typical_p!r}")
        for name in ("epsilon_cutoff", "eta_cutoff"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value < 1:
                raise OptionError(name, f"{name} must be in [0, 1) (0 disables it), got {value!r}")
        if not _is_number(r) or not 1e-3 <= r <= 1e3:
            # Outside this range dividing logits by it overflows float32, or the penalty only saturates.
            raise OptionError("repetition_penalty",
                              f"repetition_penalty must be a number in [0.001, 1000] (1 disables it), got {r!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise OptionError(name, f"{name} must be a number in [-2, 2] (0 disables it), got {value!r}")
        if not _is_number(self.length_penalty) or not math.isfinite(self.length_penalty):
            raise OptionError("length_penalty", f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never"):
            raise OptionError("early_stopping",
                              f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.truncate_prompt not in ("error", "left"):
            raise OptionError("truncate_prompt",
                              f"truncate_prompt must be 'error' or 'left', got {self.truncate_prompt!r}")
        if self.num_beams > 1:
            if not self.greedy:
                raise OptionError("temperature", "beam search (num_beams > 1) is deterministic: use temperature=0")
            if self.num_return_sequences > self.num_beams:
                raise OptionError("num_return_sequences",
                                  f"num_return_sequences ({self.num_return_sequences}) must be at most num_beams "
                                  f"({self.num_beams})")
            unsupported = [name for name in ("top_logprobs", "compile") if getattr(self, name)]
            if unsupported:
                raise OptionError(unsupported[0], f"beam search does not support {' or '.join(unsupported)}")
        if self.context_shift and (self.num_beams > 1 or self.prompt_lookup_num_tokens):
            raise OptionError("context_shift",
                              "context_shift works with sampling and greedy decoding, not with beam search or "
                              "prompt lookup")
        object.__setattr__(self, "stop", _stop_sequences(self.stop, "stop"))
        object.__setattr__(self, "bad_words_ids", _stop_sequences(self.bad_words_ids, "bad_words_ids"))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        _check_constraint(self)
        processors = self.logits_processor
        if callable(processors):
            processors = (processors,)
        if not isinstance(processors, Sequence) or not all(callable(f) for f in processors):
            raise OptionError("logits_processor",
                              f"logits_processor must be a callable or a list of callables, got {processors!r}")
        object.__setattr__(self, "logits_processor", tuple(processors))

    @property
    def constraint(self) -> str | None:
        """The structured-output option that is set (``json_schema``, ``regex``, ``choice``, ``grammar``), or None."""
        return next((name for name in CONSTRAINTS if getattr(self, name)), None)

    @property
    def greedy(self) -> bool:
        """Whether the most likely token is always taken (temperature 0, or too small to scale by)."""
        return self.temperature < GREEDY_BELOW

    def replace(self, **changes: Any) -> GenerationOptions:
        """A copy with some fields changed (and checked)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def build(cls, options: GenerationOptions | None, overrides: Mapping[str, Any], where: str) -> GenerationOptions:
        """``options`` (default: all defaults) with keyword ``overrides`` applied; unknown names are a TypeError."""
        if options is not None and not isinstance(options, GenerationOptions):
            raise TypeError(f"{where}() takes a GenerationOptions as options, got {type(options).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"{where}() got unknown option(s) {unknown}; known options: {sorted(known)}")
        base = options or cls()
        return base.replace(**overrides) if overrides else base


class GenerationKwargs(TypedDict, total=False):
    """``GenerationOptions``' fields as keyword arguments, so that an IDE completes and checks them."""

    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    typical_p: float
    epsilon_cutoff: float
    eta_cutoff: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    no_repeat_ngram_size: int
    logit_bias: Mapping[int, float]
    bad_words_ids: Sequence[Sequence[int]]
    logits_processor: LogitsProcessor | Sequence[LogitsProcessor]
    num_beams: int
    length_penalty: float
    early_stopping: bool | Literal["never"]
    top_logprobs: int
    prompt_logprobs: bool
    truncate_prompt: Literal["error", "left"]
    num_draft_tokens: int
    prompt_lookup_num_tokens: int
    context_shift: bool
    n_keep: int
    eos_token_id: int | None
    ignore_eos: bool
    pad_token_id: int | None
    stop: Sequence[Sequence[int]]
    seed: int | None
    num_return_sequences: int
    compile: bool
    json_schema: str | Mapping[str, Any] | type | None
    regex: str | None
    choice: Sequence[str]
    grammar: str | None


CONSTRAINTS = ("json_schema", "regex", "choice", "grammar")  # structured output: at most one per call


def _check_constraint(options: GenerationOptions) -> None:
    """Normalise the structured-output fields (a schema to JSON text, choices to a tuple) and refuse conflicts."""
    schema = options.json_schema
    if schema is not None:
        if isinstance(schema, type) and hasattr(schema, "model_json_schema"):  # a pydantic model class
            schema = schema.model_json_schema()
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise OptionError("json_schema", f"json_schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (Mapping, bool)):
            raise OptionError("json_schema", "json_schema must be a JSON schema: a dict, its JSON text, or a pydantic "
                                             f"model class; got {type(schema).__name__}")
        object.__setattr__(options, "json_schema", json.dumps(schema, sort_keys=True))
    choice = options.choice
    if isinstance(choice, str) or not isinstance(choice, Sequence) or not all(isinstance(c, str) for c in choice):
        raise OptionError("choice", f"choice must be a list of strings, got {choice!r:.100}")
    object.__setattr__(options, "choice", tuple(choice))
    for name in ("regex", "grammar"):
        value = getattr(options, name)
        if value is not None and (not isinstance(value, str) or not value):
            raise OptionError(name, f"{name} must be a non-empty string, got {value!r:.100}")
    given = [name for name in CONSTRAINTS if getattr(options, name)]
    if len(given) > 1:
        raise OptionError(given[1], f"give one structured-output constraint, not {' and '.join(given)}")
    others = [name for name, off in (("num_beams", 1), ("prompt_lookup_num_tokens", 0), ("ignore_eos", False),
                                     ("min_new_tokens", 0)) if getattr(options, name) != off]
    if given and others:  # named by the other option: the constraint is what the call is for
        raise OptionError(others[0], f"{given[0]} does not combine with {others[0]}: the constraint decides where the "
                                    "text ends (at the end token), and is checked one token at a time")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_int(options: GenerationOptions, name: str, low: int, *, none_ok: bool = False, note: str = "") -> None:
    value = getattr(options, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        prefix = "None or " if none_ok else ""
        raise OptionError(name, f"{name} must be {prefix}an int >= {low}{note}, got {value!r}")


def _logit_bias(bias: object) -> tuple[tuple[int, float], ...]:
    """Normalise ``{token id: bias}`` (or pairs) to sorted pairs; biases lie in [-100, 100], as in the OpenAI API."""
    items = bias.items() if isinstance(bias, Mapping) else bias
    if isinstance(items, (str, bytes)) or not isinstance(items, (Sequence, type({}.items()))):
        raise OptionError("logit_bias", f"logit_bias must map token ids to numbers, got {bias!r}")
    out = {}
    for item in items:
        try:
            token, value = item
            token = operator.index(int(token) if isinstance(token, str) and token.isdigit() else token)
        except (TypeError, ValueError):
            raise OptionError("logit_bias", f"logit_bias must map token ids to numbers, got {bias!r}") from None
        if token < 0 or not _is_number(value) or not -100 <= value <= 100:
            raise OptionError("logit_bias",
                              f"logit_bias maps token ids >= 0 to numbers in [-100, 100], got {token!r}: {value!r}")
        out[token] = float(value)
    return tuple(sorted(out.items()))


def _stop_sequences(stop: object, name: str) -> tuple[tuple[int, ...], ...]:
    """Normalise ``stop`` to a tuple of non-empty tuples of token ids >= 0 (a flat list is one sequence)."""
    if isinstance(stop, (str, bytes)) or not isinstance(stop, Sequence):
        raise OptionError(name, f"{name} must be a list of token-id sequences, got {stop!r}")
    if stop and all(isinstance(t, int) for t in stop):
        stop = (stop,)  # a single sequence given flat
    out = []
    for seq in stop:
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise OptionError(name, f"{name} must be a list of token-id sequences, got {stop!r}")
        if not seq:
            raise OptionError(name, f"{name}: sequences must not be empty")
        try:
            ids = tuple(operator.index(t) for t in seq)  # ints, numpy or torch integers; not floats
        except TypeError:
            ids = (-1,)
        if any(t < 0 for t in ids):
            raise OptionError(name, f"{name}: sequences hold token ids (ints >= 0), got {list(seq)!r}")
        out.append(ids)
    return tuple(out)
