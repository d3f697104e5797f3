"""`new method NAME --family F [--plugin DIR]`: a documented, working method to start from.

The template is a complete method of the chosen family (a small, honest example: round-to-
nearest for quantization, per-row magnitude for pruning, truncated SVD for low-rank, ...) that
passes the method contract as generated, with every part explained where it is: the config,
``check``, ``apply``, what ``ctx`` holds, how calibration data is drawn, and what the report
(``storage`` above all) must contain. Written into the clone's ``methods/<family>/`` folder,
or, with ``--plugin DIR``, into a plugin package skeleton that declares its dependency on
SlimBench and registers the method through the ``slimbench.methods`` entry point.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from slimbench.devtools.templates import BODIES, FOOTER, HEADER, PLUGIN_README, PLUGIN_TEST, PYPROJECT
from slimbench.errors import SuiteError
from slimbench.method import DEFAULT_FOLLOWS, FAMILIES

NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
# Families with a template (rotation has none: its two methods are architecture surgery, not a pattern to copy)
TEMPLATE_FAMILIES = tuple(f for f in FAMILIES if f in DEFAULT_FOLLOWS and f != "baseline" and f in BODIES)
FOLDERS = {"precision": "", "baseline": ""}  # other families have a folder of their own name

def module_name(name: str) -> str:
    return name.replace("-", "_")


def class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("-"))


def method_source(name: str, family: str) -> str:
    """The template of method ``name`` of ``family``: one file, complete and documented."""
    body = BODIES[family]
    text = HEADER + body["code"] + FOOTER
    allowed = ", ".join(DEFAULT_FOLLOWS[family]) or "nothing (it must be used alone)"
    follows = textwrap.fill(f"a {family} method may follow {allowed}.", width=94, initial_indent="  ",
                            subsequent_indent="  ")
    for key, value in (
        ("__KWARGS__", body["kwargs"]),
        ("__SUMMARY__", body["summary"]),
        ("__FOLLOWS__", follows),
        ("__FAMILY__", family),
        ("__CLASS__", class_name(name)),
        ("__NAME__", name),
    ):
        text = text.replace(key, value)
    return text


def validate_request(name: str, family: str) -> None:
    from slimbench.registry import METHODS

    if not NAME.match(name):
        raise SuiteError(f"method name {name!r}: use lowercase letters, digits and single hyphens (e.g. my-pruner)",
                         source="new method")
    if family not in TEMPLATE_FAMILIES:
        raise SuiteError(f"family {family!r}: one of {', '.join(TEMPLATE_FAMILIES)}", source="new method")
    if name in METHODS:
        raise SuiteError(f"a method named {name!r} is already registered; choose another name", source="new method")


def clone_methods_dir() -> Path:
    """The clone's methods/ folder (an installed slimbench has none to write into)."""
    import slimbench

    folder = Path(slimbench.__file__).resolve().parent.parent / "methods"
    if not (folder / "__init__.py").is_file():
        raise SuiteError("this slimbench is installed, not a clone: there is no methods/ folder to write into; "
                         "use --plugin DIR to start a plugin package", source="new method")
    return folder


def write_new(path: Path, text: str, force: bool) -> Path:
    if path.exists() and not force:
        raise SuiteError(f"{path} exists; pass --force to overwrite it", source="new method")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_method(name: str, family: str, methods_dir: Path, force: bool = False) -> Path:
    """methods/<family>/<name>.py in a clone: the registry finds it by walking the folder."""
    validate_request(name, family)
    folder = methods_dir / FOLDERS.get(family, family)
    if folder != methods_dir and not (folder / "__init__.py").exists():
        write_new(folder / "__init__.py", "", force=False)
    return write_new(folder / f"{module_name(name)}.py", method_source(name, family), force)


def write_plugin(name: str, family: str, root: Path, force: bool = False) -> list[Path]:
    """A plugin package: pyproject (dependency on slimbench, entry point), the method, a test."""
    validate_request(name, family)
    package, module = f"slimbench_{module_name(name)}", module_name(name)

    def fill(text: str) -> str:
        for key, value in (("__PACKAGE__", package), ("__MODULE__", module), ("__FAMILY__", family),
                           ("__NAME__", name)):
            text = text.replace(key, value)
        return text

    return [
        write_new(root / "pyproject.toml", fill(PYPROJECT), force),
        write_new(root / "README.md", fill(PLUGIN_README), force),
        write_new(root / "src" / package / "__init__.py", f'"""SlimBench plugin: the {name} method."""\n', force),
        write_new(root / "src" / package / f"{module}.py", method_source(name, family), force),
        write_new(root / "tests" / "test_contract.py", fill(PLUGIN_TEST), force),
    ]
