"""Reading a suite file that may be hostile: size, encoding, nesting and alias expansion bounded.

A suite is a few kilobytes of YAML. Before anything else is done with a file it must be:

- at most ``MAX_BYTES`` (1 MiB) long: a 50 MB list is refused by its size, never read;
- UTF-8 (a UTF-8 byte-order mark is allowed): a UTF-16/UTF-32 file or a Latin-1 byte is
  named with its line and column, with the fix (re-save as UTF-8);
- nested at most ``MAX_DEPTH`` (32) lists/mappings deep;
- at most ``MAX_VALUES`` (100,000) values once every ``*alias`` is expanded: a "billion laughs"
  alias bomb is refused while it is read, before it can fill the memory;
- free of recursive aliases (an ``&anchor`` used inside itself).

The check walks PyYAML's event stream (no recursion, no objects built), so it stops at the first
value past a limit in bounded memory and time; only a file that passes is loaded. Values quoted
in messages are cut to ``brief``'s length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from slimbench.errors import SuiteError, brief

MAX_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_VALUES = 100_000

_BOMS = (  # longest first: the UTF-32 little-endian mark starts with UTF-16's
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)


def decode(data: bytes, source: str) -> str:
    """The file's text; anything but UTF-8 is refused with where it went wrong and what to do."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise SuiteError(
                f"the file is {name}-encoded (it starts with a {name} byte-order mark); suite files are read as "
                "UTF-8: re-save it as UTF-8",
                source=source,
            )
    if b"\x00" in data:
        at = data.index(b"\x00")
        raise SuiteError(
            f"the file holds a NUL byte at offset {at}: it looks like UTF-16 or UTF-32 without a byte-order mark; "
            "suite files are read as UTF-8: re-save it as UTF-8",
            source=source,
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise SuiteError(
            f"line {line}, column {column}: byte 0x{data[err.start]:02x} is not UTF-8 (a Latin-1 or Windows-1252 "
            "file?); suite files are read as UTF-8: re-save it as UTF-8",
            source=source,
        ) from None


def where(event: yaml.Event) -> str:
    mark = event.start_mark
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"


def check_events(text: str, source: str) -> None:
    """Walk the YAML events: nesting depth, values after alias expansion, recursive aliases."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    sizes: dict[str, int] = {}  # anchor -> values it stands for, once complete
    stack: list[list[Any]] = [[None, 0]]  # open collections: [anchor, values so far]
    total = 0

    def add(n: int, event: yaml.Event) -> None:
        nonlocal total
        stack[-1][1] += n
        total += n
        if total > MAX_VALUES:
            raise SuiteError(
                f"{where(event)}: the document expands to more than {MAX_VALUES:,} values (with its *aliases "
                'expanded); a suite needs a few hundred. An alias bomb ("billion laughs")? Refused before '
                "loading it",
                source=source,
            )

    try:
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.ScalarEvent):
                if event.anchor:
                    sizes[event.anchor] = 1
                add(1, event)
            elif isinstance(event, yaml.AliasEvent):
                if event.anchor not in sizes:
                    inside = event.anchor in {a for a, _ in stack}
                    why = "is used inside itself (a recursive alias)" if inside else "is undefined"
                    raise SuiteError(f"{where(event)}: alias *{brief(event.anchor, 60)} {why}", source=source)
                add(sizes[event.anchor], event)
            elif isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
                if len(stack) > MAX_DEPTH:
                    raise SuiteError(
                        f"{where(event)}: lists and mappings nested more than {MAX_DEPTH} deep; a suite needs a "
                        "handful of levels",
                        source=source,
                    )
                stack.append([event.anchor, 0])
            elif isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
                anchor, n = stack.pop()
                if anchor:
                    sizes[anchor] = n + 1
                add(1, event)
    except yaml.YAMLError as err:
        if "nesting depth" in str(err):  # libyaml's own limit (1,000) read ahead of ours
            raise SuiteError(
                f"lists and mappings nested more than {MAX_DEPTH} deep; a suite needs a handful of levels",
                source=source,
            ) from None
        raise SuiteError(f"malformed YAML: {brief_text(str(err))}", source=source) from None


def brief_text(text: str, limit: int = 600) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_text(text: str, source: str) -> Any:
    """Parse YAML text that passed the limits (size is the caller's: a file, a --set value)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise SuiteError(f"{len(text):,} characters, more than the {MAX_BYTES:,} bytes a suite may hold", source=source)
    check_events(text, source)
    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as err:
        raise SuiteError(f"malformed YAML: {brief_text(str(err))}", source=source) from None


def load_file(path: Path) -> Any:
    """A YAML file read within the limits above; raises SuiteError naming the file."""
    source = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise SuiteError(
                f"{size:,} bytes; a suite file may hold at most {MAX_BYTES:,} bytes (1 MiB): refused unread",
                source=source,
            )
        data = path.read_bytes()
    except OSError as err:
        raise SuiteError(f"cannot read the file: {err.strerror or err}", source=source) from None
    if len(data) > MAX_BYTES:  # grew between stat and read
        raise SuiteError(f"more than {MAX_BYTES:,} bytes; refused", source=source)
    return load_text(decode(data, source), source)
