"""Composition rules: what a method may follow in a `steps` chain, refused at validation with the
reason; valid chains run as one method with each step's cost recorded."""

from __future__ import annotations

import textwrap

import pytest
import torch

from slimbench.config import Config
from slimbench.errors import SuiteError
from slimbench.method import DEFAULT_FOLLOWS, FAMILIES, Method, MethodReport
from slimbench.registry import METHODS
from slimbench.sweep.driver import run_cells
from slimbench.sweep.store import ResultStore
from slimbench.sweep.suite import load_suite

torch.set_num_threads(1)


def suite(tmp_path, methods: str, name="suite.yaml"):
    p = tmp_path / name
    body = textwrap.indent(textwrap.dedent(methods).strip(), "  ")
    tasks = "tasks: [{name: perplexity, seqlen: 32, max_windows: 2}]"
    p.write_text(f"models: [tiny-llama]\nmethods:\n{body}\n{tasks}\nhardware: {{threads: 1}}\n")
    return p


def method(family: str, **kw) -> Method:
    return Method(f"x-{family}", family, "test", Config, lambda lm, c, x: MethodReport("native"), **kw)


def test_defaults_come_from_the_family():
    accel = method("acceleration")
    assert set(accel.follows) == set(FAMILIES) - {"baseline"}  # acceleration may follow anything
    for family in FAMILIES:  # and only acceleration may follow acceleration
        if family != "acceleration":
            assert "acceleration" not in method(family).follows
    assert set(method("recovery").follows) == {"precision", "quantization", "pruning", "lowrank", "distillation",
                                                     "search"}
    assert method("baseline").follows == ()
    assert set(DEFAULT_FOLLOWS) == set(FAMILIES)


def test_an_explicit_declaration_overrides_the_family():
    m = method("pruning", follows=("precision",))
    assert m.chain_problem([method("precision")]) is None
    assert "may not follow x-lowrank (lowrank)" in m.chain_problem([method("lowrank")])
    with pytest.raises(ValueError, match="unknown families"):
        method("pruning", follows=("quantisation",))


@pytest.mark.parametrize(
    "chain,reason",
    [
        ("[rtn, magnitude]", "magnitude (pruning) may not follow rtn (quantization)"),
        ("[baseline, rtn]", "baseline is the unchanged model"),
        ("[{name: magnitude}, {name: structured, mlp_ratio: 0.25}]", "structured (pruning) may not follow magnitude"),
        ("[{name: rtn}, {name: svd, rank: 4}]", "svd (lowrank) may not follow rtn (quantization)"),
        ("[{name: rtn}, {name: cast}]", "cast (precision) may not follow rtn"),
        # every earlier step counts, not only the one just before
        ("[rtn, {name: finetune, steps: 1}, magnitude]", "magnitude (pruning) may not follow rtn"),
        # a required earlier step (ort-int8 quantizes the graph onnx-runtime exported)
        ("[ort-int8]", "ort-int8 needs onnx-runtime earlier in the chain"),
        ("[rtn, ort-int8]", "ort-int8 needs onnx-runtime earlier in the chain"),
    ],
)
def test_invalid_chains_are_refused_at_validation(tmp_path, chain, reason):
    with pytest.raises(SuiteError, match="invalid chain") as e:
        load_suite(suite(tmp_path, f"- {chain}"))
    assert reason in str(e.value)
    assert "may follow:" in str(e.value) or "baseline" in reason or "needs" in reason  # what is allowed is named


def test_acceleration_may_not_be_followed_by_compression(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS.entries, "x-acceleration", method("acceleration"))
    with pytest.raises(SuiteError, match=r"rtn \(quantization\) may not follow x-acceleration \(acceleration\)"):
        load_suite(suite(tmp_path, "- [x-acceleration, rtn]"))


def test_a_finetune_entry_with_a_steps_parameter_is_one_method(tmp_path):
    # `steps` is finetune's optimizer-step count here, not a chain of methods
    s = load_suite(suite(tmp_path, "- {name: finetune, steps: 3, calib_samples: 4, calib_seqlen: 32, eval_samples: 1}"))
    (spec,) = s.methods
    assert [st.name for st in spec.steps] == ["finetune"] and spec.steps[0].params["steps"] == 3
    chain = load_suite(suite(tmp_path, "- {steps: [magnitude, {name: rtn, bits: 8}]}", "chain.yaml"))
    assert [st.name for st in chain.methods[0].steps] == ["magnitude", "rtn"]


class Compiled(torch.nn.Module):
    """A stand-in accelerator: the same call contract, a different module."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def accelerate(lm, cfg, ctx):
    lm.model = Compiled(lm.model)
    return MethodReport("native", details={"wrapped": True})


VALID = [
    "[{name: magnitude, sparsity: 0.5}, {name: rtn, bits: 4, group_size: 32}]",  # prune then quantize
    "[{name: svd, rank: 8}, {name: rtn, bits: 8}]",  # low-rank then quantize
    "[{name: wanda, calib_samples: 2, calib_seqlen: 32},"
    " {name: finetune, steps: 1, batch_size: 1, calib_samples: 3, calib_seqlen: 32, eval_samples: 1}]",  # fine-tune
    "[{name: rtn, bits: 8}, x-accel]",  # compression then acceleration
]


def test_valid_chains_run_with_each_steps_cost_recorded(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS.entries, "x-accel", Method("x-accel", "acceleration", "wraps", Config, accelerate))
    path = suite(tmp_path, "\n".join(f"- {c}" for c in VALID))
    s = load_suite(path)
    store = ResultStore(tmp_path / "results")
    summary = run_cells(s.cells(), store, show_progress=False, log=lambda m: None)
    assert not summary.failed and len(summary.ok) == len(VALID)
    for rec in store.records():
        steps = rec["method_report"]["steps"]
        assert len(steps) == 2, rec["method"]["label"]
        assert all(st["seconds"] >= 0 and "execution" in st for st in steps)
        assert rec["method_report"]["compress_seconds"] >= max(st["seconds"] for st in steps)
        assert rec["metrics"]["perplexity"]["value"] > 1
    by_label = {r["method"]["name"]: r for r in store.records()}
    assert by_label["magnitude+rtn"]["method_report"]["execution"] == "simulated"
    assert by_label["rtn+x-accel"]["method_report"]["steps"][1]["details"] == {"wrapped": True}
