"""Token shards on disk: fixed-size files of token ids and a small index, written resumably, read as one stream.

A prepared folder holds ``shard-00000.bin``, ``shard-00001.bin``, ... (raw
``uint16`` ids when the vocabulary fits, ``uint32`` otherwise; every shard but the
last holds exactly ``shard_tokens``) and ``index.json`` (the dtype, the shards and
their lengths, the split point, a fingerprint of the sources). While a folder is
being written, ``progress.json`` says how many shards are complete and how many
units of input they (and a small ``tail-N.bin`` of tokens not yet in a shard)
hold, so a run that was killed continues from there. ``TokenStream`` reads the
shards as one array without loading them: each is a memory map, read from disk
as windows are drawn.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpt2lite.io.files import atomic_write, write_json

__all__ = ["INDEX", "SHARD_TOKENS", "ShardWriter", "TokenStream", "token_dtype"]

INDEX = "index.json"
PROGRESS = "progress.json"
SHARD_TOKENS = 1 << 24  # 16M tokens: 32 MB of uint16 per shard
FORMAT = 2  # of the folder; format 1 was one tokens.bin and manifest.json


def token_dtype(n_vocab: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id of a vocabulary of ``n_vocab`` tokens."""
    return np.dtype(np.uint16 if n_vocab <= 1 << 16 else np.uint32)


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.bin"


def _tail_name(i: int) -> str:
    return f"tail-{i:05d}.bin"


class TokenStream:
    """Token shards read as one 1-D array: ``len``, views by slicing (no copy), numpy arrays of a range on demand."""

    def __init__(self, parts: Sequence[np.ndarray], start: int = 0, stop: int | None = None) -> None:
        """The tokens ``start:stop`` of the concatenation of ``parts`` (memory maps, or arrays)."""
        self.parts = list(parts)
        self._starts = [0]
        for part in self.parts:
            self._starts.append(self._starts[-1] + len(part))
        total = self._starts[-1]
        self.start, self.stop = start, total if stop is None else stop
        if not 0 <= self.start <= self.stop <= total:
            raise ValueError(f"tokens {start}:{stop} are outside a stream of {total}")
        self.dtype = self.parts[0].dtype if self.parts else np.dtype(np.uint16)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            first, last, step = key.indices(len(self))
            if step != 1:
                raise ValueError("a token stream is sliced with step 1 only")
            return TokenStream(self.parts, self.start + first, self.start + max(first, last))
        i = key + len(self) if key < 0 else key
        if not 0 <= i < len(self):
            raise IndexError(f"token {key} is outside a stream of {len(self)}")
        i += self.start
        part = bisect.bisect_right(self._starts, i) - 1
        return self.parts[part][i - self._starts[part]]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The tokens as one array (read from the shards they span)."""
        first = bisect.bisect_right(self._starts, self.start) - 1
        pieces = []
        at = self.start
        for part in range(max(first, 0), len(self.parts)):
            if at >= self.stop:
                break
            offset = self._starts[part]
            pieces.append(self.parts[part][at - offset : min(self.stop, self._starts[part + 1]) - offset])
            at = self._starts[part + 1]
        out = np.concatenate(pieces) if pieces else np.empty(0, self.dtype)
        return out if dtype is None else out.astype(dtype)

    def astype(self, dtype: Any) -> np.ndarray:
        """The tokens as an array of ``dtype``."""
        return self.__array__(dtype)

    def tolist(self) -> list[int]:
        """The tokens as a list of ints."""
        return self.__array__().tolist()

    def __repr__(self) -> str:
        return f"TokenStream({len(self)} tokens in {len(self.parts)} shards)"

    @classmethod
    def open(cls, directory: str | os.PathLike[str], index: dict[str, Any]) -> TokenStream:
        """The shards ``index`` (``index.json``'s content) lists in ``directory``, checked against their sizes."""
        directory = Path(directory)
        dtype = np.dtype(index["dtype"])
        parts = []
        for shard in index["shards"]:
            path = directory / shard["file"]
            size = path.stat().st_size if path.is_file() else None
            if size != shard["tokens"] * dtype.itemsize:
                raise ValueError(f"{str(path)!r} should hold {shard['tokens']} tokens of {dtype.name} "
                                 f"({shard['tokens'] * dtype.itemsize} bytes) but "
                                 f"{'is missing' if size is None else f'holds {size} bytes'}: prepare the data again")
            parts.append(np.memmap(path, dtype=dtype, mode="r"))
        return cls(parts)


class ShardWriter:
    """Appends tokens to fixed-size shards in ``directory``; continues a run that stopped with the same ``key``.

    ``units`` says how many units of input (the caller's numbering) the tokens
    written so far came from: a resumed caller skips that many.
    """

    def __init__(self, directory: str | os.PathLike[str], key: str, dtype: np.dtype, shard_tokens: int) -> None:
        """Open ``directory`` for writing shards of ``shard_tokens`` tokens of ``dtype``."""
        if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
            raise ValueError(f"shard_tokens must be an int >= 1, got {shard_tokens!r}")
        self.directory, self.key, self.dtype, self.shard_tokens = Path(directory), key, np.dtype(dtype), shard_tokens
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shards, self.units = 0, 0
        self._pending: list[np.ndarray] = []  # tokens not yet in a shard
        self._pending_count = 0
        progress = self._read_progress()
        if progress is not None:
            self.shards, self.units = progress["shards"], progress["units"]
            tail = np.fromfile(self.directory / progress["tail"], dtype=self.dtype)
            self._pending, self._pending_count = [tail], len(tail)
        else:
            self._remove(lambda name: name.startswith(("shard-", "tail-")) or name in (INDEX, PROGRESS))

    @property
    def tokens(self) -> int:
        """Tokens written so far (those in shards and those waiting for the next)."""
        return self.shards * self.shard_tokens + self._pending_count

    def add(self, ids: np.ndarray, units: int) -> None:
        """Append ``ids``, the tokens of the input up to unit ``units``; write every shard they complete."""
        self._pending.append(np.asarray(ids, dtype=self.dtype))
        self._pending_count += len(ids)
        self.units = units
        if self._pending_count < self.shard_tokens:
            return
        stream = np.concatenate(self._pending)
        done = 0
        while len(stream) - done >= self.shard_tokens:
            self._write(_shard_name(self.shards), stream[done : done + self.shard_tokens])
            self.shards += 1
            done += self.shard_tokens
        self._pending, self._pending_count = [stream[done:]], len(stream) - done
        # The tail first, then the record that names it: a kill between the two leaves the old record valid.
        self._write(_tail_name(self.shards), self._pending[0])
        write_json(self.directory / PROGRESS, {"key": self.key, "shard_tokens": self.shard_tokens,
                                               "shards": self.shards, "units": units,
                                               "tail": _tail_name(self.shards)})
        keep = _tail_name(self.shards)
        self._remove(lambda name: name.startswith("tail-") and name != keep)

    def finish(self, **index: Any) -> dict[str, Any]:
        """Write the last shard and ``index.json`` (with ``index``'s entries); return the index."""
        shards = [{"file": _shard_name(i), "tokens": self.shard_tokens} for i in range(self.shards)]
        if self._pending_count:
            self._write(_shard_name(self.shards), np.concatenate(self._pending))
            shards.append({"file": _shard_name(self.shards), "tokens": self._pending_count})
        content = {"format": FORMAT, "dtype": self.dtype.name, "tokens": self.tokens, **index, "shards": shards}
        write_json(self.directory / INDEX, content)
        self._remove(lambda name: name.startswith("tail-") or name == PROGRESS)
        return content

    def _read_progress(self) -> dict[str, Any] | None:
        """The record of an unfinished run with this key and shard size whose files are all there, else None."""
        try:
            progress = json.loads((self.directory / PROGRESS).read_text(encoding="utf-8"))
            if progress["key"] != self.key or progress["shard_tokens"] != self.shard_tokens:
                return None
            complete = all((self.directory / _shard_name(i)).stat().st_size == self.shard_tokens * self.dtype.itemsize
                           for i in range(progress["shards"]))
            tail = (self.directory / progress["tail"]).stat().st_size
            return progress if complete and tail % self.dtype.itemsize == 0 else None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # none, or unreadable: start again

    def _write(self, name: str, ids: np.ndarray) -> None:
        with atomic_write(self.directory / name) as tmp:
            ids.tofile(tmp)

    def _remove(self, which: Any) -> None:
        for path in self.directory.iterdir():
            if path.is_file() and which(path.name):
                with contextlib.suppress(OSError):
                    path.unlink()
