"""Errors the harness raises at its boundaries."""

from __future__ import annotations


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
