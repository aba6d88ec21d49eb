"""GPT-2's tokenizer files: where they are (bundled, a directory, a hub repo) and how they spell tokens.

``encoder.json``/``vocab.json`` map token strings to ids and
``vocab.bpe``/``merges.txt`` list the merges in rank order. Both spell each
byte as a printable character (``bytes_to_unicode``); this module turns them
into the plain byte strings that ``Tokenizer`` takes, as tiktoken's ``load.py``
does for its encodings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from gpt2lite.errors import CheckpointError
from gpt2lite.io.files import atomic_write, write_json
from gpt2lite.io.hub import resolve_files

__all__ = [
    "ENDOFTEXT",
    "SPECIAL_KEYS",
    "VOCAB_FILE_NAMES",
    "bundled_gpt2_files",
    "bytes_to_unicode",
    "check_token_ids",
    "find_vocab_files",
    "parse_vocab",
    "read_vocab_files",
    "write_bpe_files",
    "write_tokenizer_config",
]

# The special tokens tokenizer_config.json and special_tokens_map.json name (transformers' names).
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

ENDOFTEXT = "<|endoftext|>"

# Hugging Face's names first, then OpenAI's: both hold the same formats.
VOCAB_FILE_NAMES = [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")]

BPEData = tuple[dict[bytes, int], list[tuple[bytes, bytes]], dict[str, int]]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character.

    The vocabulary files spell tokens in these characters: printable Latin-1
    bytes stand for themselves, the rest are moved to U+0100 onwards.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def check_token_ids(ids: Mapping[Any, object]) -> None:
    """Refuse token ids that are not ints >= 0, or that would leave more rows unused than the tokens fill.

    A decoding table holds a row per id up to the largest, so one id of 3e8 would
    cost gigabytes before anything is decoded; real vocabularies number their
    tokens from 0 with few gaps or none.
    """
    limit = 2 * len(ids)
    for token, i in ids.items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < limit:
            raise ValueError(f"token {token!r} has id {i!r}: the ids of {len(ids)} tokens must be ints from 0 to "
                             f"{limit - 1} (at most as many ids unused as used)")


def parse_vocab(
    vocab_json: Mapping[str, int], merges_text: str, *, special_tokens: Mapping[str, int] | None = None
) -> BPEData:
    """The byte vocabulary, the merges in rank order and the special tokens of parsed GPT-2 files.

    ``vocab_json`` is the parsed ``encoder.json``/``vocab.json``, ``merges_text``
    the text of ``vocab.bpe``/``merges.txt``. Without ``special_tokens``,
    ``<|endoftext|>`` is special when the vocabulary has it.
    """
    # Map the printable stand-ins back to bytes with str.translate: C speed for 100k symbols.
    to_latin1 = {ord(ch): b for b, ch in bytes_to_unicode().items()}
    alphabet = {chr(c) for c in to_latin1}

    specials = dict(special_tokens) if special_tokens is not None else {}
    if special_tokens is None and ENDOFTEXT in vocab_json:
        specials[ENDOFTEXT] = vocab_json[ENDOFTEXT]
    tokens = [t for t in vocab_json if t not in specials]
    stray = set("".join(tokens)) - alphabet
    if stray:
        raise ValueError(f"vocabulary entries use characters outside GPT-2's byte alphabet: {sorted(stray)[:5]}")
    vocab = {t.translate(to_latin1).encode("latin-1"): vocab_json[t] for t in tokens}

    lines = merges_text.split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    lines = [line for line in lines if line]
    stray = set("".join(lines)) - alphabet - {" "}
    if stray:
        raise ValueError(f"merges use characters outside GPT-2's byte alphabet: {sorted(stray)[:5]}")
    merges = []
    for line in lines:
        left, sep, right = line.partition(" ")
        if not sep or not left or not right or " " in right:
            raise ValueError(f"a merges line should hold two symbols separated by one space: {line!r}")
        merges.append((left.translate(to_latin1).encode("latin-1"), right.translate(to_latin1).encode("latin-1")))
    return vocab, merges, specials


def bundled_gpt2_files() -> tuple[Path, Path]:
    """Paths of GPT-2's ``encoder.json`` and ``vocab.bpe`` shipped inside the package."""
    data = resources.files("gpt2lite") / "data"
    return Path(str(data / "encoder.json")), Path(str(data / "vocab.bpe"))


def read_vocab_files(vocab_file: str | os.PathLike[str], merges_file: str | os.PathLike[str]) -> BPEData:
    """Read and parse a ``vocab.json``/``encoder.json`` and a ``merges.txt``/``vocab.bpe`` (see ``parse_vocab``)."""
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(vocab_file)!r} is not valid JSON: {exc}") from None
    except RecursionError:  # brackets nested past the parser's stack
        raise CheckpointError(f"{str(vocab_file)!r} nests its JSON too deep: it should map token strings to "
                              "ids") from None
    try:
        with open(merges_file, encoding="utf-8") as f:
            merges = f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(merges_file)!r} is not UTF-8 text: {exc}") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise CheckpointError(f"{str(vocab_file)!r} should map token strings to integer ids")
    try:
        check_token_ids(vocab)  # before the Tokenizer builds a table as long as the largest id
    except ValueError as exc:
        raise CheckpointError(f"{str(vocab_file)!r}: {exc}") from None
    return parse_vocab(vocab, merges)


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


def write_bpe_files(directory: str | os.PathLike[str], vocab: Mapping[bytes, int],
                    merges: Sequence[tuple[bytes, bytes]], special_tokens: Mapping[str, int]) -> None:
    """``vocab.json`` and ``merges.txt`` in GPT-2's spelling (what transformers' ``GPT2Tokenizer`` reads)."""
    directory = Path(directory)
    to_text = bytes_to_unicode()
    table = {b: to_text[b] for b in range(256)}  # latin-1 decoding keeps byte b as code point b

    def spell(token: bytes) -> str:
        return token.decode("latin-1").translate(table)

    entries = {spell(t): i for t, i in vocab.items()}
    entries.update(special_tokens)
    with atomic_write(directory / "vocab.json") as tmp:
        tmp.write_text(json.dumps(dict(sorted(entries.items(), key=lambda kv: kv[1])), ensure_ascii=False),
                       encoding="utf-8")
    with atomic_write(directory / "merges.txt") as tmp:
        tmp.write_text("#version: 0.2\n" + "".join(f"{spell(a)} {spell(b)}\n" for a, b in merges), encoding="utf-8")


def write_tokenizer_config(directory: str | os.PathLike[str], settings: Mapping[str, Any]) -> None:
    """``tokenizer_config.json`` (the class and special tokens) and ``special_tokens_map.json``."""
    directory = Path(directory)
    specials = {k: v for k, v in settings.items() if k in SPECIAL_KEYS}
    write_json(directory / "tokenizer_config.json", dict(settings))
    write_json(directory / "special_tokens_map.json", specials)
