"""The text of one generated row as its tokens arrive: decoded at character boundaries, cut at a stop string.

The text API (``generator.py``) and the server build their output with it, so a
stop string ends a completion the same way in both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gpt2lite.tokenizers.protocol import TokenizerProtocol

__all__ = ["Completion", "TextAssembler"]


@dataclass
class Completion:
    """One generated text with its tokens, their log-probabilities and why it ended (``TextGenerator.complete``)."""

    text: str
    token_ids: list[int]  # the tokens behind `text` (a stop string's tokens are dropped)
    tokens: list[str]  # each token's text (a piece of a character shows as U+FFFD)
    logprobs: list[float]  # log-probability of each token under the model (raw logits)
    top_logprobs: list[dict[str, float]]  # the top_logprobs most likely tokens at each step
    finish_reason: str  # "stop" (end token or stop string) or "length"
    prompt_logprobs: list[float | None] | None = None  # with prompt_logprobs=True; None for the first token

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


class TextAssembler:
    """The text of one row as tokens arrive; ``take()`` hands out the text that is final."""

    def __init__(self, tokenizer: TokenizerProtocol, stops: list[str], eos: int | None, *,
                 skip_special: bool = False) -> None:
        """Start an empty text; ``stops`` are stop strings, ``eos`` the token that ends the text (None: none).

        ``skip_special`` leaves special tokens' text out of ``text`` (their ids stay in ``ids``).
        """
        self.tokenizer = tokenizer
        # The keyword only when asked: a tokenizer of the caller's own may predate it.
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True) if skip_special \
            else tokenizer.stream_decoder()
        self.stops = stops
        self.hold = max(map(len, stops), default=1) - 1  # characters that could start a stop string
        self.eos = eos
        self.text = ""
        self.taken = 0  # text[:taken] was handed out by take()
        self.done = False
        self.reason = "length"
        self.cut = False  # a stop string cut the text
        self.stopped_by: str | None = None  # the stop string that cut it
        self.ids: list[int] = []
        self.starts: list[int] = []  # where each token's text begins in `text`
        self.logprobs: list[float] = []
        self.tops: list[dict[str, float]] = []

    def add(self, token: int, logprob: float | None = None, top: Any = None) -> None:
        """Take the next token (with its log-probability and alternatives, kept as given)."""
        if self.done:
            return
        if token == self.eos:
            self.reason = "stop"
            self.finish()
            return
        self.ids.append(token)
        self.starts.append(len(self.text))
        self.logprobs.append(logprob if logprob is not None else float("nan"))
        self.tops.append(top or {})
        self._append(self.decoder.add(token))

    def finish(self) -> None:
        """End the text: flush a held-back partial character."""
        if not self.done:
            self._append(self.decoder.flush())
            self.done = True

    def take(self) -> str:
        """The text that is now certain and not yet taken."""
        end = len(self.text) if self.done else max(self.taken, len(self.text) - self.hold)
        piece = self.text[self.taken : end]
        self.taken = end
        return piece

    def result(self) -> Completion:
        """The finished ``Completion``."""
        self.finish()
        # Tokens whose text starts past a stop string's cut are not part of the completion (a skipped
        # special token before the end token has no text, but is).
        n = sum(1 for s in self.starts if s < len(self.text)) if self.cut else len(self.ids)
        return Completion(
            text=self.text, token_ids=self.ids[:n], tokens=[self.tokenizer.decode([t]) for t in self.ids[:n]],
            logprobs=self.logprobs[:n], top_logprobs=self.tops[:n], finish_reason=self.reason,
        )

    def _append(self, piece: str) -> None:
        if not piece:
            return
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            cut, self.stopped_by = min(hits)
            self.text = self.text[:cut]
            self.taken = min(self.taken, len(self.text))
            self.reason = "stop"
            self.cut = self.done = True
