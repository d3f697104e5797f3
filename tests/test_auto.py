"""The search family: allocation, hypervolume, sensitivity probes and the `auto` method."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from slimbench.methods.search import auto as auto_mod
from slimbench.methods.search import plans as plans_mod
from slimbench.methods.search import sensitivity
from slimbench.methods.search.allocate import BudgetError, allocate, dominates_front, hypervolume, pareto_front
from slimbench.methods.search.choices import Choice, choice_nbytes, compress_weight, parse_choice
from slimbench.methods.search.compare import Point, collect, fronts, render, verdicts

from slimbench.layerwise import decoder_layers
from slimbench.method import MethodContext, size_report
from slimbench.modeling import get_weight, iter_linears, set_weight
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec
from tests.conftest import load_tiny

CTX = MethodContext(hardware=HardwareSpec(threads=1))
SMALL = dict(probe_windows=2, probe_seqlen=32, val_windows=1, verify_windows=2, verify_seqlen=32)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMBENCH_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


# -- hypervolume and fronts --------------------------------------------------------------------
def test_hypervolume_matches_hand_computation():
    # Staircase (1,3), (2,2), (3,1) under reference (4,4): slabs 1x1 + 1x2 + 1x3 = 6.
    pts = [(1, 3), (2, 2), (3, 1)]
    assert hypervolume(pts, (4, 4)) == pytest.approx(6.0)
    # A dominated point, a duplicate and a point beyond the reference change nothing.
    assert hypervolume([*pts, (2.5, 2.5), (2, 2), (5, 0.5)], (4, 4)) == pytest.approx(6.0)
    # One point: a rectangle.
    assert hypervolume([(1.5, 0.5)], (4, 4)) == pytest.approx(2.5 * 3.5)
    assert hypervolume([], (4, 4)) == 0.0


def test_hypervolume_against_grid_count():
    """Monte-Carlo-free check: count unit cells of a fine grid dominated by some point."""
    rng = random.Random(0)
    pts = [(rng.randint(0, 20), rng.randint(0, 20)) for _ in range(8)]
    ref = (20, 20)
    cells = sum(
        any(px <= x and py <= y for px, py in pts) for x, y in itertools.product(range(20), range(20))
    )  # cell [x, x+1] x [y, y+1] is dominated iff its lower-left corner is
    assert hypervolume(pts, ref) == pytest.approx(cells)


def test_pareto_front_and_dominance():
    assert pareto_front([(3, 1), (1, 3), (2, 2), (2, 3), (1, 4)]) == [(1, 3), (2, 2), (3, 1)]
    assert dominates_front([(1, 1)], [(1, 2), (2, 1)])
    assert not dominates_front([(1, 2)], [(2, 1)])
    # 0.005% more bytes is "equal" with a 1e-4 tolerance, not without
    assert dominates_front([(100.005, 1)], [(100, 2)], 1e-4) and not dominates_front([(100.005, 1)], [(100, 2)])


# -- allocation -------------------------------------------------------------------------------
def brute_force(options, budget):
    best = None
    for combo in itertools.product(*options.values()):
        b, loss = sum(o[1] for o in combo), sum(o[2] for o in combo)
        if b <= budget and (best is None or loss < best[0]):
            best = (loss, combo)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocate_finds_the_optimum(seed):
    rng = random.Random(seed)
    options = {
        f"u{i}": [(f"c{j}", rng.randint(1, 40), rng.random()) for j in range(rng.randint(1, 4))] for i in range(5)
    }
    lo = sum(min(o[1] for o in v) for v in options.values())
    hi = sum(max(o[1] for o in v) for v in options.values())
    budget = rng.randint(lo, hi)
    plan = allocate(options, budget)
    got = [next(o for o in options[u] if o[0] == k) for u, k in plan.items()]
    assert sum(o[1] for o in got) <= budget
    assert sum(o[2] for o in got) == pytest.approx(brute_force(options, budget)[0])


def test_allocate_coarse_resolution_stays_within_budget():
    options = {f"u{i}": [("a", 1000 + i, 1.0), ("b", 3000 + 7 * i, 0.1)] for i in range(50)}
    budget = 100_000
    plan = allocate(options, budget, resolution=37)
    spent = sum(dict((k, b) for k, b, _ in options[u])[plan[u]] for u in plan)
    assert spent <= budget
    with pytest.raises(BudgetError, match="below the smallest"):
        allocate(options, 10)


# -- choices ------------------------------------------------------------------------------------
def test_choice_keys_round_trip_and_errors():
    for key in ("rtn:3:g64", "rtn:4:pc", "magnitude:0.5", "wanda:0.25", "dense"):
        assert parse_choice(key).key == key
    assert parse_choice("wanda:0") == Choice("dense")
    for bad in ("rtn:9:pc", "rtn:3:g48", "rtn:3:64", "gptq:3:pc", "wanda:1.0", "magnitude"):
        with pytest.raises(ValueError, match="unknown choice"):
            parse_choice(bad)


def test_choice_bytes_are_what_the_harness_counts(tiny_llama):
    """A plan's predicted bytes equal the record's effective bits (codes, scales, zero-points)."""
    mods = dict(iter_linears(tiny_llama.model))
    keys = ["rtn:3:g64", "rtn:2:pc", "rtn:8:pc", "magnitude:0.5", "dense"]
    plan = {n: keys[i % len(keys)] for i, n in enumerate(mods)}
    predicted = sum(choice_nbytes(get_weight(mods[n]), parse_choice(k)) for n, k in plan.items())
    cfg = auto_mod.AutoConfig(plan=plan)
    storage, _ = auto_mod.apply_plan(tiny_llama, {n: parse_choice(k) for n, k in plan.items()}, cfg, None)
    numel = sum(get_weight(m).numel() for m in mods.values())
    assert size_report(tiny_llama.model, storage)["effective_bits"] == pytest.approx(8 * predicted / numel)


def test_rtn_choice_equals_rtn_method(tiny_llama):
    w = get_weight(next(m for _, m in iter_linears(tiny_llama.model)))
    ref = tiny_llama
    METHODS.get("rtn").apply(ref, METHODS.get("rtn").config(bits=3, group_size=64), CTX)
    _, mod = next(iter(iter_linears(ref.model)))
    w_hat, _ = compress_weight(w, parse_choice("rtn:3:g64"))
    assert torch.equal(w_hat, get_weight(mod))


# -- sensitivity probes --------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_tail_from_any_layer_equals_the_full_forward(arch):
    lm = load_tiny(arch)
    layers = decoder_layers(lm.model)
    ids = torch.randint(0, 1000, (2, 16))
    inputs, ref, returns_tuple = sensitivity.reference_pass(lm.model, layers, ids)
    for i in range(len(layers)):
        with torch.no_grad(), sensitivity.from_layer(layers, i, inputs[i], returns_tuple):
            out = lm.model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert all(not isinstance(m, sensitivity._PassThrough) for m in layers)  # restored


def test_probe_kl_equals_an_independent_computation(tiny_llama):
    probe = sensitivity.ProbeConfig(probe_windows=2, probe_seqlen=32, val_windows=1)
    mods = dict(iter_linears(tiny_llama.model))

    def compress(name, w, key):
        return compress_weight(w, parse_choice(key))[0], 1

    prof = sensitivity.sensitivity_profile(tiny_llama, family="quantization", candidates=["rtn:2:pc"],
                                           compress=compress, probe=probe)
    name = "model.layers.1.mlp.down_proj"
    got = prof["units"][name]["candidates"]["rtn:2:pc"]
    # Independently: compress that linear in the full model and compare full forwards.
    ids, n_kl, _ = sensitivity.probe_batch(tiny_llama, probe, "shakespeare")
    with torch.no_grad():
        ref = tiny_llama.model(input_ids=ids).logits
        w = get_weight(mods[name]).clone()
        set_weight(mods[name], compress_weight(w, parse_choice("rtn:2:pc"))[0])
        new = tiny_llama.model(input_ids=ids).logits
        set_weight(mods[name], w)
    p, q = F.log_softmax(ref[:n_kl], -1), F.log_softmax(new[:n_kl], -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    nll = lambda lg: F.cross_entropy(lg[n_kl:, :-1].reshape(-1, lg.shape[-1]), ids[n_kl:, 1:].reshape(-1)).item()
    assert got["kl"] == pytest.approx(kl, rel=1e-4)
    assert got["val_nll_delta"] == pytest.approx(nll(new) - nll(ref), abs=1e-5)
    assert got["kl"] > 0


def test_profile_is_cached_and_extended_incrementally(tiny_llama, monkeypatch):
    probe = sensitivity.ProbeConfig(probe_windows=1, probe_seqlen=16, val_windows=0, unit="layer")
    calls = []

    def compress(name, w, key):
        calls.append(key)
        return compress_weight(w, parse_choice(key))[0], 1

    kw = dict(family="quantization", compress=compress, probe=probe)
    first = sensitivity.sensitivity_profile(tiny_llama, candidates=["rtn:4:pc"], **kw)
    n = len(calls)
    assert n == len(list(iter_linears(tiny_llama.model)))  # every linear, once
    again = sensitivity.sensitivity_profile(tiny_llama, candidates=["rtn:4:pc"], **kw)
    assert len(calls) == n and again["units"] == first["units"]
    more = sensitivity.sensitivity_profile(tiny_llama, candidates=["rtn:4:pc", "rtn:2:pc"], **kw)
    assert set(calls[n:]) == {"rtn:2:pc"}
    assert more["meta"]["path"] == first["meta"]["path"]
    assert set(json.loads(Path(more["meta"]["path"]).read_text())["units"]) == {"model.layers.0", "model.layers.1"}


# -- the auto method ---------------------------------------------------------------------------
def run_auto(lm, **params):
    method = METHODS.get("auto")
    cfg = method.config(**params)
    method.check(lm, cfg)
    rep = method.apply(lm, cfg, CTX)
    return rep, size_report(lm.model, rep.storage)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_auto_quantization_meets_budget_and_replays(arch):
    lm = load_tiny(arch)
    rep, size = run_auto(lm, budget_bits=3.3, bits=[2, 3, 4, 8], group_sizes=[None, 32], **SMALL)
    search = rep.details["search"]
    assert size["effective_bits"] <= 3.3 + 1e-9
    assert search["chosen"] in search["verify_val_nll"]
    assert search["verify_val_nll"][search["chosen"]] == min(search["verify_val_nll"].values())
    assert set(rep.details["plan"]) == {n for n, _ in iter_linears(lm.model)}
    assert "dense" not in rep.details["plan"].values()  # not an RTN setting: not offered by default
    # Re-running the saved plan gives the same weights and the same stored form, no search.
    replay = load_tiny(arch)
    rep2, size2 = run_auto(replay, plan=rep.details["plan"])
    assert rep2.details["search"] is None and size2 == size
    for (_, a), (_, b) in zip(iter_linears(lm.model), iter_linears(replay.model), strict=True):
        assert torch.equal(get_weight(a), get_weight(b))


def test_auto_pruning_mixes_methods_within_budget(tiny_llama):
    calib = dict(calib_samples=2, calib_seqlen=32)
    rep, size = run_auto(tiny_llama, family="pruning", budget_like="wanda:0.5", sparsities=[0.3, 0.5, 0.7],
                         **calib, **SMALL)
    uniform = load_tiny("llama")
    METHODS.get("wanda").apply(uniform, METHODS.get("wanda").config(sparsity=0.5, **calib), CTX)
    bits_uniform = size_report(uniform.model, METHODS.get("wanda").apply(
        load_tiny("llama"), METHODS.get("wanda").config(sparsity=0.5, **calib), CTX).storage)["effective_bits"]
    assert size["effective_bits"] <= bits_uniform + 1e-9
    assert {k.split(":")[0] for k in rep.details["plan"].values()} <= {"magnitude", "wanda", "dense"}
    assert rep.details["search"]["budget_linear_bytes"] > 0


def test_auto_config_errors():
    cfg = METHODS.get("auto").config
    assert cfg().budget_bits == 4.0 and cfg(family="pruning").budget_like == "wanda:0.5"  # defaults
    with pytest.raises(ValueError, match="exactly one"):
        cfg(budget_bits=3, budget_like="rtn:3:g64")
    with pytest.raises(ValueError, match="unknown choice"):
        cfg(budget_like="rtn:3:g60")
    with pytest.raises(ValueError, match="packed"):
        cfg(family="pruning", budget_bits=20, format="packed")
    with pytest.raises(ValueError, match="not among the candidates"):
        cfg(budget_like="rtn:3:g32")  # the default groups are per-channel and 64
    cfg(plan={"model.layers.0.mlp.up_proj": "rtn:4:pc"})  # a plan alone is enough
    assert not cfg(budget_bits=4).dense_allowed and cfg(family="pruning", budget_bits=20).dense_allowed


def test_auto_check_rejects_a_plan_for_another_model(tiny_llama):
    method = METHODS.get("auto")
    with pytest.raises(ValueError, match="lacks"):
        method.check(tiny_llama, method.config(plan={"model.layers.9.mlp.up_proj": "rtn:4:pc"}))
    with pytest.raises(ValueError, match="does not fit"):
        method.check(tiny_llama, method.config(plan={"model.layers.0.mlp.up_proj": "rtn:4:g128"}))


def test_budget_too_small_fails_clearly(tiny_llama):
    with pytest.raises(BudgetError, match="below the smallest"):
        run_auto(tiny_llama, budget_bits=1.0, bits=[3, 4], group_sizes=[None], objectives=["kl"], **SMALL)


# -- the comparison table -----------------------------------------------------------------------
def test_verdicts_and_fronts():
    pts = [
        Point("uniform", "rtn:3:g64", 100, 3.3, 80.0),
        Point("uniform", "rtn:4:pc", 110, 4.0, 60.0),
        Point("uniform", "rtn:2:pc", 60, 2.0, 5000.0),
        Point("searched", "auto (rtn:3:g64)", 100, 3.29, 70.0, budget_like="rtn:3:g64"),
        Point("searched", "auto (rtn:2:pc)", 60, 2.0, 6000.0, budget_like="rtn:2:pc"),
        Point("searched", "auto (rtn:4:pc)", 110, 4.0, 60.0, budget_like="rtn:4:pc"),
    ]
    v = {x["searched"].label: x for x in verdicts(pts)}
    assert v["auto (rtn:3:g64)"]["wins"] and v["auto (rtn:3:g64)"]["best_uniform"].label == "rtn:3:g64"
    assert not v["auto (rtn:2:pc)"]["wins"] and not v["auto (rtn:2:pc)"]["tie"]
    assert v["auto (rtn:4:pc)"]["tie"] and not v["auto (rtn:4:pc)"]["wins"]
    assert "| auto (rtn:4:pc) | 0.000 | 0.000 | rtn:4:pc | 60.00 | 60.00 | tie |" in render({("m", "q", "{}"): pts})
    f = fronts(pts)
    assert f["reference"] == (0.00011, pytest.approx(math.log(6000)))
    assert not f["searched_dominates"]  # rtn:2:pc (60 bytes, 5000) is dominated by no searched point


def test_collect_reads_records():
    def rec(step, ppl, stored, split="test", report=None):
        return {"status": "ok", "task": {"name": "perplexity", "params": {"split": split, "seqlen": 512}},
                "method": {"steps": [step]}, "model": {"name": "m"},
                "metrics": {"perplexity": {"value": ppl}},
                "method_report": {"stored_bytes": stored, "effective_bits": 3.0, **(report or {})}}

    recs = [
        rec({"name": "rtn", "params": {"bits": 3, "group_size": 64}}, 80.0, 100),
        rec({"name": "rtn", "params": {"bits": 3, "group_size": 64, "symmetric": True}}, 90.0, 100),  # not mixed
        rec({"name": "auto", "params": {"family": "quantization", "budget_like": "rtn:3:g64"}}, 70.0, 99,
            report={"steps": [{"details": {"search": {"chosen": "search:kl"}}}]}),
        rec({"name": "rtn", "params": {"bits": 4, "group_size": None}}, 50.0, 120, split="validation"),
    ]
    groups = collect(recs)
    (key, pts), = groups.items()
    assert key[:2] == ("m", "quantization") and len(pts) == 2
    text = render(groups)
    assert "| searched | auto (rtn:3:g64) -> search:kl | 0.000 |" in text and "| yes |" in text


def test_auto_through_the_runner_and_the_table(tmp_path):
    """A suite of uniform and searched cells: records hold the plan, the table compares them."""
    from slimbench.cli import main
    from slimbench.sweep.driver import run_cells
    from slimbench.sweep.store import ResultStore
    from slimbench.sweep.suite import load_suite

    path = tmp_path / "suite.yaml"
    path.write_text(
        "models: [tiny-llama]\n"
        "methods:\n"
        "  - {name: rtn, bits: [2, 3, 4], group_size: 32}\n"
        "  - {name: auto, bits: [2, 3, 4], group_sizes: [32], budget_like: [rtn:3:g32], probe_windows: 2,\n"
        "     probe_seqlen: 32, val_windows: 1, verify_windows: 2, verify_seqlen: 32}\n"
        "tasks: [{name: perplexity, seqlen: 32, max_windows: 2}]\n"
        "hardware: {threads: 1}\n"
    )
    store = ResultStore(tmp_path / "results")
    summary = run_cells(load_suite(path).cells(), store, show_progress=False, log=lambda s: None)
    assert not summary.failed and len(summary.ok) == 4
    rec = next(r for r in store.records() if r["method"]["steps"][0]["name"] == "auto")
    details = rec["method_report"]["steps"][0]["details"]
    assert len(details["plan"]) == 14 and details["search"]["chosen"]
    like = next(r for r in store.records() if r["method"]["steps"][0]["params"].get("bits") == 3)
    assert rec["method_report"]["stored_bytes"] <= like["method_report"]["stored_bytes"] * (1 + 1e-4)
    assert main(["search-table", "--results", str(tmp_path / "results")]) == 0


def test_auto_whole_checkpoint_budget(tiny_llama):
    """budget_bytes bounds the serialised checkpoint, header included."""
    uniform = load_tiny("llama")
    rtn = METHODS.get("rtn")
    target = size_report(uniform.model, rtn.apply(uniform, rtn.config(bits=3, group_size=32), CTX).storage)
    rep, size = run_auto(tiny_llama, budget_bytes=target["stored_bytes"], bits=[2, 3, 4], group_sizes=[None, 32],
                         objectives=["kl"], **SMALL)
    assert size["stored_bytes"] <= target["stored_bytes"]
    assert rep.details["search"]["budget_linear_bytes"] < target["stored_bytes"]


# -- the low-rank family -------------------------------------------------------------------------
def test_svd_llm_choice_has_its_defining_properties():
    from slimbench.methods.lowrank.factorize import rank_for_ratio

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=g)
    ch, k = parse_choice("svd-llm:0.5"), rank_for_ratio(24, 16, 0.5)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    plain = (u[:, :k] * s[:k]) @ vh[:k]
    # X^T X = I: whitening changes nothing, so the choice is the plain truncated SVD (Eckart-Young)
    w_hat, stored = compress_weight(w, ch, xtx=torch.eye(16, dtype=torch.float64))
    assert torch.allclose(w_hat.double(), plain, atol=1e-5)
    assert stored["up"].shape == (24, k) and stored["down"].shape == (k, 16)
    assert choice_nbytes(w, ch, xtx=torch.eye(16, dtype=torch.float64)) == k * (24 + 16) * 4
    # real inputs: the output error on them is exactly the discarded whitened energy, and lower
    # than the plain SVD's of the same rank
    x = torch.randn(200, 16, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, 16, dtype=torch.float64)
    w_hat, _ = compress_weight(w, ch, xtx=x.T @ x)
    err = (x @ (w.double() - w_hat.double()).T).pow(2).sum()
    s_white = torch.linalg.svdvals(w.double() @ torch.linalg.cholesky(x.T @ x))
    assert float(err) == pytest.approx(float(s_white[k:].pow(2).sum()), rel=1e-3)
    assert err < (x @ (w.double() - plain).T).pow(2).sum()
    assert parse_choice("svd-llm:0") == Choice("dense")
    with pytest.raises(ValueError, match="svd-llm:RATIO"):
        parse_choice("svd-llm:1.5")


def test_auto_uniform_lowrank_plan_is_the_svd_llm_method(tiny_llama):
    calib = dict(calib_samples=2, calib_seqlen=32)
    plan = {n: "svd-llm:0.3" for n, _ in iter_linears(tiny_llama.model)}
    rep, size = run_auto(tiny_llama, family="lowrank", plan=plan, **calib)
    svd_llm = METHODS.get("svd-llm")
    ref = load_tiny("llama")
    ref_rep = svd_llm.apply(ref, svd_llm.config(ratio=0.3, **calib), CTX)
    assert rep.execution == "native" and rep.details["ranks"] == ref_rep.details["ranks"]
    assert rep.details["weight_params_removed"] == pytest.approx(ref_rep.details["weight_params_removed"])
    ids = torch.randint(0, tiny_llama.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(tiny_llama.model(ids).logits, ref.model(ids).logits)
    assert size["stored_bytes"] == size_report(ref.model, ref_rep.storage)["stored_bytes"]


def test_auto_lowrank_search_meets_the_budget_natively_and_replays(tiny_llama):
    calib = dict(calib_samples=2, calib_seqlen=32)
    rep, size = run_auto(tiny_llama, family="lowrank", budget_like="svd-llm:0.3", ratios=[0.1, 0.3, 0.5],
                         **calib, **SMALL)
    svd_llm = METHODS.get("svd-llm")
    uniform = load_tiny("llama")
    uniform_size = size_report(uniform.model, svd_llm.apply(uniform, svd_llm.config(ratio=0.3, **calib), CTX).storage)
    assert rep.execution == "native" and size["stored_bytes"] <= uniform_size["stored_bytes"]
    assert set(rep.details["plan"].values()) <= {"svd-llm:0.1", "svd-llm:0.3", "svd-llm:0.5", "dense"}
    search = rep.details["search"]
    assert search["plan_bytes"][search["chosen"]] <= search["budget_linear_bytes"]
    replay = load_tiny("llama")
    run_auto(replay, family="lowrank", plan=rep.details["plan"], **calib)
    ids = torch.randint(0, replay.model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(tiny_llama.model(ids).logits, replay.model(ids).logits)


def test_uniform_svd_llm_records_join_the_lowrank_comparison():
    from slimbench.methods.search.compare import uniform_key

    assert uniform_key({"name": "svd-llm", "params": {"ratio": 0.2, "allocation": "uniform"}}) == ("lowrank",
                                                                                                    "svd-llm:0.2")
    assert uniform_key({"name": "svd-llm", "params": {"ratio": 0.2, "allocation": "sensitivity"}}) is None
    assert uniform_key({"name": "svd-llm", "params": {"ratio": None, "rank": 4}}) is None


def test_floored_plans_leave_out_choices_below_their_floor():
    from slimbench.methods.search.plans import floored_plans

    # "a" is cheap and individually not too harmful; two units at a + c beat two at b additively
    options = {f"u{i}": [("a", 10, 1.5), ("b", 20, 1.0), ("c", 40, 0.0)] for i in range(4)}
    free = allocate(options, 80)
    assert "a" in free.values()
    plans = floored_plans(options, 80, "search:kl")
    # floors lie above the cheapest choice and at most at the budget's level (b: 80 / 160)
    assert set(plans) == {"search:kl:floor=b"}
    assert set(plans["search:kl:floor=b"].values()) == {"b"}


def test_candidate_plans_are_distinct_and_name_the_uniform_one():
    cfg = METHODS.get("auto").config(budget_like="rtn:3:pc", bits=[2, 3, 4], group_sizes=[None], objectives=["kl"])
    options = {"kl": {f"u{i}": [("rtn:2:pc", 10, 9.0), ("rtn:3:pc", 20, 1.0), ("rtn:4:pc", 40, 0.5)]
                      for i in range(3)}}
    plans = plans_mod.candidate_plans(options, cfg, 60)
    assert list(plans) == ["uniform:rtn:3:pc"]  # the search's plans equal the uniform one: listed once, as uniform
    assert len({json.dumps(p, sort_keys=True) for p in plans.values()}) == len(plans)
