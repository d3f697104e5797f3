"""Plugins through the `slimbench.methods` entry point: a good one is listed and runs; a broken
or duplicate one is one clear warning naming it, and commands that do not need it work."""

from __future__ import annotations

import json
import textwrap

import pytest

import benchmark
from slimbench.registry import METHODS

GOOD = """
from pydantic import Field
from slimbench.config import Config
from slimbench.method import Method, MethodReport
from slimbench.methods.pruning.sparse_format import sparse_storage
from slimbench.modeling import get_weight, iter_linears, set_weight


class HalfConfig(Config):
    sparsity: float = Field(0.5, gt=0, lt=1)


def apply(lm, cfg, ctx):
    names = []
    for name, mod in iter_linears(lm.model):
        w = get_weight(mod)
        k = int(cfg.sparsity * w.shape[1])
        set_weight(mod, w.scatter(1, w.abs().topk(k, dim=1, largest=False).indices, 0.0))
        names.append(name)
    return MethodReport("simulated", storage=sparse_storage(lm.model, names, None))


METHOD = Method("outside-prune", "pruning", "row magnitude, from a plugin", HalfConfig, apply)
"""

SUITE = "models: [tiny-llama]\nmethods: [{methods}]\ntasks: [{{name: perplexity, seqlen: 32, max_windows: 2}}]\n" \
        "hardware: {{threads: 1}}\n"


def install(root, dist: str, module: str, source: str, entry: str) -> None:
    """What `pip install` leaves behind: the module and a dist-info with the entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\nRequires-Dist: slimbench\n")
    (info / "entry_points.txt").write_text(f"[slimbench.methods]\n{entry}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A site folder on sys.path, and a method registry discovered afresh (restored afterwards)."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    for attr in ("_entries", "_origins", "_providers", "problems"):
        monkeypatch.setattr(METHODS, attr, getattr(METHODS, attr))
    monkeypatch.setattr(METHODS, "_entries", None)
    monkeypatch.setattr(METHODS, "_origins", {})
    monkeypatch.setattr(METHODS, "_providers", {})
    return root


def suite(tmp_path, methods: str):
    p = tmp_path / "suite.yaml"
    p.write_text(SUITE.format(methods=methods))
    return p


def test_a_plugin_is_listed_and_runs(site, tmp_path, capsys):
    install(site, "slim-prune", "slim_prune", GOOD, "outside-prune = slim_prune:METHOD")
    assert benchmark.main(["list", "methods"]) == 0
    assert "outside-prune  [pruning]  row magnitude, from a plugin" in capsys.readouterr().out
    assert METHODS.provider("outside-prune") == "slim-prune==0.1"
    results = tmp_path / "results"
    code = benchmark.main(["run", str(suite(tmp_path, "outside-prune")), "--results", str(results), "--no-report",
                           "--no-progress"])
    assert code == 0
    (rec,) = [json.loads(p.read_text()) for p in (results / "runs").glob("*.json")]
    assert rec["status"] == "ok" and rec["method"]["steps"][0]["provider"] == "slim-prune==0.1"
    assert rec["method_report"]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_a_broken_plugin_does_not_stop_unrelated_commands(site, tmp_path, capsys):
    install(site, "broken-plugin", "broken_mod", "import no_such_module_here\n", "broken = broken_mod:METHOD")
    assert benchmark.main(["validate", str(suite(tmp_path, "magnitude"))]) == 0
    out = capsys.readouterr()
    assert "valid, 1 cells" in out.out
    (warning,) = [line for line in out.err.splitlines() if line.startswith("warning:")]
    assert "plugin broken-plugin==0.1, entry point `broken = broken_mod:METHOD` in group slimbench.methods" in warning
    assert "failed to load: ModuleNotFoundError" in warning and "no_such_module_here" in warning
    assert benchmark.main(["list", "methods"]) == 0 and "rtn  [quantization]" in capsys.readouterr().out


def test_a_suite_that_needs_the_broken_plugin_names_it(site, tmp_path, capsys):
    install(site, "broken-plugin", "broken_mod", "raise RuntimeError('half-written plugin')\n",
            "broken = broken_mod:METHOD")
    assert benchmark.main(["validate", str(suite(tmp_path, "broken"))]) == 2
    err = capsys.readouterr().err
    assert "method 'broken' is unavailable: plugin broken-plugin==0.1, entry point `broken = broken_mod:METHOD`" in err
    assert "RuntimeError: half-written plugin" in err
    assert "Traceback" not in err


def test_a_plugin_reusing_a_built_in_name_is_ignored_with_a_warning(site, tmp_path, capsys):
    install(site, "shadow", "shadow_mod", GOOD.replace('"outside-prune"', '"rtn"'), "rtn = shadow_mod:METHOD")
    assert benchmark.main(["validate", str(suite(tmp_path, "rtn"))]) == 0
    assert "declares method 'rtn', which is built in; the plugin's entry is ignored" in capsys.readouterr().err
    assert METHODS.provider("rtn") is None and METHODS.get("rtn").family == "quantization"


def test_two_plugins_declaring_one_name_are_both_refused(site, tmp_path, capsys):
    install(site, "first", "first_mod", GOOD, "outside-prune = first_mod:METHOD")
    install(site, "second", "second_mod", GOOD, "outside-prune = second_mod:METHOD")
    assert benchmark.main(["validate", str(suite(tmp_path, "magnitude"))]) == 0
    assert benchmark.main(["validate", str(suite(tmp_path, "outside-prune"))]) == 2
    err = capsys.readouterr().err
    assert "is declared by several plugins: first==0.1" in err and "second==0.1" in err


def test_a_plugin_that_declares_something_else_is_reported(site, tmp_path, capsys):
    install(site, "odd", "odd_mod", "METHOD = {'name': 'odd'}\n", "odd = odd_mod:METHOD")
    assert benchmark.main(["list", "methods"]) == 0
    assert "failed to load: TypeError: it declares dict" in capsys.readouterr().err
