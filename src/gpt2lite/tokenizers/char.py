"""A character-level tokenizer: one id per character of the training text, plus ``<|endoftext|>``.

nanoGPT's ``shakespeare_char`` setting: the vocabulary is read off the data,
saved beside the model (``char_vocab.json``; earlier versions wrote their own
``tokenizer.json``, which is still read), and serves any architecture, GPT-2
included. It has the same interface as ``Tokenizer`` where the library uses one.
``save`` also writes the vocabulary as Hugging Face's ``tokenizer.json`` (a
``WordLevel`` model over single characters), which transformers' ``AutoTokenizer``
reads with the same ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from gpt2lite.io.files import atomic_write, read_json
from gpt2lite.tokenizers.files import write_tokenizer_config
from gpt2lite.tokenizers.protocol import StreamDecoder

__all__ = ["CHAR_TOKENIZER_FILE", "CharTokenizer"]

CHAR_TOKENIZER_FILE = "char_vocab.json"
_OLD_FILE = "tokenizer.json"  # the name earlier versions used, which Hugging Face's tokenizers also use
ENDOFTEXT = "<|endoftext|>"


class CharTokenizer:
    """Characters to ids and back; ``<|endoftext|>`` is the last id.

    >>> tok = CharTokenizer.from_texts(["hello", "world"])
    >>> tok.encode("hold")
    [2, 4, 3, 0]
    >>> tok.decode(tok.encode("hold"))
    'hold'
    """

    max_token_bytes = 1  # one character per token: a text of n characters is n tokens

    def __init__(self, chars: Iterable[str]) -> None:
        """Build from the characters of the vocabulary, in id order."""
        self.chars = list(chars)
        if not self.chars or any(len(c) != 1 for c in self.chars) or len(set(self.chars)) != len(self.chars):
            raise ValueError("a character vocabulary is a non-empty list of distinct single characters")
        self._ids = {c: i for i, c in enumerate(self.chars)}
        self.eot_token = len(self.chars)
        self.n_vocab = len(self.chars) + 1
        self.special_tokens = {ENDOFTEXT: self.eot_token}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        """The sorted characters that occur in ``texts``."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen))

    @property
    def fingerprint(self) -> str:
        """A digest of the vocabulary (data made with another one is not reused)."""
        return hashlib.sha256("".join(self.chars).encode("utf-8", "surrogatepass")).hexdigest()[:16]

    def encode(self, text: str, *, allowed_special: object = ()) -> list[int]:
        """The id of each character; a character outside the vocabulary is an error naming it.

        ``<|endoftext|>`` in ``text`` is its characters unless ``allowed_special``
        (``"all"``, or a collection of special-token strings) allows it, as for GPT-2's tokenizer.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        if isinstance(allowed_special, str) and allowed_special != "all":
            raise ValueError(f"allowed_special is 'all' or a collection of special tokens, got {allowed_special!r}")
        if allowed_special == "all" or ENDOFTEXT in allowed_special:  # type: ignore[operator]
            ids: list[int] = []
            for i, part in enumerate(text.split(ENDOFTEXT)):
                ids += [self.eot_token] * (i > 0) + self._encode_chars(part)
            return ids
        return self._encode_chars(text)

    def _encode_chars(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in this character vocabulary "
                             f"({len(self.chars)} characters, those of the training text)") from None

    def encode_stream(self, chunks: Iterable[str]) -> Iterator[list[int]]:
        """Encode text that arrives in pieces (characters never span pieces)."""
        for chunk in chunks:
            yield self.encode(chunk)

    def split_stream(self, chunks: Iterable[str]) -> Iterator[str]:
        """The pieces as they are: any cut between characters is a cut between tokens."""
        yield from chunks

    def decode_token_bytes(self, token: int) -> bytes:
        """The UTF-8 bytes of one token."""
        if not 0 <= token < self.n_vocab:
            raise ValueError(f"token id {token} is outside the vocabulary (0..{self.n_vocab - 1})")
        return (ENDOFTEXT if token == self.eot_token else self.chars[token]).encode("utf-8")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The UTF-8 bytes of the tokens."""
        return b"".join(self.decode_token_bytes(int(i)) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of the tokens."""
        return self.decode_bytes(ids).decode("utf-8")

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        """An incremental decoder (see ``StreamDecoder``)."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``char_vocab.json``, and ``tokenizer.json`` + ``tokenizer_config.json`` for transformers; return
        the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_write(directory / CHAR_TOKENIZER_FILE) as tmp:
            tmp.write_text(json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False), encoding="utf-8")
        with atomic_write(directory / _OLD_FILE) as tmp:
            tmp.write_text(json.dumps(self._hugging_face(), ensure_ascii=False), encoding="utf-8")
        write_tokenizer_config(directory, {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": ENDOFTEXT,
                                           "eos_token": ENDOFTEXT})
        return directory

    def _hugging_face(self) -> dict[str, object]:
        """The vocabulary in the format of Hugging Face's ``tokenizer.json``: each character a word of its own."""
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": self.eot_token, "content": ENDOFTEXT, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "normalizer": None,
            # Every character (newlines included) a piece of its own, kept.
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated",
                              "invert": False},
            "post_processor": None,
            "decoder": {"type": "Fuse"},  # the pieces joined as they are, no spaces between them
            # No unknown token: a character outside the vocabulary is an error there too, not a silent id.
            "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(self.chars)}, "unk_token": ""},
        }

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> CharTokenizer | None:
        """The character tokenizer saved in ``directory``, or None if there is none."""
        directory = Path(directory).expanduser()
        path = directory / CHAR_TOKENIZER_FILE
        if not path.is_file():
            path = directory / _OLD_FILE
        try:
            d = read_json(path)
        except (OSError, ValueError):
            return None
        if not isinstance(d, dict) or d.get("type") != "char":
            return None  # another tokenizer's file of the same name (Hugging Face's tokenizer.json)
        chars = d.get("chars")
        if not isinstance(chars, list) or not all(isinstance(c, str) for c in chars):
            raise ValueError(f"{str(path)!r}: chars must be a list of single characters (the vocabulary in id order)")
        try:
            return cls(chars)
        except ValueError as exc:
            raise ValueError(f"{str(path)!r}: chars: {exc}") from None
