"""`new method`: the template of every family is a working method that passes the contract as
generated, in methods/ or as a plugin package that registers through its entry point."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest

import benchmark
from slimbench.devtools import scaffold
from slimbench.devtools.contract import check_method
from slimbench.registry import METHODS


def import_file(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # as a package import would: pydantic resolves annotations through it
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("family", scaffold.TEMPLATE_FAMILIES)
def test_the_template_of_every_family_passes_the_contract(family, tmp_path, monkeypatch):
    methods = tmp_path / "methods"
    methods.mkdir()
    (methods / "__init__.py").write_text("")
    monkeypatch.setattr(scaffold, "clone_methods_dir", lambda: methods)
    assert benchmark.main(["new", "method", f"my-{family}", "--family", family]) == 0
    (path,) = [p for p in methods.rglob("my_*.py")]
    text = path.read_text()
    for must in ("storage", "ctx.hardware", "sample_calibration", "family", "check-method", "version"):
        assert must in text, must  # the template explains each
    mod = import_file(path, f"_scaffold_{family}")
    assert mod.METHOD.name == f"my-{family}" and mod.METHOD.family == family
    outcomes = check_method(mod.METHOD, archs=("llama", "gpt2"))
    assert [o.status for o in outcomes] == ["pass"] * len(outcomes), [str(o) for o in outcomes]


def test_new_refuses_bad_names_taken_names_and_existing_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(scaffold, "clone_methods_dir", lambda: tmp_path)
    assert benchmark.main(["new", "method", "My_Method", "--family", "pruning"]) == 2
    assert benchmark.main(["new", "method", "rtn", "--family", "quantization"]) == 2
    assert benchmark.main(["new", "method", "fresh", "--family", "pruning"]) == 0
    assert benchmark.main(["new", "method", "fresh", "--family", "pruning"]) == 2
    err = capsys.readouterr().err
    assert "lowercase letters" in err and "already registered" in err and "exists; pass --force" in err


def test_the_plugin_skeleton_declares_slimbench_and_registers_its_method(tmp_path, monkeypatch, capsys):
    root = tmp_path / "plugin"
    assert benchmark.main(["new", "method", "ext-prune", "--family", "pruning", "--plugin", str(root)]) == 0
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    assert any(d.startswith("slimbench") for d in meta["project"]["dependencies"])
    target = meta["project"]["entry-points"]["slimbench.methods"]["ext-prune"]
    assert target == "slimbench_ext_prune.ext_prune:METHOD"
    assert (root / "tests" / "test_contract.py").exists()

    # what `pip install` leaves: the package on sys.path and a dist-info with the entry point
    monkeypatch.syspath_prepend(str(root / "src"))
    info = root / "src" / "slimbench_ext_prune-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: slimbench-ext-prune\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[slimbench.methods]\next-prune = {target}\n")
    for attr in ("_entries", "_origins", "_providers", "problems"):
        monkeypatch.setattr(METHODS, attr, getattr(METHODS, attr))
    monkeypatch.setattr(METHODS, "_entries", None)
    monkeypatch.setattr(METHODS, "_origins", {})
    monkeypatch.setattr(METHODS, "_providers", {})
    capsys.readouterr()
    assert benchmark.main(["list", "methods"]) == 0
    assert "ext-prune  [pruning]" in capsys.readouterr().out
    assert METHODS.provider("ext-prune") == "slimbench-ext-prune==0.1.0"
    assert benchmark.main(["check-method", "ext-prune", "--arch", "opt"]) == 0
    assert "ext-prune: contract passed" in capsys.readouterr().out


def test_the_readme_method_example_runs_and_passes_the_contract(tmp_path):
    text = (Path(benchmark.__file__).parent / "README.md").read_text()
    section = text[text.index("### Adding a method or a task"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[: code.index("```")]
    path = tmp_path / "readme_method.py"
    path.write_text(code)
    mod = import_file(path, "_readme_method")  # the example's imports are complete
    outcomes = check_method(mod.METHOD, archs=("llama",))
    assert [o.status for o in outcomes] == ["pass"] * len(outcomes), [str(o) for o in outcomes]
