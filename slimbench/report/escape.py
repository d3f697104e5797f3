"""Escaping for every output format: names and parameters come from suites, plugins and records.

Nothing that a user, a plugin or a results folder controls may become markup, a formula or a
LaTeX command in a report. Each writer passes every such string through one of these.
"""

from __future__ import annotations

import html
import re

# Characters that start Markdown syntax (emphasis, links and images, headings, tables, code).
# (`-`, `+`, `.` and parentheses matter only at the start of a line or after `]`, never in a cell.)
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]#!|~])")


def html_text(s: object) -> str:
    """Text (or an attribute value) for HTML: &, <, >, " and ' as entities."""
    return html.escape(str(s), quote=True)


def md_text(s: object) -> str:
    """Text for Markdown rendered as HTML (GitHub, most viewers): neither markup nor Markdown syntax.

    HTML is escaped first, then every Markdown special character is backslash-escaped, so a
    model folder named ``![x](http://host/y.png)`` stays text instead of a remote image. Line
    breaks become spaces (a table row is one line).
    """
    flat = " ".join(str(s).split())
    return _MD_SPECIAL.sub(r"\\\1", html.escape(flat, quote=True))


# A spreadsheet runs a cell starting with one of these as a formula (tab and CR too: some
# spreadsheets strip them and look at what follows).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(v: object) -> object:
    """A CSV cell a spreadsheet will not execute: text starting like a formula gets a leading '."""
    if isinstance(v, str) and v.startswith(_FORMULA_START):
        return "'" + v
    return v


_LATEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
}


def latex_text(s: object) -> str:
    """Text for LaTeX: every special character as a literal, no command can be formed."""
    return "".join(_LATEX.get(c, c) for c in " ".join(str(s).split()))
