"""Any other vocabulary through Hugging Face's ``tokenizers``: a ``tokenizer.json``, or a BERT ``vocab.txt``.

The Chinese GPT-2s (uer/gpt2-chinese-*) use BERT's WordPiece vocabulary, and many
fine-tuned GPT-2s ship a ``tokenizer.json``; ``HFTokenizer`` wraps the library that
wrote them behind the same small protocol as GPT-2's BPE, so ``TextGenerator``,
training, the server and the command line use it alike. Special-token strings in
text are ordinary text unless allowed (``allowed_special``), as for GPT-2's BPE;
streaming decodes whole characters with the library's own ``DecodeStream``.

A WordPiece vocabulary splits Chinese text into characters, and its decoder (as
transformers' ``BertTokenizer.decode``) writes a space between every two of them:
``'我 们 好'``. Text from these vocabularies drops every space beside a CJK character
or CJK punctuation (Chinese writes none) and a leading ``##``; ``cjk_spaces=True``
keeps the library's spacing, as transformers gives it.

It needs the ``tokenizers`` extra: ``pip install "gpt2lite[tokenizers]"``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from gpt2lite.errors import CheckpointError
from gpt2lite.io.files import atomic_write, read_json
from gpt2lite.tokenizers.files import SPECIAL_KEYS, bytes_to_unicode, write_tokenizer_config

__all__ = ["HFTokenizer", "join_cjk"]

# The special tokens tokenizer_config.json may name, in the order an end-of-text token is looked for.
_END_TOKENS = ("eos_token", "sep_token", "pad_token")

# transformers' BertTokenizer defaults, which a vocab.txt without tokenizer_config.json gets.
_BERT_DEFAULTS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                  "mask_token": "[MASK]"}

# A space beside one of these is the WordPiece decoder's, not the writer's: the CJK ideographs BERT splits
# into single tokens, CJK punctuation (U+3000..U+303F) and full-width forms (U+FF00..U+FFEF).
_CJK = r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f\u3000-\u303f\uff00-\uffef]"
_CJK_SPACE = re.compile(rf"(?<={_CJK}) | (?={_CJK})")


def join_cjk(text: str) -> str:
    """``text`` without the spaces beside CJK characters (a WordPiece decoder's), other spaces kept.

    >>> join_cjk("今 天 天 气 很 好 ， hello world 。")
    '今天天气很好，hello world。'
    """
    return _CJK_SPACE.sub("", text)


def _library() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise ImportError("this model's vocabulary needs Hugging Face's tokenizers: "
                          "pip install 'gpt2lite[tokenizers]'") from None
    return tokenizers


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` with the special tokens its ``tokenizer_config.json`` names.

    >>> import tokenizers
    >>> from tokenizers.models import WordLevel
    >>> from tokenizers.pre_tokenizers import Whitespace
    >>> inner = tokenizers.Tokenizer(WordLevel({"[UNK]": 0, "[SEP]": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    >>> inner.pre_tokenizer = Whitespace()
    >>> tok = HFTokenizer(inner, {"sep_token": "[SEP]", "unk_token": "[UNK]"})
    >>> tok.encode("hello world"), tok.eot_token
    ([2, 3], 1)
    """

    def __init__(self, tokenizer: Any, special: Mapping[str, object] | None = None, *,
                 eos_token_id: int | None = None, cjk_spaces: bool = False) -> None:
        """Wrap a loaded ``tokenizers.Tokenizer``; ``special`` maps ``eos_token``, ``sep_token`` ... to their text.

        ``eos_token_id`` is the end token where ``special`` names none (None there
        too, or an id outside the vocabulary: ``eot_token`` is None). ``cjk_spaces``
        keeps the spaces a WordPiece decoder writes between CJK characters.
        """
        self._tok = tokenizer
        self.cjk_spaces = cjk_spaces
        self._wordpiece = type(tokenizer.decoder).__name__ == "WordPiece" if tokenizer.decoder else False
        self.special = {k: t for k in SPECIAL_KEYS if (t := _token_text((special or {}).get(k))) is not None}
        added = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        named = {t: tokenizer.token_to_id(t) for t in self.special.values()}
        self.special_tokens: dict[str, int] = {**added, **{t: i for t, i in named.items() if i is not None}}
        self.n_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        end = next((self.special[k] for k in _END_TOKENS if k in self.special), None)
        self.eot_token = self.special_tokens.get(end)  # type: ignore[arg-type]
        if self.eot_token is None and isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool) \
                and 0 <= eos_token_id < self.n_vocab and tokenizer.id_to_token(eos_token_id) is not None:
            # transformers' generate ends at the model's eos_token_id, whatever the tokenizer names.
            self.eot_token = eos_token_id
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.max_token_bytes = max((len(t.encode("utf-8")) for t in vocab), default=1)
        # A copy that matches special-token strings in text as tokens, for allowed_special.
        self._with_specials = type(tokenizer).from_str(tokenizer.to_str())
        self._tok.encode_special_tokens = True  # by default, "<|endoftext|>" or "[SEP]" in text is text
        self._with_specials.encode_special_tokens = False
        self._byte_level = "ByteLevel" in type(tokenizer.decoder).__name__ if tokenizer.decoder else False
        self._unbyte = {ch: b for b, ch in bytes_to_unicode().items()} if self._byte_level else None

    # construction from files -------------------------------------------------

    @classmethod
    def from_directory(cls, directory: str | os.PathLike[str], *, eos_token_id: int | None = None,
                       cjk_spaces: bool = False) -> HFTokenizer:
        """Read ``tokenizer.json``, else a BERT ``vocab.txt``, with ``tokenizer_config.json`` and
        ``special_tokens_map.json`` for the special tokens (and ``added_tokens.json``).

        ``eos_token_id`` (the model's, from its ``config.json``) is the end token where those files name none.
        A ``vocab.txt`` alone has BertTokenizer's special tokens: ``[SEP]`` ends a text.
        ``cjk_spaces``: see ``HFTokenizer``.
        """
        tokenizers = _library()
        directory = Path(directory)
        settings: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config's entries win
            path = directory / name
            if path.is_file():
                loaded = read_json(path)
                if not isinstance(loaded, dict):
                    raise ValueError(f"{str(path)!r} holds a JSON {type(loaded).__name__}, not an object of settings")
                settings.update(loaded)
        if (directory / "tokenizer.json").is_file():
            try:
                inner = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
            except Exception as exc:  # the library's own error type for a bad file
                raise CheckpointError(f"{str(directory / 'tokenizer.json')!r} is not a tokenizers file: {exc}") \
                    from None
        elif (directory / "vocab.txt").is_file():
            defaults = {k: t for k, t in _BERT_DEFAULTS.items() if k not in settings}
            inner = _wordpiece(directory / "vocab.txt", {**defaults, **settings})
            settings.update({k: t for k, t in defaults.items() if inner.token_to_id(t) is not None})
        else:
            raise FileNotFoundError(f"{str(directory)!r} holds no tokenizer.json or vocab.txt")
        added = directory / "added_tokens.json"
        if added.is_file():
            extra = read_json(added)
            if not isinstance(extra, dict) or not all(isinstance(v, int) for v in extra.values()):
                raise ValueError(f"{str(added)!r} must map token strings to ids")
            inner.add_special_tokens([t for t, _ in sorted(extra.items(), key=lambda kv: kv[1])])
        return cls(inner, settings, eos_token_id=eos_token_id, cjk_spaces=cjk_spaces)

    # the tokenizer protocol --------------------------------------------------

    def encode(self, text: str, *, allowed_special: Literal["all"] | Iterable[str] = ()) -> list[int]:
        """The ids of ``text``; special-token strings are ordinary text unless ``allowed_special`` allows them."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        tok = self._with_specials if allowed else self._tok
        ids = tok.encode(text, add_special_tokens=False).ids
        if allowed and allowed != set(self.special_tokens):  # only some allowed: the others back to text
            out: list[int] = []
            for i in ids:
                content = self._tok.id_to_token(i)
                out += self._tok.encode(content, add_special_tokens=False).ids \
                    if content in self.special_tokens and content not in allowed else [i]
            ids = out
        return ids

    def encode_stream(self, chunks: Iterable[str]) -> Iterator[list[int]]:
        """Encode text that arrives in pieces, cut where a line ends before a word (no token spans such a cut)."""
        for piece in self.split_stream(chunks):
            yield self.encode(piece)

    def split_stream(self, chunks: Iterable[str]) -> Iterator[str]:
        """The text of ``chunks`` again, cut only where a line ends before a word (the cuts ``encode_stream`` makes)."""
        carry = ""
        for chunk in chunks:
            text = carry + chunk
            # The last "\n" followed by a non-space, found by str.rfind from the end (not a Python loop over every
            # character). The held-over text has none inside it: only its last character may become one.
            start = max(0, len(carry) - 1)
            i = text.rfind("\n", start, len(text) - 1)
            while i >= 0 and text[i + 1].isspace():
                i = text.rfind("\n", start, i)
            cut = i + 1  # 0: no cut yet
            carry = text[cut:]
            if cut:
                yield text[:cut]
        if carry:
            yield carry

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``, as transformers' ``decode`` gives it (special tokens kept), CJK joined (see above)."""
        ids = [self._check_id(i) for i in ids]
        text = self._tok.decode(ids, skip_special_tokens=False)
        return join_cjk(text.removeprefix("##")) if self.joins_cjk else text

    @property
    def joins_cjk(self) -> bool:
        """Whether text drops the WordPiece decoder's spaces beside CJK characters (not ``cjk_spaces``)."""
        return self._wordpiece and not self.cjk_spaces

    def decode_token_bytes(self, token: int) -> bytes:
        """The bytes of one token's text (a byte-level piece of a character, or a word piece without ``##``)."""
        piece = self._tok.id_to_token(self._check_id(token))
        if piece in self.special_tokens or self._unbyte is None:
            return piece.removeprefix("##").encode("utf-8")
        try:
            return bytes(self._unbyte[ch] for ch in piece)
        except KeyError:  # an added token written as plain text
            return piece.encode("utf-8")

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> _HFStream:
        """An incremental decoder that yields text only at whole characters (special tokens left out)."""
        return _HFStream(self, skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (transformers' ``AutoTokenizer`` reads them)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_write(directory / "tokenizer.json") as tmp:
            self._with_specials.save(str(tmp))
        write_tokenizer_config(directory, {"tokenizer_class": "PreTrainedTokenizerFast", **self.special})
        return directory

    def _check_id(self, i: object) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_vocab \
                or self._tok.id_to_token(i) is None:
            raise ValueError(f"token id {i!r} is outside the vocabulary (0..{self.n_vocab - 1})")
        return i

    def __repr__(self) -> str:
        return f"HFTokenizer(n_vocab={self.n_vocab}, special={self.special})"


class _HFStream:
    """Tokens in, text out at whole characters, through ``tokenizers``' ``DecodeStream``."""

    def __init__(self, tokenizer: HFTokenizer, *, skip_special_tokens: bool = False) -> None:
        from tokenizers.decoders import DecodeStream

        self._owner = tokenizer
        self._stream = DecodeStream(skip_special_tokens=False)
        # Ours, not the library's flag: transformers also skips the tokens tokenizer_config.json names.
        self._skip = frozenset(tokenizer.special_tokens.values()) if skip_special_tokens else frozenset()
        self._join = tokenizer.joins_cjk
        self._before = ""  # the last character given out, when joining CJK: a space's left neighbour
        self._spaces = ""  # spaces held back until the character after them says whether they stay
        self._started = False

    def add(self, token: int) -> str:
        """Take one token; return the text that is now complete (maybe empty)."""
        token = self._owner._check_id(int(token))
        piece = "" if token in self._skip else self._stream.step(self._owner._tok, token) or ""
        if not self._join or not piece:
            return piece
        if not self._started:  # a word's continuation first: its "##" is no text
            piece, self._started = piece.removeprefix("##"), True
        body = self._spaces + piece
        held = len(body) - len(body.rstrip(" "))
        body, self._spaces = body[: len(body) - held], body[len(body) - held :]
        if not body:
            return ""
        out = join_cjk(self._before + body)[len(self._before) :]  # the neighbour judges the first space
        self._before = body[-1]
        return out

    def flush(self) -> str:
        """End the stream: spaces held back at the end, where no CJK character is before them."""
        spaces, self._spaces = self._spaces, ""
        return join_cjk(self._before + spaces)[len(self._before) :]


def _wordpiece(vocab_file: Path, settings: Mapping[str, Any]) -> Any:
    """BERT's WordPiece tokenizer over ``vocab.txt``, with the settings transformers' ``BertTokenizer`` reads."""
    tokenizers = _library()
    from tokenizers import decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece

    unk = _token_text(settings.get("unk_token")) or "[UNK]"
    try:
        vocab = tokenizers.models.WordPiece.read_file(str(vocab_file))
    except Exception as exc:  # the library's own error type for a bad file
        raise CheckpointError(f"{str(vocab_file)!r} is not a WordPiece vocabulary: {exc}") from None
    # The library accepts these and fails only at the first encode, with an error that names no file.
    if not vocab:
        raise CheckpointError(f"{str(vocab_file)!r} is empty: a WordPiece vocabulary lists its tokens, one a line")
    if unk not in vocab:
        raise CheckpointError(f"{str(vocab_file)!r} lacks the unknown-text token {unk!r} (unk_token), which "
                              "WordPiece needs for text outside the vocabulary")
    inner = tokenizers.Tokenizer(WordPiece(vocab, unk_token=unk))
    inner.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=bool(settings.get("tokenize_chinese_chars", True)),
        strip_accents=settings.get("strip_accents"), lowercase=bool(settings.get("do_lower_case", True)))
    inner.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    inner.decoder = decoders.WordPiece(prefix="##")
    specials = [t for k in SPECIAL_KEYS if (t := _token_text(settings.get(k))) is not None and t in vocab]
    inner.add_special_tokens(specials)
    return inner
