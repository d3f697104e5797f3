"""The installable distribution, tried as an outside user and a plugin author would, in a
throw-away virtual environment (torch and friends come from this environment through a .pth
file; nothing is downloaded): `pip install .` and `pip install -e .`, the `slimbench` console
script, no generic top-level names in site-packages, the built-in suites by name, and a plugin
package that depends on slimbench, registers through its entry point and runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIST_FILES = ("slimbench", "methods", "tasks", "configs", "setup.py", "pyproject.toml", "README.md")
SUITE = """models: [tiny-llama]
methods: [{name: ext-prune, sparsity: 0.5}]
tasks: [{name: perplexity, seqlen: 32, max_windows: 2}]
hardware: {threads: 1}
"""

pytestmark = pytest.mark.slow


def source_copy(dest: Path) -> Path:
    """The files a distribution is built from (a clone without .git, .venv, results)."""
    dest.mkdir()
    for name in DIST_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(src, dest / name)
    return dest


def venv(path: Path) -> Path:
    """A fresh environment that sees this one's packages (torch, transformers, pip, setuptools)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(path), "platbase": str(path)}))
    (site / "shared.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return site


def run(env: Path, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    environ.update(HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    exe = env / "bin" / args[0]
    proc = subprocess.run([str(exe), *args[1:]], cwd=cwd, env=environ, capture_output=True, text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"{args} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def pip_install(env: Path, *args: str, cwd: Path) -> None:
    run(env, "python", "-m", "pip", "install", "-q", "--no-build-isolation", *args, cwd=cwd)


def test_pip_install_console_script_builtin_suites_and_a_plugin(tmp_path):
    src = source_copy(tmp_path / "src")
    env, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    site = venv(env)
    pip_install(env, "--no-deps", str(src), cwd=work)

    # no generic top-level names; the methods, tasks and suites live inside slimbench
    top = {p.name for p in site.iterdir()}
    assert not top & {"methods", "tasks", "configs"}, top
    assert (site / "slimbench" / "methods" / "quantization" / "rtn.py").exists()
    assert (site / "slimbench" / "configs" / "quickstart.yaml").exists()
    assert run(env, "python", "-c", "import methods", cwd=work, check=False).returncode != 0

    out = run(env, "slimbench", "validate", "quickstart", cwd=work).stdout
    assert "slimbench/configs/quickstart.yaml: valid" in out

    # a plugin package: written by `new`, depending on slimbench, registered by its entry point
    plugin = tmp_path / "plugin"
    run(env, "slimbench", "new", "method", "ext-prune", "--family", "pruning", "--plugin", str(plugin), cwd=work)
    pip_install(env, str(plugin), cwd=work)  # resolves its `slimbench` dependency: installed above
    requires = run(env, "python", "-c", "import importlib.metadata as m; print(m.requires('slimbench-ext-prune'))",
                   cwd=work).stdout
    assert "slimbench" in requires
    # the console script is benchmark.py: the clone's listing (rendered in this process, as
    # `benchmark.py list methods` prints it), with the plugin's method beside the built-ins
    blocks = run(env, "slimbench", "list", "methods", cwd=work).stdout.strip().split("\n\n")
    plugin_blocks = [b for b in blocks if b.startswith("ext-prune  [pruning]")]
    assert len(plugin_blocks) == 1 and "from slimbench-ext-prune==0.1.0" in plugin_blocks[0]
    from slimbench.cli.list import render

    assert [b for b in blocks if b not in plugin_blocks] == render("methods").split("\n\n")
    assert "contract passed" in run(env, "slimbench", "check-method", "ext-prune", "--arch", "llama", cwd=work).stdout
    (work / "suite.yaml").write_text(SUITE)
    run(env, "slimbench", "run", "suite.yaml", "--results", "results", "--no-progress", cwd=work)
    (rec,) = [json.loads(p.read_text()) for p in (work / "results" / "runs").glob("*.json")]
    assert rec["status"] == "ok" and rec["method"]["steps"][0]["provider"] == "slimbench-ext-prune==0.1.0"
    assert (work / "results" / "report" / "leaderboard.md").exists()


def test_editable_install_maps_the_clone(tmp_path):
    src = source_copy(tmp_path / "src")
    env, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    site = venv(env)
    pip_install(env, "--no-deps", "-e", str(src), cwd=work)
    assert not {p.name for p in site.iterdir()} & {"methods", "tasks", "configs"}
    where = run(env, "python", "-c", "import slimbench.methods as m, slimbench.tasks as t; print(m.__file__); "
                "print(t.__path__[0])", cwd=work).stdout.split()
    assert where == [str(src / "methods" / "__init__.py"), str(src / "tasks")]
    assert run(env, "python", "-c", "import methods", cwd=work, check=False).returncode != 0
    out = run(env, "slimbench", "validate", "tiny", cwd=work).stdout
    assert f"{src / 'configs' / 'tiny.yaml'}: valid" in out
