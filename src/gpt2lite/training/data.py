"""Training data: text tokenized once into a ``uint16`` memory map beside a JSON manifest.

A corpus larger than memory works: files are read in blocks and tokens are
appended to disk as they come. A second run with the same sources finds the
manifest and reuses the tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
import torch.distributed as dist

from gpt2lite.io.files import atomic_write, write_json
from gpt2lite.io.records import TABLE_SUFFIXES, column, iter_records
from gpt2lite.tokenizers.bpe import Tokenizer

__all__ = ["Part", "TokenData", "iter_text", "prepare_data"]

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
    tokens: np.ndarray  # uint16 memory map of the whole stream
    split: int  # tokens[:split] train, tokens[split:] validation
    fingerprint: str = ""  # of the sources and settings the tokens were made from

    @property
    def train(self) -> np.ndarray:
        """The training tokens."""
        return self.tokens[: self.split]

    @property
    def val(self) -> np.ndarray:
        """The held-out tokens."""
        return self.tokens[self.split :]

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> TokenData:
        """Open data written by ``prepare_data``."""
        directory = Path(directory)
        manifest = json.loads((directory / _MANIFEST).read_text(encoding="utf-8"))
        tokens = np.memmap(directory / _TOKENS, dtype=np.uint16, mode="r")
        if len(tokens) != manifest["tokens"]:
            raise ValueError(
                f"{directory / _TOKENS} holds {len(tokens)} tokens, its manifest says {manifest['tokens']}"
            )
        return cls(directory, tokens, manifest["split"], manifest.get("fingerprint", ""))

    def part(self, part: Part) -> np.ndarray:
        """The tokens of ``"train"`` or ``"val"``."""
        if part not in get_args(Part):
            raise ValueError(f"part must be 'train' or 'val', got {part!r}")
        return self.train if part == "train" else self.val

    def windows(self, part: Part, starts: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets ``(len(starts), length)`` for windows at ``starts`` of a part."""
        stream = self.part(part)
        rows = np.stack([stream[s : s + length + 1] for s in starts.tolist()]).astype(np.int64)
        window = torch.from_numpy(rows)
        return window[:, :-1], window[:, 1:]


def prepare_data(
    source: str | os.PathLike[str] | Sequence[str],
    directory: str | os.PathLike[str],
    *,
    tokenizer: Tokenizer | None = None,
    val_fraction: float = 0.05,
    errors: Literal["strict", "replace"] = "strict",
    text_column: str = "text",
) -> TokenData:
    """Tokenize a text file, a folder of text files (recursively) or a list of strings into ``directory``.

    A ``.csv``/``.tsv`` (with a header) or ``.jsonl`` file holds one document
    per row, in its ``text_column``. Documents (files, rows, list items) each end
    with ``<|endoftext|>``. The last
    ``val_fraction`` of the stream is held out for validation. If ``directory``
    already holds data made from the same sources, it is reused as it is.
    Files must be UTF-8 text: anything else is an error naming the file, unless
    ``errors="replace"`` turns undecodable bytes into U+FFFD. Under
    ``torchrun``, process 0 tokenizes while the others wait, then they reuse it.
    """
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_rank() == 0:
            data = _prepare(source, directory, tokenizer, val_fraction, errors, text_column)
        dist.barrier()
        return data if dist.get_rank() == 0 else _prepare(source, directory, tokenizer, val_fraction, errors,
                                                          text_column)
    return _prepare(source, directory, tokenizer, val_fraction, errors, text_column)


def _prepare(
    source: str | os.PathLike[str] | Sequence[str],
    directory: str | os.PathLike[str],
    tokenizer: Tokenizer | None,
    val_fraction: float,
    errors: str,
    text_column: str,
) -> TokenData:
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    tokenizer = tokenizer or Tokenizer.gpt2()
    if tokenizer.n_vocab > 1 << 16:
        raise ValueError(f"a vocabulary of {tokenizer.n_vocab} tokens does not fit in uint16")
    documents, fingerprint = _documents(source, errors, text_column)
    directory = Path(directory)
    fingerprint = hashlib.sha256(
        (fingerprint + f"|vocab={tokenizer.n_vocab}:{getattr(tokenizer, 'fingerprint', '')}|val={val_fraction}"
         f"|errors={errors}|format={_FORMAT}").encode()
    ).hexdigest()
    manifest_path = directory / _MANIFEST
    if manifest_path.is_file():
        try:
            if json.loads(manifest_path.read_text(encoding="utf-8")).get("fingerprint") == fingerprint:
                return TokenData.open(directory)
        except (ValueError, KeyError, OSError):
            pass  # unreadable or stale: make it again

    directory.mkdir(parents=True, exist_ok=True)
    eot = tokenizer.eot_token
    count = 0
    with atomic_write(directory / _TOKENS) as tmp, open(tmp, "wb") as f:
        for blocks in documents:
            for ids in tokenizer.encode_stream(blocks):
                np.asarray(ids, dtype=np.uint16).tofile(f)
                count += len(ids)
            np.asarray([eot], dtype=np.uint16).tofile(f)
            count += 1
        if count < 8:
            raise ValueError(f"the data holds only {count} tokens: too little text to train on")
    split = max(1, min(count - 2, round(count * (1 - val_fraction))))
    manifest = {"format": _FORMAT, "fingerprint": fingerprint, "tokens": count, "split": split,
                "n_vocab": tokenizer.n_vocab, "source": _describe(source)}
    write_json(manifest_path, manifest)
    return TokenData.open(directory)


def iter_text(source: str | os.PathLike[str] | Sequence[str], errors: str = "strict",
              text_column: str = "text") -> Iterator[str]:
    """The text of a file, a folder of text files or a list of strings, in blocks, as ``prepare_data`` reads it."""
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
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES)
            if not files:
                raise ValueError(f"folder {str(path)!r} holds no text files ({', '.join(_TEXT_SUFFIXES)})")
        else:
            raise FileNotFoundError(f"no such file or folder: {str(path)!r}")
        stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        if sum(size for _, size, _ in stats) == 0:
            raise ValueError(f"{str(path)!r} holds only empty files")
        return (_read_blocks(p, errors) for p in files), json.dumps(stats)
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
