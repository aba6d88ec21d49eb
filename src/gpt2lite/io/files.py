"""Files: writing them so that a reader never sees a torn one (the one atomic-write helper), reading small JSON."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpt2lite.errors import CheckpointError

__all__ = ["MAX_JSON_BYTES", "atomic_write", "read_json", "write_json"]

MAX_JSON_BYTES = 8 * 2**20  # a config or settings file is a few KB; a larger one is refused before it is parsed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on any error remove it.

    The rename is atomic on POSIX and Windows, so ``path`` holds either the old
    content or the new, never a half-written file, whatever interrupts the write
    (Ctrl-C, a full disk).

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "hello.txt"
    >>> with atomic_write(target) as tmp:
    ...     _ = tmp.write_text("hello")
    >>> target.read_text()
    'hello'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_json(path: str | os.PathLike[str], value: Any) -> Path:
    """Write ``value`` as indented UTF-8 JSON, atomically; return the path."""
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_json(path: str | os.PathLike[str], *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The parsed JSON of a settings file (a model config, an adapter config), refusing a huge one unread.

    A problem is a ``CheckpointError`` (a ``ValueError``) naming the file (``FileNotFoundError`` when it is missing).
    """
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):  # /dev/zero never ends, a FIFO blocks the reader: neither is opened
        raise CheckpointError(f"{str(path)!r} is not a regular file")
    size = info.st_size
    if size > max_bytes:
        raise CheckpointError(f"{str(path)!r} is {size} bytes; a settings file is a few KB (at most {max_bytes})")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{str(path)!r} is not valid JSON: {exc}") from None
        except RecursionError:
            # The parser recurses once per level: a few hundred KB of brackets exhaust Python's stack.
            raise CheckpointError(f"{str(path)!r} nests its JSON deeper than the parser's limit of about "
                                  f"{sys.getrecursionlimit()} levels; a settings file nests a few") from None
