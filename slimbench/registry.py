"""One registry mechanism for methods, tasks, models and corpora.

Entries are declared as data: a method file defines a module-level ``METHOD`` (a task file
``TASK``, the model zoo ``MODELS``), and the registry collects them by walking its packages
when first asked. Nothing depends on which module happened to be imported first, a
duplicate name is an error, and an unknown name is answered with the closest known names.
Plugins outside the repo register through the entry-point group ``slimbench.<kind>``
(``module:object`` pointing at one entry or a list of entries). A plugin that fails to
import, or declares a name already taken, is skipped and reported (``problems``): commands
that do not need it keep working, and a lookup of its name says what is wrong with it.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from slimbench.errors import UnknownNameError

T = TypeVar("T")


@dataclass(frozen=True)
class PluginProblem:
    """A plugin entry point that could not be used: it is skipped, and every command says why."""

    group: str  # "slimbench.methods"
    entry_point: str  # "name = module:object"
    dist: str  # "distribution==version" (or "unknown distribution")
    message: str
    names: tuple[str, ...]  # names it would have provided, so a lookup of one explains itself

    def __str__(self) -> str:
        return f"plugin {self.dist}, entry point `{self.entry_point}` in group {self.group}: {self.message}"


class Registry(Generic[T]):
    def __init__(
        self, kind: str, attr: str, packages: tuple[str, ...], plural: str | None = None, entry_type: str | None = None
    ):
        self.kind = kind  # "method", "task", ...
        self.group = f"slimbench.{plural or kind + 's'}"  # entry-point group for plugins
        self.attr = attr  # module attribute that declares entries, e.g. "METHOD"
        self.packages = packages
        self.entry_type = entry_type  # "module:Class" every entry must be an instance of
        self._entries: dict[str, T] | None = None
        self._origins: dict[str, str] = {}
        self._providers: dict[str, str] = {}  # name -> "distribution==version" for plugins
        self.problems: list[PluginProblem] = []

    # -- discovery -------------------------------------------------------------------
    def _discover(self) -> dict[str, T]:
        self._entries = {}
        self.problems = []
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
        self._discover_plugins()
        return self._entries

    def _discover_plugins(self) -> None:
        """Entry points of installed plugins. A plugin that fails to import, declares something
        that is not an entry, or reuses a taken name is skipped and reported (``problems``), so
        one broken plugin does not stop commands that do not need it."""
        builtin = set(self._entries)
        claimed: dict[str, list[tuple[Any, str, str, str]]] = {}  # name -> [(entry, origin, dist, where)]
        for ep in entry_points(group=self.group):
            dist = f"{ep.dist.name}=={ep.dist.version}" if ep.dist is not None else "(unknown distribution)"
            where = f"{ep.name} = {ep.value}"
            try:
                declared = ep.load()
                entries = list(declared) if isinstance(declared, list | tuple) else [declared]
                for entry in entries:
                    self._check_type(entry)
            except Exception as exc:  # a broken plugin must not break every command
                msg = f"failed to load: {type(exc).__name__}: {exc}"
                self.problems.append(PluginProblem(self.group, where, dist, msg, (ep.name,)))
                continue
            for entry in entries:
                claimed.setdefault(entry.name, []).append((entry, f"plugin {ep.value}", dist, where))
        for name, claims in claimed.items():
            if name in builtin:
                for _, _, dist, where in claims:
                    msg = f"declares {self.kind} {name!r}, which is built in; the plugin's entry is ignored"
                    self.problems.append(PluginProblem(self.group, where, dist, msg, ()))
            elif len(claims) > 1:
                others = ", ".join(f"{d} (`{w}`)" for _, _, d, w in claims)
                msg = f"{self.kind} {name!r} is declared by several plugins: {others}; uninstall all but one"
                self.problems.append(PluginProblem(self.group, claims[0][3], claims[0][2], msg, (name,)))
            else:
                entry, origin, dist, _ = claims[0]
                self.register(entry, origin=origin)
                self._providers[name] = dist

    def _check_type(self, entry: Any) -> None:
        if self.entry_type is not None:
            module, cls_name = self.entry_type.split(":")
            cls = getattr(importlib.import_module(module), cls_name)
            if not isinstance(entry, cls):
                raise TypeError(f"it declares {type(entry).__name__} {entry!r:.60}, not a {cls_name}")
        if not isinstance(getattr(entry, "name", None), str):
            raise TypeError(f"it declares {type(entry).__name__}, which has no `name`")

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
        for problem in self.problems:  # the plugin that would have provided it is broken
            if name in problem.names:
                return f"{self.kind} {name!r} is unavailable: {problem}"
        close = difflib.get_close_matches(str(name), self.names(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        broken = f" (plugin problems: {'; '.join(map(str, self.problems))})" if self.problems else ""
        return f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}{broken}"


# The four registries. Packages are walked lazily, on first lookup.
METHODS: Registry = Registry("method", "METHOD", ("slimbench.methods",), entry_type="slimbench.method:Method")
TASKS: Registry = Registry("task", "TASK", ("slimbench.tasks",), entry_type="slimbench.task:Task")
MODELS: Registry = Registry("model", "MODELS", ("slimbench.zoo.models",), entry_type="slimbench.zoo.models:ModelEntry")
CORPORA: Registry = Registry("corpus", "CORPUS", ("slimbench.zoo.corpora", "slimbench.zoo.datasets"), plural="corpora")
REGISTRIES = (METHODS, TASKS, MODELS, CORPORA)


def plugin_problems() -> list[PluginProblem]:
    """Problems of every registry discovered so far in this process (for the CLI to show)."""
    return [p for reg in REGISTRIES if reg._entries is not None for p in reg.problems]
