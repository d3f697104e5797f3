"""The layout: one import path per module, no import circles, no arrow from a lower stage up to
a higher one, and no file much past 500 lines (the conventions the README's Layout describes)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Stages from the bottom up: a module may import its own stage and the ones below, never above.
STAGES = [
    ("foundation", ["errors", "config", "registry", "specs"]),
    ("model interface", ["lm", "modeling"]),
    ("zoo", ["zoo"]),
    ("measurement", ["measure"]),
    ("method and task API", ["calibration", "method", "task", "layerwise"]),
    ("engines", ["engines"]),
    ("methods and tasks", ["methods", "tasks"]),
    ("sweep", ["sweep"]),
    ("reports", ["report"]),
    ("reproduction", ["reproduce"]),
    ("developer tools", ["devtools"]),
    ("command line", ["cli"]),
]
RANK = {top: i for i, (_, tops) in enumerate(STAGES) for top in tops}
MAX_LINES = 520  # "about 500": a file past it is usually two things


def source_files() -> dict[str, Path]:
    """Module name -> file, for the package and the two folders mounted into it."""
    out = {}
    for folder, prefix in (("slimbench", "slimbench"), ("methods", "slimbench.methods"), ("tasks", "slimbench.tasks")):
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = f.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((prefix, *parts))
            out[name.removesuffix(".__init__")] = f
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every slimbench module `name` imports, at module level or inside a function."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            subs = [f"{base}.{a.name}" for a in node.names]
            # `from pkg import sub` depends on the submodule; on the package only for its names
            targets = subs + ([base] if any(t not in known for t in subs) else [])
        for t in targets:
            while t and t not in known:  # `from a.b import c`: c is a module or a name in a.b
                t = t.rpartition(".")[0]
            if t and t != name and t != "slimbench":
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    files = source_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def stage_of(module: str) -> int | None:
    parts = module.split(".")
    return RANK.get(parts[1]) if len(parts) > 1 else None


def test_every_module_has_a_stage():
    assert not [m for m in graph() if m != "slimbench" and stage_of(m) is None]


def test_no_arrow_runs_up_a_stage():
    up = [f"{a} ({STAGES[stage_of(a)][0]}) -> {b} ({STAGES[stage_of(b)][0]})"
          for a, targets in graph().items() if a != "slimbench" for b in targets if stage_of(b) > stage_of(a)]
    assert not up, "\n".join(up)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert not cycles(graph())


def test_the_circle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_file_much_past_500_lines():
    files = [*source_files().values(), *(ROOT / "tests").glob("*.py")]
    long = {str(f.relative_to(ROOT)): n for f in files if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_top_level_reads_as_the_architecture():
    entries = sorted(p.name for p in (ROOT / "slimbench").iterdir() if not p.name.startswith(("_", ".")))
    assert len(entries) <= 18, entries
    stems = {Path(e).stem for e in entries}
    assert stems == set(RANK) - {"methods", "tasks"}, stems ^ (set(RANK) - {"methods", "tasks"})


@pytest.mark.parametrize("folder", ["methods", "tasks"])
def test_builtin_folders_have_one_import_path(folder):
    """From a clone, `methods.x` would be a second copy of `slimbench.methods.x`: refused."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import slimbench.{folder} as pkg\n"
            f"try:\n    import {folder}\nexcept ImportError as e:\n    print('refused', e)\n"
            f"else:\n    print('imported', {folder}.__file__)\n"
            "print(pkg.__name__, pkg.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.startswith("refused") and f"slimbench.{folder}" in out
    assert f"slimbench.{folder} {ROOT / folder / '__init__.py'}" in out


def test_a_patch_through_the_registry_reaches_the_registered_module(monkeypatch):
    """The registry runs the module that `slimbench.methods...` names: patching it changes the run."""
    import slimbench.methods.quantization.rtn as rtn

    from slimbench.registry import METHODS

    assert METHODS.get("rtn") is rtn.METHOD
    assert sys.modules["slimbench.methods.quantization.rtn"] is rtn
