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
    """Where the online copy lives: ``load_dataset(dataset, config, split=split, revision=...)``, or
    with ``data_files`` (one file of the repository, loaded without a config name) instead of a config."""

    dataset: str
    config: str | None
    split: str
    data_files: str | None = None

    def label(self, revision: str) -> str:
        return f"hub:{self.dataset}/{self.config or self.data_files or ''}@{revision}"


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


def read_hub(source: HubSource, revision: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Online: the hub copy at ``revision`` (a commit sha or tag), its first ``limit`` rows if given.

    Needs network (``HF_HUB_OFFLINE=0``). Any failure (no such revision, config, split or file,
    the hub unreachable) is one DataError naming the data set, what was asked and why.
    """
    from datasets import load_dataset

    kwargs = {"data_files": {source.split: source.data_files}} if source.data_files else {"name": source.config}
    try:
        ds = load_dataset(source.dataset, split=source.split, revision=revision, **kwargs)
    except Exception as err:  # datasets raises many types; the user needs the one line that says what failed
        raise DataError(hub_failure(source, revision, err)) from err
    if limit is not None and len(ds) > limit:
        ds = ds.select(range(limit))  # before materializing: C4's train shard has 356k rows
    return [dict(r) for r in ds]


def hub_failure(source: HubSource, revision: str, err: BaseException) -> str:
    """``load_dataset``'s failure as one line: the data set, config/file, split, revision, and the cause."""
    what = f"config {source.config!r}" if source.config else f"file {source.data_files!r}"
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    causes = {"OfflineModeIsEnabled": "the hub is offline (HF_HUB_OFFLINE=1) and this is not in the local cache",
              "RevisionNotFoundError": f"revision {revision} does not exist",
              "DatasetNotFoundError": "no such data set on the hub (or it is private or gated)",
              "ConnectionError": "the hub could not be reached"}
    cause = next((c for name, c in causes.items() if any(type(e).__name__ == name for e in _chain(err))), None)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return (f"{source.dataset} ({what}, split {source.split!r}) at revision {revision} from {endpoint}: "
            f"{cause + ' (' + text + ')' if cause else text}")


def _chain(err: BaseException | None):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def load_rows(path: str | None, source: HubSource, revision: str | None) -> tuple[list[dict[str, Any]], str]:
    """Rows and a label of where they came from (the file, or ``hub:dataset/config@revision``)."""
    if path:
        return read_local(path), str(Path(path).expanduser())
    if not revision:
        raise DataError(
            f"{source.dataset}: give `path` (a local file) or pin `revision` (a hub commit) to load it online"
        )
    return read_hub(source, revision), source.label(revision)


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
