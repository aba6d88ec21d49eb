"""What the library needs of a tokenizer, and the incremental decoder every tokenizer shares.

``TextGenerator``, training, the server and the CLI use a tokenizer only through
``TokenizerProtocol``, so GPT-2's byte-level BPE (``bpe.py``) and the character
vocabulary (``char.py``) serve them alike.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = ["StreamDecoder", "TokenizerProtocol"]


@runtime_checkable
class TokenizerProtocol(Protocol):
    """Text to token ids and back."""

    n_vocab: int  # ids are 0..n_vocab-1
    eot_token: int  # the end-of-text token that separates documents and ends generation
    special_tokens: dict[str, int]
    max_token_bytes: int  # the most bytes a token holds: n characters make at least n / max_token_bytes tokens

    def encode(self, text: str, *, allowed_special: object = ()) -> list[int]:
        """The token ids of ``text``."""
        ...

    def encode_stream(self, chunks: Iterable[str]) -> Iterator[list[int]]:
        """Encode text that arrives in pieces as ``encode("".join(chunks))`` would (training data)."""
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids (U+FFFD for bytes that are not UTF-8)."""
        ...

    def decode_token_bytes(self, token: int) -> bytes:
        """The UTF-8 bytes of one token (possibly part of a character); an unknown id is a ValueError."""
        ...

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh incremental decoder (``add(token) -> text``, ``flush() -> text``), maybe without special tokens."""
        ...

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the vocabulary's files into ``directory`` (those transformers reads, where it can)."""
        ...


class StreamDecoder:
    """Turns tokens, given one at a time, into text that never ends mid-character.

    A character split across tokens (emoji, CJK) is held back until complete;
    bytes that can never form valid UTF-8 come out as U+FFFD.
    """

    def __init__(self, tokenizer: TokenizerProtocol, *, skip_special_tokens: bool = False) -> None:
        """Start an empty stream for ``tokenizer``; ``skip_special_tokens`` leaves their text out."""
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._skip = frozenset(tokenizer.special_tokens.values()) if skip_special_tokens else frozenset()

    def add(self, token: int) -> str:
        """Take one token; return the text that is now complete (maybe empty)."""
        token = int(token)
        if token in self._skip:
            self._tokenizer.decode_token_bytes(token)  # an id outside the vocabulary is still an error
            return ""
        return self._utf8.decode(self._tokenizer.decode_token_bytes(token))

    def flush(self) -> str:
        """End the stream: return what is held back (U+FFFD for an unfinished character)."""
        return self._utf8.decode(b"", final=True)
