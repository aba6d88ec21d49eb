"""Rows of a table file: ``.csv``/``.tsv`` with a header, or ``.jsonl`` with one JSON object per line.

Labeled data, documents per row and instruction data all read their files here,
so each of them names a bad row the same way: the file and its line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["TABLE_SUFFIXES", "column", "iter_records", "jsonl_records"]

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")

Record = tuple[str, dict[str, Any]]  # (where: the file and line, the row)


def iter_records(path: str | Path, *, suffixes: tuple[str, ...] = TABLE_SUFFIXES,
                 what: str = "data") -> Iterator[Record]:
    """Each row of ``path`` with where it stands (for errors about it), read as it goes; a UTF-8 BOM is dropped.

    >>> next(iter_records("reviews.csv"))  # doctest: +SKIP
    ("'reviews.csv' line 2", {'text': 'Great film', 'label': 'pos'})
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        kinds = [s for s in suffixes if s != ".json"]  # .json is accepted as JSONL, not advertised
        named = f"{', '.join(kinds[:-1])} or {kinds[-1]}" if len(kinds) > 1 else kinds[0]
        raise ValueError(f"{str(path)!r}: {what} must be {named} (JSONL: one JSON object per line)")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            yield from _csv_rows(f, path, suffix) if suffix in (".csv", ".tsv") else jsonl_records(f, str(path))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not UTF-8 text: {exc}") from None


def column(where: str, record: dict[str, Any], name: str, flag: str) -> Any:
    """``record[name]``, or an error naming the row, the columns it has and how to pick another."""
    if name not in record:
        raise ValueError(f"{where} has no {name!r} column (it has {sorted(record)}); name the column with {flag}")
    return record[name]


def _csv_rows(f: Any, path: Path, suffix: str) -> Iterator[Record]:
    reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
    try:
        header = reader.fieldnames
        for record in reader:
            where = f"{str(path)!r} line {reader.line_num}"
            if None in record:  # DictReader's place for fields past the header's
                raise ValueError(f"{where} has more fields than the header {header}: quote a text that holds "
                                 f"{'a tab' if suffix == '.tsv' else 'a comma'} (\"like, this\")")
            if any(v is None for v in record.values()):
                raise ValueError(f"{where} has fewer fields than the header {header}")
            yield where, record
    except csv.Error as exc:  # a field past the csv module's size limit, a stray quote at the end
        raise ValueError(f"{str(path)!r} line {reader.line_num + 1}: {exc}; for very long texts use JSONL") from None


def jsonl_records(lines: Iterable[str], source: str) -> Iterator[Record]:
    """Each JSON object of ``lines`` (blank lines skipped) with where it stands, ``source`` naming the file.

    >>> list(jsonl_records(['{"prompt": "Hi"}', ""], "prompts.jsonl"))
    [("'prompts.jsonl' line 1", {'prompt': 'Hi'})]
    """
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source!r} line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON: {exc}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where} is not a JSON object")
        yield where, record
