"""Rows of a dataset, from a local file (offline) or the hub at a pinned revision (online).

Local formats, chosen by the file's suffix: ``.jsonl`` (one JSON object a line), ``.json``
(a list of objects, or one object a line), ``.parquet``, ``.csv``/``.tsv``, and ``.txt``/
``.raw`` (a text corpus: one row ``{"text": whole file}``). Every field a task reads is checked
when read: a missing field or a value of the wrong type fails with
``DataError("<file>: row <n>: field '<name>': ...")`` (rows counted from 1, as an editor shows
them), before any model work.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimbench.errors import SuiteError


class DataError(SuiteError):
    """A dataset file that does not have the expected shape."""


@dataclass(frozen=True)
class HubSource:
    """Where the online copy lives: ``load_dataset(dataset, config, split=split, revision=...)``."""

    dataset: str
    config: str | None
    split: str


def read_local(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix in (".txt", ".raw"):
        return [{"text": p.read_text(encoding="utf-8")}]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    if suffix in (".csv", ".tsv"):
        with p.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix in (".jsonl", ".json"):
        text = p.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{p}: not valid JSON: {err}") from None
        else:
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{p}: row {n}: not a JSON object ({err.msg})") from None
        for n, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise DataError(f"{p}: row {n}: expected a JSON object, got {type(row).__name__}")
        return rows
    raise DataError(f"{p}: unknown format {suffix!r}; use .jsonl, .json, .parquet, .csv, .tsv, .txt or .raw")


def read_hub(source: HubSource, revision: str) -> list[dict[str, Any]]:
    """Online: the hub copy at ``revision`` (a commit sha or tag). Needs network."""
    from datasets import load_dataset

    ds = load_dataset(source.dataset, source.config, split=source.split, revision=revision)
    return [dict(r) for r in ds]


def load_rows(path: str | None, source: HubSource, revision: str | None) -> tuple[list[dict[str, Any]], str]:
    """Rows and a label of where they came from (the file, or ``hub:dataset/config@revision``)."""
    if path:
        return read_local(path), str(Path(path).expanduser())
    if not revision:
        raise DataError(
            f"{source.dataset}: give `path` (a local file) or pin `revision` (a hub commit) to load it online"
        )
    return read_hub(source, revision), f"hub:{source.dataset}/{source.config or ''}@{revision}"


class Rows:
    """Typed access to a row's fields, failing with the file, row and field."""

    def __init__(self, where: str, rows: Iterable[dict[str, Any]]):
        self.where = where
        self.rows = list(rows)

    def __iter__(self):
        return iter(enumerate(self.rows, 1))

    def __len__(self) -> int:
        return len(self.rows)

    def error(self, n: int, field: str, what: str) -> DataError:
        return DataError(f"{self.where}: row {n}: field {field!r}: {what}")

    def get(self, n: int, row: dict, field: str, kind: type | tuple[type, ...]) -> Any:
        if field not in row:
            raise self.error(n, field, f"missing (row has: {', '.join(map(str, row)) or 'nothing'})")
        value = row[field]
        kinds = _tuple(kind)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # True is an int
            names = "/".join(k.__name__ for k in kinds)
            raise self.error(n, field, f"expected {names}, got {type(value).__name__} {value!r:.60}")
        return value

    def text(self, n: int, row: dict, field: str) -> str:
        return self.get(n, row, field, str)

    def texts(self, n: int, row: dict, field: str, count: int | None = None) -> list[str]:
        value = self.get(n, row, field, (list, tuple))
        if not value or not all(isinstance(v, str) for v in value):
            raise self.error(n, field, "expected a non-empty list of strings")
        if count is not None and len(value) != count:
            raise self.error(n, field, f"expected {count} strings, got {len(value)}")
        return list(value)

    def index(self, n: int, row: dict, field: str, choices: int, mapping: dict[str, int] | None = None) -> int:
        """A gold label: an int (or digit string, as some CSV/JSON exports hold) in range, or a mapped key."""
        value = self.get(n, row, field, (int, str, bool))
        if mapping is not None and str(value) in mapping:
            return mapping[str(value)]
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < choices:
            allowed = f"one of {sorted(mapping)}" if mapping else f"an integer in 0..{choices - 1}"
            raise self.error(n, field, f"expected {allowed}, got {value!r}")
        return value


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def data_root() -> Path | None:
    """``$SLIMBENCH_DATA``: a folder of local copies (``<corpus>/<split>.<ext>``) for the corpora."""
    root = os.environ.get("SLIMBENCH_DATA")
    return Path(root).expanduser() if root else None
