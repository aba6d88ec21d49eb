"""Training data: text tokenized once, in parallel processes, into token shards (``shards.py``).

A corpus larger than memory works: files are read in blocks, cut into pieces
where no token spans the cut, encoded by worker processes and appended to
fixed-size shards in order, so the tokens are those one process would make. A
second run with the same sources finds the index and reuses the tokens; a run
that was stopped continues from its last complete shard. Training reads the
shards as memory maps, a window at a time.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.distributed as dist

from gpt2lite.io.records import TABLE_SUFFIXES, column, iter_records
from gpt2lite.tokenizers.bpe import Tokenizer
from gpt2lite.tokenizers.protocol import TokenizerProtocol
from gpt2lite.training.shards import INDEX, SHARD_TOKENS, ShardWriter, TokenStream, token_dtype

__all__ = ["Part", "TokenData", "is_prepared", "iter_text", "prepare_data"]

Part = Literal["train", "val"]

_MANIFEST = "manifest.json"
_TOKENS = "tokens.bin"
_FORMAT = 1
_BLOCK_CHARS = 1 << 20  # read files 1M characters at a time
_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


@dataclass(frozen=True)
class TokenData:
    """A token stream on disk, split into a training part and a held-out validation part."""

    directory: Path
    tokens: np.ndarray | TokenStream  # the whole stream: its shards (or, in folders made before them, one memmap)
    split: int  # tokens[:split] train, tokens[split:] validation
    fingerprint: str = ""  # of the sources and settings the tokens were made from
    n_vocab: int | None = None  # of the tokenizer the tokens were made with
    tokenizer: str = ""  # that tokenizer's fingerprint, where it has one

    @property
    def train(self) -> np.ndarray | TokenStream:
        """The training tokens."""
        return self.tokens[: self.split]

    @property
    def val(self) -> np.ndarray | TokenStream:
        """The held-out tokens."""
        return self.tokens[self.split :]

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> TokenData:
        """Open data written by ``prepare_data`` (or ``gpt2lite prepare``)."""
        directory = Path(directory)
        if (directory / INDEX).is_file():
            index = json.loads((directory / INDEX).read_text(encoding="utf-8"))
            tokens: np.ndarray | TokenStream = TokenStream.open(directory, index)
        elif (directory / _MANIFEST).is_file():  # a folder prepared before shards: one memmap
            index = json.loads((directory / _MANIFEST).read_text(encoding="utf-8"))
            tokens = np.memmap(directory / _TOKENS, dtype=np.uint16, mode="r")
        else:
            raise FileNotFoundError(f"{str(directory)!r} holds no prepared data (no {INDEX}): "
                                    "make it with gpt2lite prepare or prepare_data()")
        if len(tokens) != index["tokens"]:
            raise ValueError(f"{str(directory)!r} holds {len(tokens)} tokens, its index says {index['tokens']}")
        return cls(directory, tokens, index["split"], index.get("fingerprint", ""), index.get("n_vocab"),
                   index.get("tokenizer", ""))

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a tokenizer other than the one the tokens were made with (where that can be told)."""
        ours = getattr(tokenizer, "fingerprint", "")
        if (self.n_vocab is not None and self.n_vocab != tokenizer.n_vocab) or (self.tokenizer and ours
                                                                                 and self.tokenizer != ours):
            raise ValueError(f"the data in {str(self.directory)!r} was tokenized with another vocabulary "
                             f"({self.n_vocab} tokens) than this model's tokenizer ({tokenizer.n_vocab} tokens): "
                             "prepare it again with --tokenizer, or train with the tokenizer it was made with")

    def part(self, part: Part) -> np.ndarray | TokenStream:
        """The tokens of ``"train"`` or ``"val"``."""
        if part not in get_args(Part):
            raise ValueError(f"part must be 'train' or 'val', got {part!r}")
        return self.train if part == "train" else self.val

    def windows(self, part: Part, starts: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets ``(len(starts), length)`` for windows at ``starts`` of a part."""
        stream = self.part(part)
        rows = np.stack([np.asarray(stream[s : s + length + 1]) for s in starts.tolist()]).astype(np.int64)
        window = torch.from_numpy(rows)
        return window[:, :-1], window[:, 1:]


def is_prepared(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder of prepared tokens (``gpt2lite prepare``'s ``--out``), not text to prepare."""
    return (Path(path) / INDEX).is_file()


def prepare_data(
    source: str | os.PathLike[str] | Sequence[str],
    directory: str | os.PathLike[str],
    *,
    tokenizer: TokenizerProtocol | None = None,
    val_fraction: float = 0.05,
    errors: Literal["strict", "replace"] = "strict",
    text_column: str = "text",
    workers: int = 1,
    shard_tokens: int = SHARD_TOKENS,
    on_tokens: Callable[[int], None] | None = None,
) -> TokenData:
    """Tokenize a text file, a folder of text files (recursively), a glob or a list of strings into ``directory``.

    A ``.csv``/``.tsv`` (with a header) or ``.jsonl`` file holds one document
    per row, in its ``text_column``. Documents (files, rows, list items) each end
    with ``<|endoftext|>``. The last ``val_fraction`` of the stream is held out
    for validation. The tokens go to shards of ``shard_tokens`` (see
    ``shards.py``); ``workers`` processes tokenize pieces of the text in
    parallel, with the same tokens as one. A run that was stopped continues where
    it stopped; if ``directory`` already holds data made from the same sources, it
    is reused as it is. ``on_tokens`` is called with the count of tokens written
    after each piece (a progress bar).
    Files must be UTF-8 text: anything else is an error naming the file, unless
    ``errors="replace"`` turns undecodable bytes into U+FFFD. Under
    ``torchrun``, process 0 tokenizes while the others wait, then they reuse it.
    """
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    settings = dict(tokenizer=tokenizer, val_fraction=val_fraction, errors=errors, text_column=text_column,
                    workers=workers, shard_tokens=shard_tokens, on_tokens=on_tokens)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_rank() == 0:
            data = _prepare(source, directory, **settings)
        dist.barrier()
        return data if dist.get_rank() == 0 else _prepare(source, directory, **settings)
    return _prepare(source, directory, **settings)


def _prepare(
    source: str | os.PathLike[str] | Sequence[str],
    directory: str | os.PathLike[str],
    *,
    tokenizer: TokenizerProtocol | None,
    val_fraction: float,
    errors: str,
    text_column: str,
    workers: int,
    shard_tokens: int,
    on_tokens: Callable[[int], None] | None,
) -> TokenData:
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    tokenizer = tokenizer or Tokenizer.gpt2()
    if tokenizer.n_vocab > 1 << 32:
        raise ValueError(f"a vocabulary of {tokenizer.n_vocab} tokens does not fit in uint32")
    documents, fingerprint = _documents(source, errors, text_column)
    directory = Path(directory)
    vocabulary = getattr(tokenizer, "fingerprint", "")
    # The same text of the same format (1: the rules of the token stream) gives the same fingerprint,
    # however it is stored: a folder prepared before shards keeps its fingerprint, so its runs resume.
    fingerprint = hashlib.sha256(
        (fingerprint + f"|vocab={tokenizer.n_vocab}:{vocabulary}|val={val_fraction}"
         f"|errors={errors}|format={_FORMAT}").encode()
    ).hexdigest()
    for record in (INDEX, _MANIFEST):
        try:
            if json.loads((directory / record).read_text(encoding="utf-8")).get("fingerprint") == fingerprint:
                return TokenData.open(directory)
        except (ValueError, KeyError, OSError):
            pass  # none, unreadable or stale: make it again

    dtype = token_dtype(tokenizer.n_vocab)
    writer = ShardWriter(directory, fingerprint, dtype, shard_tokens)
    for stale in (_MANIFEST, _TOKENS):  # a folder prepared before shards
        (directory / stale).unlink(missing_ok=True)
    skip = writer.units
    units = itertools.islice(_units(documents, tokenizer), skip, None)
    for done, ids in enumerate(_encode_units(units, tokenizer, dtype, workers), start=skip + 1):
        writer.add(ids, done)
        if on_tokens is not None:
            on_tokens(writer.tokens)
    count = writer.tokens
    if count < 8:
        raise ValueError(f"the data holds only {count} tokens: too little text to train on")
    split = max(1, min(count - 2, round(count * (1 - val_fraction))))
    writer.finish(fingerprint=fingerprint, split=split, n_vocab=tokenizer.n_vocab, tokenizer=vocabulary,
                  source=_describe(source))
    return TokenData.open(directory)


# Tokenizing in parallel -------------------------------------------------------------------
#
# The text is cut into units of about _UNIT_CHARS characters: whole documents, or pieces of a long
# one cut where the tokenizer's split_stream says no token spans the cut (so encoding the pieces
# gives the document's tokens). Workers encode units in any order; their tokens are written in
# the units' order, so the stream is the one a single process makes.

_UNIT_CHARS = 1 << 20
_END = None  # in a unit: the end of a document, <|endoftext|>
Unit = list[str | None]


def _units(documents: Iterator[Iterable[str]], tokenizer: TokenizerProtocol) -> Iterator[Unit]:
    """The text as units to encode: pieces of documents, each document followed by ``_END``."""
    split = getattr(tokenizer, "split_stream", None)
    unit: Unit = []
    size = 0
    for blocks in documents:
        # A tokenizer without split_stream encodes each document whole.
        for piece in split(blocks) if split is not None else ["".join(blocks)]:
            unit.append(piece)
            size += len(piece)
            if size >= _UNIT_CHARS:
                yield unit
                unit, size = [], 0
        unit.append(_END)
    if unit:
        yield unit


def _encode_unit(tokenizer: TokenizerProtocol, dtype: np.dtype, unit: Unit) -> np.ndarray:
    ids: list[int] = []
    for piece in unit:
        if piece is _END:
            ids.append(tokenizer.eot_token)
        else:
            ids += tokenizer.encode(piece)
    return np.asarray(ids, dtype=dtype)


_worker: tuple[Any, np.dtype] | None = None  # the tokenizer of a worker process, given once at its start


def _start_worker(tokenizer: TokenizerProtocol, dtype: np.dtype) -> None:
    global _worker
    _worker = (tokenizer, dtype)


def _encode_in_worker(unit: Unit) -> np.ndarray:
    return _encode_unit(*_worker, unit)  # type: ignore[misc]


def _encode_units(units: Iterator[Unit], tokenizer: TokenizerProtocol, dtype: np.dtype,
                  workers: int) -> Iterator[np.ndarray]:
    """The tokens of each unit, in order; ``workers`` processes encode them (1: this process)."""
    if workers == 1:
        for unit in units:
            yield _encode_unit(tokenizer, dtype, unit)
        return
    with multiprocessing.Pool(workers, initializer=_start_worker, initargs=(tokenizer, dtype)) as pool:
        pending: collections.deque[Any] = collections.deque()
        for unit in units:
            pending.append(pool.apply_async(_encode_in_worker, (unit,)))
            if len(pending) >= 2 * workers:  # a few units ahead: memory stays bounded
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def iter_text(source: str | os.PathLike[str] | Sequence[str], errors: str = "strict",
              text_column: str = "text") -> Iterator[str]:
    """The text of a file, a folder of text files, a glob or a list of strings, in blocks, as ``prepare_data`` does."""
    documents, _ = _documents(source, errors, text_column)
    for blocks in documents:
        yield from blocks


def _describe(source: str | os.PathLike[str] | Sequence[str]) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"{len(source)} strings"


def _documents(
    source: str | os.PathLike[str] | Sequence[str], errors: str, text_column: str
) -> tuple[Iterator[Iterable[str]], str]:
    """The documents as iterables of text blocks, and a fingerprint of the sources."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
            stat = path.stat()
            return _rows(path, text_column), json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns,
                                                         text_column])
        if path.is_file():
            files = [path]
        elif path.is_dir():
            if is_prepared(path):
                raise ValueError(f"{str(path)!r} holds tokens prepared already (gpt2lite prepare): open it with "
                                 "TokenData.open, or train on it with --data as it is")
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES)
            if not files:
                raise ValueError(f"folder {str(path)!r} holds no text files ({', '.join(_TEXT_SUFFIXES)})")
        elif glob.has_magic(str(source)):
            files = sorted(Path(p) for p in glob.glob(str(source), recursive=True) if os.path.isfile(p))
            if not files:
                raise FileNotFoundError(f"no files match {str(source)!r}")
        else:
            raise FileNotFoundError(f"no such file or folder: {str(path)!r}")
        stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        if sum(size for _, size, _ in stats) == 0:
            raise ValueError(f"{str(path)!r} holds only empty files")
        tables = any(p.suffix.lower() in TABLE_SUFFIXES for p in files)  # a glob may match .jsonl files
        documents = (document for p in files for document in
                     (_rows(p, text_column) if p.suffix.lower() in TABLE_SUFFIXES else [_read_blocks(p, errors)]))
        return documents, json.dumps([*stats, text_column] if tables else stats)
    if not isinstance(source, Sequence) or not all(isinstance(s, str) for s in source):
        raise TypeError("source must be a path or a list of str")
    if not any(source):
        raise ValueError("source holds no text")
    digest = hashlib.sha256()
    for text in source:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\x00")
    return ([text] for text in source), digest.hexdigest()


def _rows(path: Path, text_column: str) -> Iterator[list[str]]:
    """The documents of a table file: one per row, its ``text_column``."""
    count = 0
    for where, record in iter_records(path, what="a corpus of documents"):
        text = column(where, record, text_column, "text_column= (--text-column)")
        if not isinstance(text, str):
            raise ValueError(f"{where}: the {text_column!r} value is not a string")
        if text:
            count += 1
            yield [text]
    if not count:
        raise ValueError(f"{str(path)!r} holds no documents (no row has text in {text_column!r})")


def _read_blocks(path: Path, errors: str) -> Iterator[str]:
    """The text of a UTF-8 file in blocks; other encodings and binary files are an error naming the file."""
    fix = 'save it as UTF-8, or pass errors="replace" to turn undecodable bytes into U+FFFD'
    with open(path, encoding="utf-8", errors=errors, newline="") as f:
        while True:
            try:
                block = f.read(_BLOCK_CHARS)
            except UnicodeDecodeError as exc:
                raise ValueError(f"{str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start} of a "
                                 f"block): {fix}") from None
            if not block:
                return
            # UTF-16 text without a byte-order mark, and most binary files, decode as UTF-8 full of NULs.
            if errors == "strict" and "\x00" in block:
                raise ValueError(
                    f"{str(path)!r} holds NUL characters, so it is binary or UTF-16, not UTF-8 text: {fix}"
                )
            yield block
