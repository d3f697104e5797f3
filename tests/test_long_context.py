"""Long-context tasks: generators against fixed seeds, fitting without truncation, RULER's scoring
against hand-made answers, validation refusals, and a whole task run on a tiny model."""

from __future__ import annotations

import collections
import re

import pytest
import torch
from conftest import load_tiny
from slimbench.tasks._long_context import postprocess, string_match_all

from slimbench.config import build_config
from slimbench.errors import SuiteError
from slimbench.registry import METHODS, TASKS
from slimbench.zoo.datasets import long_context as gen

LONG_TASKS = ["passkey", "niah-single", "niah-multikey", "niah-multivalue", "variable-tracking", "common-words"]


def words(text: str) -> list[str]:
    return text.split()


# -- generators ---------------------------------------------------------------------------------
def test_the_same_seed_gives_the_same_example_and_another_seed_another():
    for build in (lambda s: gen.needle_task(s, 40, 50), lambda s: gen.passkey_task(s, 10, 30),
                  lambda s: gen.variable_tracking_task(s, 30), lambda s: gen.common_words_task(s, 50, length=1024)):
        assert build("0/a") == build("0/a")
        assert build("0/a") != build("0/b")


def test_a_fixed_seed_gives_the_recorded_example():
    """Generator version 1's output for one seed; a change here must bump GENERATOR_VERSION."""
    assert gen.GENERATOR_VERSION == "1"
    p = gen.passkey_task("0/passkey/L1024/d50/0", 10, 50)
    assert p.answers == ["2590"]
    n = gen.needle_task("0/niah-single/L1024/d0/0", 20, 0)
    assert n.answers == ["7072062"] and n.meta["keys"] == ["horseback-lane"]


@pytest.mark.parametrize("depth", [0, 25, 50, 100])
def test_the_needle_sits_at_its_depth(depth, monkeypatch):
    sentences = tuple(f"S{i}." for i in range(100))  # a countable haystack
    gen.corpus_words()  # the key's words from the real corpus (cached), not from the haystack below
    monkeypatch.setattr(gen, "corpus_sentences", lambda: sentences)
    p = gen.needle_task("s", 40, depth)
    needle = gen.NEEDLE.format(kind="numbers", key=p.meta["keys"][0], value=p.answers[0])
    body = p.context.split("afterwards.\n", 1)[1]
    before, after = body.split(needle)
    assert len(before.split()) == int(40 * depth / 100) and len(after.split()) == 40 - int(40 * depth / 100)
    assert p.query.startswith("\nWhat is the special magic number for " + p.meta["keys"][0])


def test_passkey_lines_and_depth():
    p = gen.passkey_task("k", 10, 30)
    lines = p.context.split("\n")
    assert lines[0] == gen.PASSKEY_TASK and lines[2] == gen.PASSKEY_LINE.format(key=p.answers[0])
    assert lines[1].count("The grass is green.") == 3 and lines[3].count("The grass is green.") == 7
    assert p.query == "\nWhat is the pass key? The pass key is" and 1 <= int(p.answers[0]) <= 50000


def test_variable_tracking_chain_resolves_to_the_answers():
    p = gen.variable_tracking_task("v", 25)
    body = p.context.split("\n\n", 2)[-1]  # after the demonstration
    value = re.search(r"assigned the value (\d+)", p.query).group(1)
    names, assigned = set(), {}
    for name, rhs in re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)", body):
        assigned[name] = rhs
    for name, rhs in assigned.items():  # follow each chain to its number
        seen = rhs
        while seen.startswith("VAR"):
            seen = assigned[seen[4:]]
        if seen == value:
            names.add(name)
    assert names == set(p.answers) and len(p.answers) == 5


@pytest.mark.parametrize(("length", "common", "rare"), [(1024, 6, 1), (4096, 30, 3)])
def test_common_words_counts(length, common, rare):
    p = gen.common_words_task("c", 60, length=length)
    listing = p.context.rsplit("most often.\n", 1)[1]
    counts = collections.Counter(re.findall(r"\d+\. ([a-z]+)", listing))
    top = [w for w, _ in counts.most_common(10)]
    assert sorted(top) == sorted(p.answers)
    assert {counts[w] for w in p.answers} == {common} and set(counts.values()) == {common, rare}


# -- fitting ------------------------------------------------------------------------------------------
def test_fit_grows_the_haystack_to_the_budget_and_never_cuts():
    encode = lambda s: s.split()
    f = gen.fit(lambda u: gen.passkey_task("f", u, 50), encode, 500)
    assert 500 - 128 <= f.tokens <= 500
    bigger = gen.passkey_task("f", f.units + 1, 50)
    assert len(encode(bigger.context)) + len(encode(bigger.query)) > 500  # one more sentence would not fit
    assert gen.PASSKEY_LINE.format(key=f.parts.answers[0]) in f.parts.context  # the key survived
    with pytest.raises(ValueError, match="smallest example"):
        gen.fit(lambda u: gen.passkey_task("f", u, 50), encode, 20)
    with pytest.raises(ValueError, match="under the budget of 1000"):
        gen.fit(lambda u: gen.Parts("x " * min(u, 10), "q", ["a"]), encode, 1000)


# -- scoring ------------------------------------------------------------------------------------------
def test_ruler_string_match_all_on_hand_made_answers():
    assert string_match_all(" 8963131.", ["8963131"]) == 1.0
    assert string_match_all("The number is 896313", ["8963131"]) == 0.0
    assert string_match_all(" 1. Apple 2. pear\n3. fig", ["apple", "Fig", "plum", "kiwi"]) == 0.5
    assert string_match_all("GGIAZ GLOLH QITOV", ["GGIAZ", "GLOLH", "QITOV", "VDQLR", "PPSHY"]) == 0.6
    assert postprocess("\x00 ab\x1fc \n") == "ab\nc"


def test_passkey_scores_the_key_tokens_exactly():
    lm = load_tiny("llama")
    task = TASKS.get("passkey")
    from slimbench.tasks.passkey import exact_key

    ex = gen.Fitted(gen.Parts("", "", ["12345"]), [], [], 1)
    want = lm.encode(" 12345")
    assert exact_key("", want + lm.encode("."), lm, ex) == 1.0
    assert exact_key("", want[:-1], lm, ex) == 0.0 and exact_key("", lm.encode(" 12346"), lm, ex) == 0.0
    assert task.quality_metric == "accuracy"


# -- validation ---------------------------------------------------------------------------------------
def suite(tasks, methods=("baseline",)):
    from slimbench.sweep.suite import suite_from_mapping

    return suite_from_mapping({"models": ["tiny-llama"], "methods": list(methods), "tasks": tasks,
                               "hardware": {"threads": 1}}, "suite.yaml", "t")


def test_validation_refuses_long_contexts_bad_depths_and_large_budgets():
    with pytest.raises(SuiteError, match="longer than tiny-llama's maximum of 1024"):
        suite([{"name": "niah-single", "lengths": [512, 2048]}])
    with pytest.raises(SuiteError, match="a needle depth is a percentage from 0 to 100"):
        suite([{"name": "passkey", "depths": [-5, 50]}])
    with pytest.raises(SuiteError, match="budget 600 positions is not smaller than the context"):
        suite([{"name": "passkey", "lengths": [512]}], methods=[{"name": "kv-h2o", "budget": 600}])
    assert len(suite([{"name": "passkey", "lengths": [512]}], methods=[{"name": "kv-h2o", "budget": 64}]).cells()) == 1


# -- a whole task ---------------------------------------------------------------------------------
def run(lm, name, **params):
    from slimbench.specs import HardwareSpec
    from slimbench.task import TaskContext

    task = TASKS.get(name)
    cfg = build_config(task.config, params, source="t", field=name)
    return task.evaluate(lm, cfg, TaskContext(hardware=HardwareSpec(threads=1)))


def test_a_task_records_scores_by_length_and_depth_and_kv_kept(one_torch_thread, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMBENCH_CACHE", str(tmp_path))
    lm = load_tiny("llama")
    base = run(lm, "niah-single", lengths=[256, 384], depths=[0, 100], max_new_tokens=4)
    pe = base.details["per_example"]
    assert pe["id"] == ["niah-single/L256/d0/0", "niah-single/L256/d100/0", "niah-single/L384/d0/0",
                        "niah-single/L384/d100/0"]
    assert all(t + 4 <= n for t, n in zip(pe["tokens"], pe["length"], strict=True))
    assert set(base.metrics) >= {"accuracy", "accuracy_256", "accuracy_384", "kv_kept_fraction_logical"}
    assert base.metrics["kv_kept_fraction_physical"].value == 1.0 and base.details["prefill_reused"] == 0
    m = METHODS.get("kv-tova")
    m.run(lm, build_config(m.config, {"ratio": 4}, source="t", field="kv-tova"), None)
    comp = run(lm, "niah-single", lengths=[256, 384], depths=[0, 100], max_new_tokens=4)
    assert comp.details["prefill_reused"] == 4  # the uncompressed run recorded every prompt
    assert len(list((tmp_path / "kv-prefill").glob("*.safetensors"))) == 4
    cpe = comp.details["per_example"]
    # TOVA holds a quarter of the prompt (its budget) when the answer starts
    assert cpe["kept_fraction_logical"] == pytest.approx([round(t / 4) / t for t in cpe["tokens"]])
    after = run(lm, "niah-single", lengths=[256], depths=[0], max_new_tokens=4, question="after-context")
    ape = after.details["per_example"]  # a quarter of the context, held after the question too
    assert ape["kept_fraction_logical"] == pytest.approx([round(c / 4) / t for c, t in zip(ape["context_tokens"],
                                                                                        ape["tokens"], strict=True)])
    fresh = run(lm, "niah-single", lengths=[256, 384], depths=[0, 100], max_new_tokens=4, share_prefill=False)
    assert fresh.details["per_example"]["prediction"] == comp.details["per_example"]["prediction"]
    assert fresh.details["prefill_reused"] == 0


def test_the_report_draws_heat_maps_and_the_table(one_torch_thread, tmp_path, monkeypatch):
    from slimbench.report.write import write_report
    from slimbench.sweep.driver import run_cells
    from slimbench.sweep.store import ResultStore

    monkeypatch.setenv("SLIMBENCH_CACHE", str(tmp_path / "cache"))
    s = suite([{"name": "passkey", "lengths": [256], "depths": [0, 100], "max_new_tokens": 2}],
              methods=["baseline", {"name": "kv-streaming", "ratio": 4}])
    store = ResultStore(tmp_path / "runs")
    run_cells(s.cells(), store, show_progress=False, log=lambda s: None)
    out = write_report(store, tmp_path / "report")
    names = {p.name for p in out.files}
    assert "long_context.md" in names and "heatmap_tiny-llama_passkey.png" in names
    md = (tmp_path / "report" / "long_context" / "long_context.md").read_text()
    assert "Uncompressed model (baseline)" in md and "kv-streaming(ratio=4.0)" in md
    assert md.index("| baseline |") < md.index("| kv-streaming")
    assert torch.is_tensor(torch.zeros(1))  # matplotlib and torch coexist in the report process


@pytest.mark.parametrize("name", LONG_TASKS)
def test_every_task_runs_on_a_tiny_model(one_torch_thread, tmp_path, monkeypatch, name):
    monkeypatch.setenv("SLIMBENCH_CACHE", str(tmp_path))
    res = run(load_tiny("llama"), name, lengths=[1000], max_new_tokens=2, share_prefill=False)
    assert 0.0 <= res.metrics["accuracy"].value <= 100.0
    assert res.details["generator_version"] == gen.GENERATOR_VERSION and res.details["examples"] >= 1


def test_kv_pareto_labels_coinciding_methods_once_and_marks_the_front():
    from slimbench.report.long_context import pareto_marks

    pts = [(360.0, 88.9, "baseline"), (45.0, 28.9, "kv-h2o(ratio=8.0)"), (45.02, 28.9000001, "kv-streaming(ratio=8.0)"),
           (90.0, 64.4, "kv-tova(ratio=4.0)"), (90.0, 19.4, "kv-snapkv(ratio=4.0)"), (25.3, 49.4, "snapkv+int4")]
    marks = {label: on for _, _, label, on in pareto_marks(pts)}
    assert "kv-h2o(ratio=8.0) = kv-streaming(ratio=8.0)" in marks and len(marks) == 5
    assert {m for m, on in marks.items() if on} == {"snapkv+int4", "kv-tova(ratio=4.0)", "baseline"}
