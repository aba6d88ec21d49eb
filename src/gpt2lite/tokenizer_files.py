"""Reading tokenizer vocabulary files: the bundled GPT-2 ones, a directory or a hub repo."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from gpt2lite.hub import resolve_files

__all__ = ["VOCAB_FILE_NAMES", "bundled_gpt2_files", "find_vocab_files", "read_vocab_files"]

# Hugging Face's names first, then OpenAI's: both hold the same formats.
VOCAB_FILE_NAMES = [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")]


def bundled_gpt2_files() -> tuple[Path, Path]:
    """Paths of GPT-2's ``encoder.json`` and ``vocab.bpe`` shipped inside the package."""
    data = resources.files("gpt2lite") / "data"
    return Path(str(data / "encoder.json")), Path(str(data / "vocab.bpe"))


def read_vocab_files(
    vocab_file: str | os.PathLike[str], merges_file: str | os.PathLike[str]
) -> tuple[dict[str, int], str]:
    """Parse a ``vocab.json``/``encoder.json`` and read a ``merges.txt``/``vocab.bpe``."""
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_file, encoding="utf-8") as f:
            merges = f.read()
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(vocab_file)!r} is not valid JSON: {exc}") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ValueError(f"{str(vocab_file)!r} should map token strings to integer ids")
    return vocab, merges


def find_vocab_files(
    name_or_path: str | os.PathLike[str], *, revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None, local_files_only: bool = False,
) -> tuple[Path, Path]:
    """Locate the vocabulary and merges files in a directory or hub repo."""
    vocab, merges = resolve_files(
        name_or_path, VOCAB_FILE_NAMES, revision=revision, cache_dir=cache_dir,
        local_files_only=local_files_only, what="tokenizer files",
    )
    return vocab, merges
