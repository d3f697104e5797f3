"""One registry mechanism for methods, tasks, models and corpora.

Entries are declared as data: a method file defines a module-level ``METHOD`` (a task file
``TASK``, the model zoo ``MODELS``), and the registry collects them by walking its packages
when first asked. Nothing depends on which module happened to be imported first, a
duplicate name is an error, and an unknown name is answered with the closest known names.
Plugins outside the repo register through the entry-point group ``slimbench.<kind>``
(``module:object`` pointing at one entry or a list of entries).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from slimbench.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, attr: str, packages: tuple[str, ...], plural: str | None = None):
        self.kind = kind  # "method", "task", ...
        self.group = f"slimbench.{plural or kind + 's'}"  # entry-point group for plugins
        self.attr = attr  # module attribute that declares entries, e.g. "METHOD"
        self.packages = packages
        self._entries: dict[str, T] | None = None
        self._origins: dict[str, str] = {}
        self._providers: dict[str, str] = {}  # name -> "distribution==version" for plugins

    # -- discovery -------------------------------------------------------------------
    def _discover(self) -> dict[str, T]:
        self._entries = {}
        for pkg_name in self.packages:
            pkg = importlib.import_module(pkg_name)
            modules = [pkg_name]
            if hasattr(pkg, "__path__"):
                modules += [
                    m.name
                    for m in pkgutil.walk_packages(pkg.__path__, prefix=pkg_name + ".")
                    if not m.name.rsplit(".", 1)[-1].startswith("_")
                ]
            for mod_name in sorted(modules):
                mod = importlib.import_module(mod_name)
                self._add_declared(getattr(mod, self.attr, None), mod_name)
        for ep in entry_points(group=self.group):
            before = set(self._entries)
            self._add_declared(ep.load(), f"plugin {ep.value}")
            dist = f"{ep.dist.name}=={ep.dist.version}" if ep.dist is not None else f"plugin {ep.value}"
            self._providers.update({n: dist for n in set(self._entries) - before})
        return self._entries

    def _add_declared(self, declared: Any, origin: str) -> None:
        if declared is None:
            return
        for entry in declared if isinstance(declared, list | tuple) else [declared]:
            self.register(entry, origin=origin)

    def register(self, entry: T, origin: str = "runtime") -> T:
        """Add an entry; a second entry under the same name is an error."""
        entries = self._entries if self._entries is not None else self._discover()
        name = entry.name  # type: ignore[attr-defined]
        if name in entries:
            raise ValueError(f"duplicate {self.kind} name {name!r}: declared in {self._origins[name]} and {origin}")
        entries[name] = entry
        self._origins[name] = origin
        return entry

    def provider(self, name: str) -> str | None:
        """The plugin distribution (``name==version``) that declared ``name``; None if built in."""
        self.entries  # noqa: B018 - discover first
        return self._providers.get(name)

    # -- lookup ------------------------------------------------------------------------
    @property
    def entries(self) -> dict[str, T]:
        return self._entries if self._entries is not None else self._discover()

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[T]:
        return iter(self.entries[n] for n in self.names())

    def get(self, name: str, *, source: str | None = None, field: str | None = None) -> T:
        try:
            return self.entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name), source=source, field=field) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), self.names(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}"


# The four registries. Packages are walked lazily, on first lookup.
METHODS: Registry = Registry("method", "METHOD", ("slimbench.methods",))
TASKS: Registry = Registry("task", "TASK", ("slimbench.tasks",))
MODELS: Registry = Registry("model", "MODELS", ("slimbench.models",))
CORPORA: Registry = Registry("corpus", "CORPUS", ("slimbench.corpora", "slimbench.datasets"), plural="corpora")
