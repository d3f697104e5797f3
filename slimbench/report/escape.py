"""Escaping for every output format: names and parameters come from suites, plugins and records.

Nothing that a user, a plugin or a results folder controls may become markup, a formula or a
LaTeX command in a report. Each writer passes every such string through one of these.

Nor may one name pose as another: invisible characters (Unicode format characters such as bidi
overrides U+202E and isolates, zero-width spaces and joiners, the byte-order mark; and control
characters) are shown as ``<U+202E>`` in every format (``reveal``), so ``rtn\u202e`` and ``rtn``
read differently; HTML also isolates each name (``<bdi>``) so right-to-left text in one cell
cannot reorder its neighbours.
"""

from __future__ import annotations

import html
import re
import unicodedata


def invisible(c: str) -> bool:
    """A character that changes how text is shown without being seen (tab and newline excepted)."""
    return c not in "\t\n" and unicodedata.category(c) in ("Cf", "Cc", "Zl", "Zp")


def reveal(s: object) -> str:
    """``s`` with every invisible character written out as ``<U+XXXX>``."""
    text = str(s)
    if text.isascii() and text.isprintable():
        return text
    return "".join(f"<U+{ord(c):04X}>" if invisible(c) else c for c in text)


def html_name(s: object) -> str:
    """A name for HTML: revealed, escaped, isolated; each revealed character marked and named on hover."""
    text = str(s)
    out = []
    for c in text:
        if invisible(c):
            name = unicodedata.name(c, "control character")
            out.append(f'<span class="ctl" title="{html.escape(name)}">U+{ord(c):04X}</span>')
        else:
            out.append(html.escape(c, quote=True))
    return "<bdi>" + "".join(out) + "</bdi>"

# Characters that start Markdown syntax (emphasis, links and images, headings, tables, code).
# (`-`, `+`, `.` and parentheses matter only at the start of a line or after `]`, never in a cell.)
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]#!|~])")


def html_text(s: object) -> str:
    """Text (or an attribute value) for HTML: &, <, >, " and ' as entities; invisible characters revealed."""
    return html.escape(reveal(s), quote=True)


def md_text(s: object) -> str:
    """Text for Markdown rendered as HTML (GitHub, most viewers): neither markup nor Markdown syntax.

    HTML is escaped first, then every Markdown special character is backslash-escaped, so a
    model folder named ``![x](http://host/y.png)`` stays text instead of a remote image. Line
    breaks become spaces (a table row is one line).
    """
    flat = " ".join(reveal(s).split())
    return _MD_SPECIAL.sub(r"\\\1", html.escape(flat, quote=True))


# A spreadsheet runs a cell starting with one of these as a formula (tab and CR too: some
# spreadsheets strip them and look at what follows).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(v: object) -> object:
    """A CSV cell a spreadsheet will not execute (text starting like a formula gets a leading '),
    invisible characters revealed."""
    if isinstance(v, str):
        shown = reveal(v)
        return "'" + shown if v.startswith(_FORMULA_START) else shown
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
    return "".join(_LATEX.get(c, c) for c in " ".join(reveal(s).split()))
