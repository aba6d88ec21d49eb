"""GPT-2's byte-level BPE tokenizer, in pure Python.

The constructor takes data and does no I/O; ``gpt2lite.tokenizers.files`` reads
the vocabulary files (bundled, local or from the hub).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import operator
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import regex

from gpt2lite.tokenizers.files import (
    ENDOFTEXT,
    bundled_gpt2_files,
    check_token_ids,
    find_vocab_files,
    read_vocab_files,
    write_bpe_files,
    write_tokenizer_config,
)
from gpt2lite.tokenizers.protocol import StreamDecoder

__all__ = ["GPT2_PATTERN", "Tokenizer"]

# The pre-tokenization pattern of OpenAI's GPT-2 encoder.py.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The same pattern for pure-ASCII text, where the standard library's `re`
# (about twice as fast as `regex`) gives identical splits: in ASCII, \p{L} is
# [A-Za-z], \p{N} is [0-9] and Unicode's White_Space is re.ASCII's \s.
_GPT2_ASCII_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")

# Places where GPT2_PATTERN's matches always end, whatever text stands on either side, so
# that text cut there splits into the same pieces as the whole. The pattern never looks
# behind and looks ahead only after whitespace, and no match crosses from
# - a non-space into a space (only an optional space *starts* a match),
# - a letter into a non-letter or a number into a non-number (runs of one class),
# - other symbols into a number, or into a letter unless the symbol is an apostrophe ('s).
_SAFE_CUT = (
    r"(?<=\S)(?=\s)|(?<=\p{L})(?=[^\s\p{L}])|(?<=\p{N})(?=[^\s\p{N}])"
    r"|(?<=[^\s\p{L}\p{N}])(?=\p{N})|(?<=[^\s\p{L}\p{N}'])(?=\p{L})"
)
_CUT_AFTER = regex.compile(_SAFE_CUT)
_CUT_BEFORE = regex.compile(_SAFE_CUT, flags=regex.REVERSE)

# Words seen once are cached, up to this many; the cache is dropped when full. Words longer
# than _CACHE_WORD_CHARS are not cached, so memory is bounded by size, not only by count.
_CACHE_LIMIT = 100_000
_CACHE_WORD_CHARS = 64
# Words of up to this many bytes merge by rescanning their pairs (fewer Python steps); longer
# ones through a heap, so that a huge word costs n log n, not n squared.
_SHORT_WORD = 24


class Tokenizer:
    """Byte-level BPE tokenizer identical to OpenAI's GPT-2 encoder.

    >>> tok = Tokenizer.gpt2()
    >>> tok.encode("hello world")
    [31373, 995]
    >>> tok.decode([31373, 995])
    'hello world'
    """

    def __init__(
        self,
        vocab: Mapping[bytes, int],
        merges: Sequence[tuple[bytes, bytes]],
        *,
        special_tokens: Mapping[str, int] | None = None,
        pattern: str = GPT2_PATTERN,
    ) -> None:
        """Build from a byte-string vocabulary, the merges in rank order and the special tokens.

        ``vocab`` maps every token's bytes to its id (all 256 single bytes
        included); ``merges[r]`` is the pair merged at rank ``r``.
        """
        if special_tokens is None:
            special_tokens = {ENDOFTEXT: vocab[ENDOFTEXT.encode()]} if ENDOFTEXT.encode() in vocab else {}
        self.max_token_bytes = max(map(len, vocab), default=1)  # so text length bounds the token count
        missing_bytes = [b for b in range(256) if bytes([b]) not in vocab]
        if missing_bytes:
            raise ValueError(
                f"vocabulary lacks single-byte tokens for bytes {missing_bytes[:8]}...; "
                "a byte-level BPE vocabulary must hold all 256"
            )
        self._byte_ids = [vocab[bytes([b])] for b in range(256)]
        # left id << 32 | right id -> (rank, merged id): merging works on ids throughout,
        # and an int key hashes faster than a tuple.
        self._merges: dict[int, tuple[int, int]] = {}
        for rank, (left, right) in enumerate(merges):
            try:
                ids = vocab[left], vocab[right], vocab[left + right]
            except KeyError as exc:
                raise ValueError(
                    f"merge {rank} ({left!r}, {right!r}) names a token missing from the vocabulary: {exc}"
                ) from None
            self._merges[ids[0] << 32 | ids[1]] = (rank, ids[2])

        self.special_tokens: dict[str, int] = dict(special_tokens)
        check_token_ids({**vocab, **self.special_tokens})  # before a table as long as the largest id is built
        n_vocab = max([*vocab.values(), *self.special_tokens.values()]) + 1
        self._decoder: list[bytes | None] = [None] * n_vocab
        for token, i in vocab.items():
            self._decoder[i] = token
        for token, i in self.special_tokens.items():
            self._decoder[i] = token.encode("utf-8")
        self.n_vocab = n_vocab
        self.pattern = pattern
        self._split = regex.compile(pattern).findall
        self._split_ascii = re.compile(_GPT2_ASCII_PATTERN, re.ASCII).findall if pattern == GPT2_PATTERN else None
        self._special_split = None
        if self.special_tokens:
            alternatives = "|".join(regex.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True))
            self._special_split = regex.compile(f"({alternatives})").split
        # Tuples of ints, unlike lists, drop out of the garbage collector's view.
        self._cache: dict[str, tuple[int, ...]] = {}
        self._fingerprint: str | None = None

    # construction from files -------------------------------------------------

    @classmethod
    def from_files(cls, vocab_file: str | os.PathLike[str], merges_file: str | os.PathLike[str]) -> Tokenizer:
        """Load ``vocab.json`` + ``merges.txt`` (Hugging Face) or ``encoder.json`` + ``vocab.bpe`` (OpenAI)."""
        vocab, merges, specials = read_vocab_files(vocab_file, merges_file)
        return cls(vocab, merges, special_tokens=specials)

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """The genuine GPT-2 tokenizer, from the vocabulary bundled with the package (no download)."""
        return cls.from_files(*bundled_gpt2_files())

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike[str], *, revision: str | None = None, cache_dir: str | None = None,
        local_files_only: bool = False,
    ) -> Tokenizer:
        """Load from a directory or hub repo holding vocab.json + merges.txt, or encoder.json + vocab.bpe."""
        files = find_vocab_files(
            name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
        )
        return cls.from_files(*files)

    # properties ----------------------------------------------------------------

    @property
    def eot_token(self) -> int:
        """The id of ``<|endoftext|>`` (50256 for GPT-2)."""
        try:
            return self.special_tokens[ENDOFTEXT]
        except KeyError:
            raise ValueError("this tokenizer has no <|endoftext|> token") from None

    @property
    def fingerprint(self) -> str:
        """A digest of the tokens, merges and special tokens: equal for the same vocabulary."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for token in self._decoder:
                digest.update(b"\x00" if token is None else len(token).to_bytes(2, "big") + token)
            digest.update(repr(sorted(self._merges.items())).encode())
            digest.update(repr(sorted(self.special_tokens.items())).encode())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def __repr__(self) -> str:
        return f"Tokenizer(n_vocab={self.n_vocab}, special_tokens={self.special_tokens})"

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` as transformers' ``GPT2Tokenizer`` does.

        ``AutoTokenizer``, vLLM and llama.cpp's GGUF converter read them.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        specials = set(self.special_tokens.values())
        vocab = {t: i for i, t in enumerate(self._decoder) if t is not None and i not in specials}
        by_rank = sorted((rank, left, right) for key, (rank, _) in self._merges.items()
                         for left, right in [(key >> 32, key & 0xFFFFFFFF)])
        merges = [(self._decoder[left], self._decoder[right]) for _, left, right in by_rank]
        write_bpe_files(directory, vocab, merges, self.special_tokens)  # type: ignore[arg-type]
        end = ENDOFTEXT if ENDOFTEXT in self.special_tokens else None
        settings = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "errors": "replace"}
        if end is not None:
            settings.update(bos_token=end, eos_token=end, unk_token=end)
        write_tokenizer_config(directory, settings)
        return directory

    # encoding -----------------------------------------------------------------

    def encode(self, text: str, *, allowed_special: Literal["all"] | Iterable[str] = ()) -> list[int]:
        """Encode text to token ids; special-token strings stay ordinary text unless allowed.

        >>> Tokenizer.gpt2().encode("hi<|endoftext|>", allowed_special="all")
        [5303, 50256]
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}; decode bytes to str first")
        if not text.isascii():
            text = _replace_lone_surrogates(text)
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self._encode_ordinary(text)
        out: list[int] = []
        for i, part in enumerate(self._special_split(text)):
            if i % 2 == 0:
                out.extend(self._encode_ordinary(part))
            elif part in allowed:
                out.append(self.special_tokens[part])
            else:
                out.extend(self._encode_ordinary(part))
        return out

    def encode_batch(
        self, texts: Iterable[str], *, allowed_special: Literal["all"] | Iterable[str] = ()
    ) -> list[list[int]]:
        """Encode each text of a batch; see ``encode``."""
        if isinstance(texts, str):
            raise TypeError("encode_batch() takes a list of str, got a single str; use encode() for one text")
        return [self.encode(t, allowed_special=allowed_special) for t in texts]

    def encode_stream(self, chunks: Iterable[str]) -> Iterator[list[int]]:
        """Encode text that arrives in pieces (a file read in blocks) as ``encode("".join(chunks))`` would.

        Special-token strings are ordinary text. Text after the last point where
        a pre-token must end is held over to the next piece, so no word is split
        at a piece's edge and memory stays bounded by the piece size (unless the
        text holds a single word longer than that).
        """
        for piece in self.split_stream(chunks):
            yield self.encode(piece)

    def split_stream(self, chunks: Iterable[str]) -> Iterator[str]:
        """The text of ``chunks`` again, cut only where a pre-token must end: encoding each piece gives the whole's ids.

        The pieces can be encoded in any order, by other processes (``prepare_data``'s workers).
        """
        carry = ""
        for chunk in chunks:
            if not isinstance(chunk, str):
                raise TypeError(f"encode_stream() takes str pieces, got {type(chunk).__name__}")
            text = carry + chunk
            # The held-over text has no cut inside it, so look only from its end on.
            m = _CUT_BEFORE.search(text, max(1, len(carry)), len(text))
            cut = m.start() if m else 0
            carry = text[cut:]
            if cut:
                yield text[:cut]
        if carry:
            yield carry

    def _allowed(self, allowed_special: Literal["all"] | Iterable[str]) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        if isinstance(allowed_special, str):
            raise TypeError('allowed_special takes "all" or a set of special-token strings, not a single string')
        allowed = set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(
                f"allowed_special names unknown special tokens {sorted(unknown)}; known: {sorted(self.special_tokens)}"
            )
        return allowed

    def _encode_ordinary(self, text: str) -> list[int]:
        # Most words were seen before: find the new ones with set operations and look every word
        # up with map(), so the per-word work runs in C rather than in a Python loop.
        words = self._words(text)
        cache = self._cache
        new = set(words).difference(cache)
        if new:
            if len(cache) + len(new) > _CACHE_LIMIT:  # full: start again
                cache.clear()
                new = set(words)
            for word in new:
                cache[word] = self._bpe(word.encode("utf-8"))
        out = list(itertools.chain.from_iterable(map(cache.__getitem__, words)))
        for word in new:
            if len(word) > _CACHE_WORD_CHARS:  # long words are not kept: memory bounded by size, not count
                del cache[word]
        if len(cache) > _CACHE_LIMIT:  # one text of more words than that
            cache.clear()
        return out

    def _words(self, text: str) -> list[str]:
        """Pre-tokenize: ASCII stretches go to the fast `re` pattern, the rest to `regex`."""
        if self._split_ascii is None:
            return self._split(text)
        if text.isascii():
            return self._split_ascii(text)
        words: list[str] = []
        done = 0  # text[:done] is split already
        for m in _NON_ASCII.finditer(text):
            if m.end() <= done:
                continue  # inside the stretch already given to `regex`
            # A cut at m.start() at the latest: the pattern's look-ahead stops at endpos.
            before = _CUT_BEFORE.search(text, done + 1, m.start() + 1) if m.start() > done else None
            start = before.start() if before else done
            after = _CUT_AFTER.search(text, m.end())
            end = after.start() if after else len(text)
            words += self._split_ascii(text[done:start])
            words += self._split(text[start:end])
            done = end
        words += self._split_ascii(text[done:])
        return words

    def _bpe(self, data: bytes) -> tuple[int, ...]:
        """Merge the bytes of one pre-token by rank.

        A heap holds the candidate pairs and a linked list the symbols, so each
        merge only looks at its two new neighbours instead of rescanning.
        """
        ids = [self._byte_ids[b] for b in data]
        n = len(ids)
        if n < 2:
            return tuple(ids)
        merges = self._merges
        if n <= _SHORT_WORD:
            return _bpe_scan(ids, merges)
        nxt = list(range(1, n + 1))
        prev = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            m = merges.get(ids[i] << 32 | ids[i + 1])
            if m is not None:
                heap.append((m[0], i, ids[i], ids[i + 1], m[1]))
        heapq.heapify(heap)
        while heap:
            _, i, left, right, merged = heapq.heappop(heap)
            j = nxt[i]
            # Entries go stale when a neighbour merged first; skip those.
            if j >= n or ids[i] != left or ids[j] != right:
                continue
            ids[i] = merged
            ids[j] = -1
            k = nxt[j]
            nxt[i] = k
            if k < n:
                prev[k] = i
                m = merges.get(merged << 32 | ids[k])
                if m is not None:
                    heapq.heappush(heap, (m[0], i, merged, ids[k], m[1]))
            p = prev[i]
            if p >= 0:
                m = merges.get(ids[p] << 32 | merged)
                if m is not None:
                    heapq.heappush(heap, (m[0], p, ids[p], merged, m[1]))
        return tuple([t for t in ids if t >= 0])

    # decoding -----------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of the tokens (possibly cut inside a UTF-8 character)."""
        if isinstance(ids, (str, bytes, bytearray)):
            raise TypeError(f"decode() takes a sequence of integer token ids, got {type(ids).__name__}")
        shape = getattr(ids, "shape", None)
        if shape is not None:  # a tensor or an array
            if len(shape) != 1:
                raise ValueError(f"decode() takes a 1-D sequence of token ids, got shape {tuple(shape)}; "
                                 "decode each row separately")
            ids = ids.tolist()  # type: ignore[union-attr]
        ids = list(ids)
        table = self._decoder
        try:
            if min(ids, default=0) >= 0:
                return b"".join([table[i] for i in ids])  # type: ignore[misc]
        except (IndexError, TypeError):
            pass
        for i in ids:  # slow path, only to name the bad id
            self._check_id(i)
        return b"".join([table[operator.index(i)] for i in ids])  # type: ignore[misc]

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; bytes that are not valid UTF-8 become U+FFFD.

        >>> Tokenizer.gpt2().decode([31373, 995])
        'hello world'
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_token_bytes(self, token: int) -> bytes:
        """The bytes of one token."""
        self._check_id(token)
        return self._decoder[token]  # type: ignore[return-value]

    def _check_id(self, i: object) -> None:
        try:
            i = operator.index(i)  # ints and numpy / torch integer scalars; not floats or strings
        except TypeError:
            raise TypeError(f"token ids must be integers, got {i!r}") from None
        if not 0 <= i < self.n_vocab or self._decoder[i] is None:
            raise ValueError(f"token id {i} is outside the vocabulary (valid ids: 0..{self.n_vocab - 1})")

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh incremental decoder that turns tokens into text at UTF-8 boundaries (special tokens left out)."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


_NO_MERGE = (1 << 62, -1)  # the rank of a pair that never merges: above every real rank


def _bpe_scan(ids: list[int], merges: dict[int, tuple[int, int]]) -> tuple[int, ...]:
    """``_bpe`` for short words: rescan the pairs' ranks for the lowest, leftmost first (C-level min and index)."""
    ranks = [merges.get(left << 32 | right, _NO_MERGE) for left, right in itertools.pairwise(ids)]
    while ranks:
        best = min(ranks)  # (rank, merged id); equal ranks are the same pair
        if best is _NO_MERGE:  # no pair left that merges
            break
        i = ranks.index(best)  # its leftmost occurrence
        ids[i] = best[1]
        del ids[i + 1], ranks[i]
        if i > 0:
            ranks[i - 1] = merges.get(ids[i - 1] << 32 | ids[i], _NO_MERGE)
        if i < len(ranks):
            ranks[i] = merges.get(ids[i] << 32 | ids[i + 1], _NO_MERGE)
    return tuple(ids)


def _replace_lone_surrogates(text: str) -> str:
    # Lone surrogates cannot be UTF-8 encoded; like tiktoken, turn them into
    # U+FFFD (valid surrogate pairs become the character they stand for).
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")

