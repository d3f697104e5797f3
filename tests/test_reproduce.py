"""Paper reproduction: claim evaluation, paper files, the offline message, and end-to-end runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from slimbench.errors import SuiteError
from slimbench.reproduce import papers as rp
from slimbench.reproduce import render as rp_render
from slimbench.reproduce import run as rp_run
from slimbench.reproduce.claim_cards import Check, evaluate
from slimbench.sweep.store import ResultStore
from slimbench.sweep.suite import load_suite

ROOT = Path(__file__).resolve().parent.parent
PAPERS = sorted(p.stem for p in (ROOT / "configs" / "papers").glob("*.yaml"))
REQUIRED = {"gptq", "sparsegpt", "wanda", "awq", "smoothquant", "svd-llm"}


# -- claim logic, against fabricated values ------------------------------------------------
def check(measure, arms, role="claim", **bound):
    return Check(text=f"{measure} {arms}", measure=measure, arms=arms, role=role, **bound)


GPTQ_CHECKS = [
    check("increase_ratio", ["gptq", "rtn"], at_most=0.4),
    check("relative_increase", ["rtn"], role="premise", at_least=0.5),
]


def test_claim_holds_when_gptq_keeps_little_of_rtns_loss():
    v = evaluate(GPTQ_CHECKS, {"fp": 40.0, "rtn": 440.0, "gptq": 120.0}, "fp")
    assert v.verdict == "holds"
    assert v.checks[0].value == pytest.approx(80 / 400)


def test_claim_fails_when_the_ratio_exceeds_the_bound():
    v = evaluate(GPTQ_CHECKS, {"fp": 40.0, "rtn": 440.0, "gptq": 240.0}, "fp")
    assert v.verdict == "fails"
    assert v.checks[0].passed is False and v.checks[0].value == pytest.approx(0.5)


def test_premise_failure_makes_the_verdict_inconclusive_not_failed():
    # RTN barely hurts: the claim about rescuing RTN's loss cannot be tested on this model.
    v = evaluate(GPTQ_CHECKS, {"fp": 40.0, "rtn": 44.0, "gptq": 43.0}, "fp")
    assert v.verdict == "inconclusive"
    assert v.checks[1].passed is False


def test_missing_arm_makes_the_verdict_incomplete():
    v = evaluate(GPTQ_CHECKS, {"fp": 40.0, "rtn": 440.0, "gptq": None}, "fp")
    assert v.verdict == "incomplete" and v.missing == ["gptq"]


def test_undefined_increase_ratio_is_inconclusive():
    # The denominator arm lost nothing: "keeps x% of its loss" is meaningless, never a pass.
    checks = [check("increase_ratio", ["a", "b"], at_most=0.5)]
    v = evaluate(checks, {"fp": 40.0, "a": 41.0, "b": 39.0}, "fp")
    assert v.verdict == "inconclusive" and v.checks[0].passed is None


def test_ratio_and_at_least_bounds_and_info_checks():
    checks = [
        check("ratio", ["svdllm", "svd"], at_most=0.01),
        check("relative_increase", ["svdllm"], role="info", at_most=0.1),  # fails, but only informs
    ]
    v = evaluate(checks, {"fp": 10.0, "svd": 2e4, "svdllm": 15.0}, "fp")
    assert v.verdict == "holds"
    assert v.checks[0].value == pytest.approx(15 / 2e4) and v.checks[1].passed is False
    v = evaluate(checks, {"fp": 10.0, "svd": 1e3, "svdllm": 15.0}, "fp")
    assert v.verdict == "fails"


def test_check_validation():
    with pytest.raises(ValueError, match="takes 2 arm"):
        check("ratio", ["a"], at_most=1)
    with pytest.raises(ValueError, match="exactly one bound"):
        Check(text="t", measure="ratio", arms=["a", "b"])


def test_non_finite_values_are_not_passes():
    v = evaluate([check("ratio", ["a", "b"], at_most=1.0)], {"fp": 1.0, "a": float("nan"), "b": 2.0}, "fp")
    assert v.verdict == "inconclusive" and v.checks[0].passed is None


# -- every paper file ------------------------------------------------------------------------
def test_required_papers_exist():
    assert set(PAPERS) >= REQUIRED


@pytest.mark.parametrize("name", PAPERS)
def test_paper_file_validates_and_its_suites_load_with_the_normal_loader(name, tmp_path):
    paper = rp.load_paper(name)
    assert paper.key == name
    assert paper.spec.headline.published and paper.spec.claim.checks
    assert any(c.role == "claim" for c in paper.spec.claim.checks)
    # The suite blocks are ordinary suites: `validate` of each, as its own file, works and gives
    # the same cells as the reproduce loader.
    blocks = {"headline": (paper.spec.headline.suite, rp.headline_suite(paper))}
    for budget in rp.BUDGETS:
        raw = rp.apply_budget(paper.spec.claim.suite, paper.spec.claim.budgets[budget])
        blocks[budget] = (raw, rp.claim_suite(paper, budget))
    for label, (raw, ours) in blocks.items():
        path = tmp_path / f"{label}.yaml"
        path.write_text(yaml.safe_dump(raw))
        normal = load_suite(path)
        assert [c.run_id for c in normal.cells()] == [c.run_id for c in ours.cells()]
    # Claim suites run on the embedded model: nothing to download.
    assert rp_run.requirements(rp.claim_suite(paper, "small")) == []


def test_budgets_scale_calibration_and_windows_only_where_a_field_exists():
    paper = rp.load_paper("gptq")
    small, big = rp.claim_suite(paper, "small"), rp.claim_suite(paper, "paper")
    gptq = next(m for m in small.methods if m.name == "gptq").steps[0].params
    assert gptq["calib_samples"] == 16 and small.tasks[0].params["max_windows"] == 8
    assert next(m for m in big.methods if m.name == "gptq").steps[0].params["calib_samples"] == 128
    rtn = next(m for m in small.methods if m.name == "rtn").steps[0].params
    assert "calib_samples" not in rtn  # RTN has no calibration: untouched


def write_paper(tmp_path, claim_model="tiny-llama", **edits) -> Path:
    """A small paper file whose headline needs a hub model and data that are absent offline."""
    spec = {
        "paper": {"key": "toy", "title": "Toy", "citation": "A, B 2024", "url": "https://example.org",
                  "source": "test"},
        "headline": {
            "description": "toy headline", "protocol": "concat windows",
            "suite": {
                "models": [{"name": "facebook/opt-125m", "revision": "27dcfa74d334bc871f3234de431e71c6eeba5dd6"}],
                "methods": ["baseline", {"name": "rtn", "bits": 3}],
                "tasks": [{"name": "perplexity", "corpus": "wikitext2", "split": "test", "seqlen": 2048}],
                "hardware": {"threads": 1},
            },
            "tolerance": {"relative": 0.05},
            "published": [{"model": "facebook/opt-125m", "method": "baseline", "value": 27.65},
                          {"model": "facebook/opt-125m", "method": {"name": "rtn", "bits": 3}, "value": 1300}],
        },
        "claim": {
            "statement": "RTN 3-bit keeps at most 100x fp", "paper_claim": "toy",
            "suite": {
                "models": [claim_model],
                "methods": ["baseline", {"name": "rtn", "bits": 3}],
                "tasks": [{"name": "perplexity", "corpus": "shakespeare", "split": "test", "seqlen": 32}],
                "hardware": {"threads": 1},
            },
            "budgets": {"small": {"tasks": {"max_windows": 2}}, "paper": {"tasks": {"max_windows": 4}}},
            "arms": {"fp": "baseline", "rtn": {"name": "rtn", "bits": 3}},
            "checks": [{"text": "rtn within 100x", "measure": "ratio", "arms": ["rtn", "fp"], "at_most": 100.0}],
        },
    }
    for dotted, value in edits.items():
        node = spec
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_offline_message_names_the_missing_model_data_set_and_revision(tmp_path, monkeypatch, capsys):
    from slimbench.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SLIMBENCH_DATA", raising=False)
    monkeypatch.delenv("SLIMBENCH_REVISION_WIKITEXT2", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty hub cache
    path = write_paper(tmp_path)
    code = main(["reproduce", str(path), "--dry-run", "--results", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 0
    assert "Not reachable here" in out
    assert "facebook/opt-125m at revision 27dcfa74d334bc871f3234de431e71c6eeba5dd6" in out
    assert "not in the local Hugging Face cache" in out
    assert "wikitext2 split test" in out and "SLIMBENCH_REVISION_WIKITEXT2" in out
    assert "hub data set Salesforce/wikitext, wikitext-2-raw-v1" in out
    assert "runs on the embedded model instead" in out


def test_a_model_in_the_hub_cache_at_its_revision_is_reachable_offline(tmp_path, monkeypatch):
    from slimbench.specs import ModelSpec

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    rev = "27dcfa74d334bc871f3234de431e71c6eeba5dd6"
    spec = ModelSpec(name="facebook/opt-125m", revision=rev)
    assert rp_run.model_missing(spec) is not None
    snap = tmp_path / "models--facebook--opt-125m" / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    assert rp_run.model_missing(spec) is not None  # a config without weights is not a model
    (snap / "model.safetensors").write_bytes(b"")
    assert rp_run.model_missing(spec) is None
    assert rp_run.model_missing(ModelSpec(name="facebook/opt-125m", revision="0" * 40)) is not None  # other revision
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert rp_run.model_missing(ModelSpec(name="facebook/opt-350m")) is None  # online: downloaded at load time


def test_bad_matchers_and_unknown_arms_fail_before_anything_runs(tmp_path):
    path = write_paper(tmp_path, **{"claim.arms": {"fp": "baseline", "rtn": {"name": "rtn", "bits": 4}}})
    with pytest.raises(SuiteError, match="matches none"):
        rp.load_paper(str(path))
    path = write_paper(tmp_path, **{"claim.checks": [
        {"text": "t", "measure": "ratio", "arms": ["gptq", "fp"], "at_most": 1.0}]})
    with pytest.raises(SuiteError, match=r"arm\(s\) \['gptq'\] not defined"):
        rp.load_paper(str(path))
    path = write_paper(tmp_path, **{"headline.published": [
        {"model": "facebook/opt-125m", "method": "rtn", "value": 1.0},
        {"model": "facebook/opt-125m", "method": "gptq", "value": 1.0}]})
    with pytest.raises(SuiteError, match="method 'gptq' matches none"):
        rp.load_paper(str(path))


def test_unknown_paper_name_suggests_close_ones():
    with pytest.raises(SuiteError, match="did you mean gptq"):
        rp.find_paper("gptqq")


def test_claim_card_runs_through_the_runner_and_resumes(tmp_path, monkeypatch, frozen_heap):
    """End to end on a tiny model: records are written, the verdict comes from them, and a
    second call reuses them (resumable) and gives the same verdict."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    path = write_paper(tmp_path)
    results = tmp_path / "r"
    rep = rp_run.reproduce(str(path), budget="small", results=results, progress=False, log=lambda s: None)
    assert rep.headline_missing and not rep.headline_ran
    store = ResultStore(results)
    records = store.records()
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    values = {a.arm: a.value for a in rep.arms}
    by_id = {r["run_id"]: r["metrics"]["perplexity"]["value"] for r in records}
    assert values == {a.arm: by_id[a.run_id] for a in rep.arms}
    expected = "holds" if values["rtn"] / values["fp"] <= 100 else "fails"
    assert rep.verdict.verdict == expected
    mtimes = {p: p.stat().st_mtime_ns for p in store.runs.glob("*.json")}
    again = rp_run.reproduce(str(path), budget="small", results=results, progress=False, log=lambda s: None)
    assert {p: p.stat().st_mtime_ns for p in store.runs.glob("*.json")} == mtimes  # nothing recomputed
    assert again.verdict.verdict == rep.verdict.verdict
    md_path = rp_render.write_outputs(rep, results)
    data = json.loads(md_path.with_suffix(".json").read_text())
    assert data["claim"]["verdict"] == rep.verdict.verdict
    assert "rtn within 100x" in md_path.read_text()


def test_markdown_output_escapes_strings_from_the_file(tmp_path):
    path = write_paper(tmp_path, **{"claim.statement": "a | b <script>alert(1)</script>"})
    rep = rp_run.reproduce(str(path), budget="small", results=tmp_path / "r", dry_run=True, log=lambda s: None)
    text = rp_render.render(rep)
    assert "<script>" not in text and "&lt;script&gt;" in text and "a \\| b" in text


@pytest.mark.slow
def test_real_claim_card_end_to_end_on_smollm2(tmp_path, frozen_heap):
    """The SmoothQuant card on the embedded model at a tiny budget (a minute at most)."""
    import torch

    torch.set_num_threads(1)
    paper = rp.load_paper("smoothquant")
    tiny = tmp_path / "smoothquant.yaml"
    raw = yaml.safe_load(paper.path.read_text())
    # One 64-token window per arm: the two W8A8 arms' int8 forwards are most of the test's time.
    raw["claim"]["budgets"]["small"] = {"methods": {"calib_samples": 2, "calib_seqlen": 64},
                                        "tasks": {"max_windows": 1}}
    raw["claim"]["suite"]["tasks"][0]["seqlen"] = 64
    raw["claim"]["suite"]["hardware"]["threads"] = 1
    tiny.write_text(yaml.safe_dump(raw))
    rep = rp_run.reproduce(str(tiny), budget="small", results=tmp_path / "r", progress=False, log=lambda s: None)
    assert all(a.value is not None for a in rep.arms), [a.note for a in rep.arms]
    assert rep.verdict.verdict in ("holds", "fails", "inconclusive")
    fp = {a.arm: a.value for a in rep.arms}["fp"]
    assert 5 < fp < 500  # a real language model on Shakespeare, not a broken one


def test_a_check_row_reads_in_one_unit():
    """The premise "at least 1.5x fp" is shown as 1.5x against a measured multiple of fp, not as
    a bound of 0.5 beside a measured 11.07."""
    premise = Check(text="premise: 3-bit RTN per channel does hurt this model (perplexity at least 1.5x fp)",
                    measure="relative_increase", arms=["rtn"], role="premise", at_least=0.5)
    claim = check("increase_ratio", ["gptq", "rtn"], at_most=0.4)
    v = evaluate([claim, premise], {"fp": 37.9, "rtn": 457.3, "gptq": 105.7}, "fp")
    kept, hurt = v.checks
    assert hurt.check.bound_shown("fp") == ">= 1.5x fp (+50%)"
    assert hurt.shown() == "12.07x fp (+1,107%)"
    assert kept.check.bound_shown("fp") == "<= 40% of rtn's increase" and kept.shown() == "16.2% of rtn's increase"
    assert check("ratio", ["svd_llm", "svd"], at_most=0.01).bound_shown("fp") == "<= 0.01x svd"
    assert hurt.to_dict()["shown"] == "12.07x fp (+1,107%)"


def test_arm_labels_say_a_key_setting_once():
    from slimbench.specs import MethodSpec, StepSpec

    rtn3 = MethodSpec(steps=(StepSpec(name="rtn", params={"bits": 3}),))
    assert rp.method_label(rtn3, {"name": "rtn", "bits": 3}) == "rtn(3-bit, per-channel)"
    gptq = MethodSpec(steps=(StepSpec(name="gptq", params={"bits": 3, "act_order": False}),))
    assert rp.method_label(gptq, {"name": "gptq", "bits": 3, "act_order": False}) == (
        "gptq(3-bit, per-channel, act_order=False)"
    )
