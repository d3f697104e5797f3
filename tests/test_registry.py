"""The registry: discovery, duplicates, did-you-mean, listing."""

import pytest
from slimbench.methods.baseline import BaselineConfig

from slimbench.cli.list import render
from slimbench.errors import UnknownNameError
from slimbench.method import Method
from slimbench.registry import CORPORA, METHODS, MODELS, TASKS, Registry


def test_spine_entries_are_discovered():
    assert {"baseline", "cast", "magnitude", "rtn"} <= set(METHODS.names())
    assert {"perplexity", "efficiency"} <= set(TASKS.names())
    assert {"smollm2-135m", "tiny-llama", "tiny-gpt2", "tiny-opt"} <= set(MODELS.names())
    assert "shakespeare" in CORPORA


def test_unknown_name_suggests_closest():
    with pytest.raises(UnknownNameError) as e:
        METHODS.get("magnitud")
    assert "Did you mean 'magnitude'" in str(e.value)


def test_duplicate_name_is_rejected():
    reg = Registry("method", "METHOD", ("slimbench.methods",))
    dup = Method("baseline", "baseline", "again", BaselineConfig, lambda lm, c, x: None)
    with pytest.raises(ValueError, match="duplicate method name 'baseline'"):
        reg.register(dup, origin="test")


def test_runtime_registration_is_listed():
    reg = Registry("method", "METHOD", ("slimbench.methods",))
    reg.register(Method("my-plugin", "pruning", "a plugin", BaselineConfig, lambda lm, c, x: None), origin="test")
    assert "my-plugin" in reg.names() and "rtn" in reg.names()


@pytest.mark.parametrize("what", ["methods", "tasks", "models", "corpora"])
def test_listing_shows_parameters_and_defaults(what):
    text = render(what)
    expected = {
        "methods": ["rtn", "bits", "int = 4", "group_size"],
        "tasks": ["perplexity", "seqlen", "int = 512", "concat-windows/1"],
        "models": ["smollm2-135m", "tiny-gpt2"],
        "corpora": ["shakespeare", "test: alls_well_that_ends_well"],
    }[what]
    for s in expected:
        assert s in text


def test_entry_point_plugin_registers_from_outside_the_repo(tmp_path, monkeypatch):
    (tmp_path / "slim_plugin.py").write_text(
        "from slimbench.method import Method, MethodReport\n"
        "from slimbench.methods.baseline import BaselineConfig\n"
        "METHOD = Method('outside', 'pruning', 'from a plugin', BaselineConfig,\n"
        "                lambda lm, cfg, ctx: MethodReport(execution='native'))\n"
    )
    dist = tmp_path / "slim_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: slim-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[slimbench.methods]\noutside = slim_plugin:METHOD\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("method", "METHOD", ("slimbench.methods",))
    assert reg.get("outside").description == "from a plugin"
