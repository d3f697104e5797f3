"""Errors the harness raises at its boundaries."""

from __future__ import annotations

import reprlib
from typing import Any

_brief = reprlib.Repr()
_brief.maxstring = 60
_brief.maxother = 60
_brief.maxlist = _brief.maxtuple = _brief.maxdict = _brief.maxset = 6
_brief.maxlevel = 3


def brief(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut short for a message (lists to their first items, strings to 60 characters)."""
    text = _brief.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class SuiteError(ValueError):
    """Bad user input, found before any cell starts.

    The message names the file, the field and what is allowed; the CLI prints it and
    exits without writing anything.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.source = source
        self.field = field
        where = ": ".join(p for p in (source, field) if p)
        super().__init__(f"{where}: {message}" if where else message)


class UnknownNameError(SuiteError):
    """A method, task, model or corpus name that is not registered."""
