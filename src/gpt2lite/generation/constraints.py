"""Structured output: the tokens a row may choose next under a JSON schema, a regex, a choice or a grammar.

llguidance (``pip install "gpt2lite[structured]"``) compiles the constraint of
``GenerationOptions`` (``json_schema``, ``regex``, ``choice``, ``grammar``) into a
matcher over the tokenizer's vocabulary, one per row. ``TokenRules`` asks each
row's matcher for the mask of allowed tokens before it chooses, and feeds it the
token chosen, so every decode loop (``generate``, streaming, the text API, the
server's scheduler, a context shift) is constrained the same way. The end token
is allowed only where the constraint is complete: an unfinished object ends at
``max_new_tokens`` with ``finish_reason`` ``"length"``.
"""

from __future__ import annotations

import json
import weakref
from typing import Any

import torch

from gpt2lite.errors import OptionError
from gpt2lite.generation.options import GenerationOptions
from gpt2lite.tokenizers.protocol import TokenizerProtocol

__all__ = ["RowConstraints", "constraint_grammar"]

_MISSING = "structured output needs llguidance: pip install 'gpt2lite[structured]'"


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.torch
    except ImportError:
        raise ImportError(_MISSING) from None
    return llguidance


def constraint_grammar(options: GenerationOptions) -> tuple[str, str] | None:
    """(option name, llguidance grammar) of the options' constraint, or None without one."""
    name = options.constraint
    if name is None:
        return None
    value = getattr(options, name)
    llg = _llguidance()
    try:
        if name == "json_schema":
            schema = json.loads(value)
            if isinstance(schema, dict) and "x-guidance" not in schema:
                # Compact JSON unless the schema says otherwise: a small model given free whitespace
                # can spend its tokens on newlines.
                schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
            return name, llg.grammar_from("json_schema", json.dumps(schema))
        if name == "choice":
            return name, llg.grammar_from("choice", json.dumps(list(value)))
        if name == "regex":
            return name, llg.grammar_from("regex", value)
        return name, llg.grammar_from("grammar", value)  # Lark or GBNF, told apart by llguidance
    except ValueError as exc:
        raise OptionError(name, f"{name} cannot be compiled: {exc}") from None


# One llguidance vocabulary per tokenizer and end token: building one takes about 0.1 s.
_VOCABULARIES: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()


def _vocabulary(tokenizer: TokenizerProtocol, eos: int) -> Any:
    """llguidance's view of ``tokenizer``: each id's bytes, and ``eos`` as the token that ends a constraint.

    It has the tokenizer's size: the rows a model's vocabulary is padded with are never allowed.
    """
    cached = _VOCABULARIES.setdefault(tokenizer, {})
    if eos not in cached:
        llg = _llguidance()
        cached[eos] = llg.LLTokenizer(llg.TokenizerWrapper(_Wrapped(tokenizer, eos)), eos_token=eos)
    return cached[eos]


class _Wrapped:
    """A tokenizer in the shape llguidance's ``TokenizerWrapper`` reads: ``tokens`` as bytes, ``__call__`` encodes."""

    def __init__(self, tokenizer: TokenizerProtocol, eos: int) -> None:
        self.eos_token_id, self.bos_token_id = eos, None
        self.tokens = [tokenizer.decode_token_bytes(i) for i in range(tokenizer.n_vocab)]
        self.special_token_ids = sorted(set(getattr(tokenizer, "special_tokens", {}).values()) | {eos})
        # Weakly: the cache of vocabularies is keyed by the tokenizer, and must not keep it alive.
        self._tokenizer = weakref.ref(tokenizer)

    def __call__(self, text: str | bytes) -> list[int]:
        tokenizer = self._tokenizer()
        if tokenizer is None:
            raise RuntimeError("the tokenizer of this constraint is gone")
        return tokenizer.encode(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text)


class RowConstraints:
    """One matcher per row under the same constraint: the mask of what each may choose, and what it chose.

    Raises ``OptionError`` naming the option when the constraint does not compile.
    """

    def __init__(self, options: GenerationOptions, tokenizer: TokenizerProtocol, eos: int, rows: int) -> None:
        """Compile the options' constraint once and start ``rows`` matchers on it."""
        found = constraint_grammar(options)
        if found is None:
            raise ValueError("the options carry no structured-output constraint")
        self.name, grammar = found
        llg = _llguidance()
        self._torch = llg.torch
        self.vocabulary = _vocabulary(tokenizer, eos)
        error = llg.LLMatcher.validate_grammar(grammar, self.vocabulary)
        if error:
            raise OptionError(self.name, f"{self.name} cannot be used: {error}")
        self.matchers = [llg.LLMatcher(self.vocabulary, grammar, log_level=0) for _ in range(rows)]
        self._bitmask = self._torch.allocate_token_bitmask(rows, self.vocabulary.vocab_size)

    @classmethod
    def check(cls, options: GenerationOptions, tokenizer: TokenizerProtocol, eos: int) -> None:
        """Compile the options' constraint, if any, to refuse one that cannot be used before anything runs."""
        if options.constraint is not None:
            cls(options, tokenizer, eos, rows=0)

    def mask(self, logits: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        """``logits`` ``(B, V)`` with every token a row's matcher forbids at -inf (rows that ``finished`` as they are).

        A row left with no token at all (the constraint and a ban, ``bad_words``
        or a ``logit_bias`` of -100, exclude each other) is an ``OptionError``.
        """
        n, vocab = logits.shape
        words = self.vocabulary.vocab_size
        for row in range(n):
            if not bool(finished[row]):
                self._torch.fill_next_token_bitmask(self.matchers[row], self._bitmask, row)
        allowed = torch.zeros(n, vocab, dtype=torch.bool)
        allowed[:, :words] = _unpack(self._bitmask[:n], words)
        allowed[finished.cpu()] = True  # their tokens are the pad token whatever is chosen
        allowed = allowed.to(logits.device)
        masked = logits.float().masked_fill(~allowed, float("-inf"))
        # (A NaN counts as a token here: check_finite names a broken model apart.)
        dead = ~(allowed & (logits != float("-inf"))).any(dim=-1) & ~finished
        if bool(dead.any()):
            raise OptionError(self.name, f"{self.name} leaves no token that the other options allow (bad_words, a "
                                         "logit_bias of -100 or stop_token_ids exclude what it needs next)")
        return masked

    def consume(self, token: int, row: int) -> None:
        """Advance ``row``'s matcher by the token it chose (one the mask allowed)."""
        matcher = self.matchers[row]
        if not matcher.consume_token(token):
            raise RuntimeError(f"the {self.name} constraint refused token {token} it had allowed: "
                               f"{matcher.get_error()}")


def _unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """llguidance's bitmask ``(n, ceil(V / 32))`` int32, one bit per token, as booleans ``(n, V)``."""
    bits = torch.arange(32, dtype=torch.int32)
    return ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, :vocab]
