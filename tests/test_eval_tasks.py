"""The Shakespeare tasks and the fidelity task: construction, determinism, and scores vs independent computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from slimbench.tasks import fidelity

from slimbench.registry import CORPORA, TASKS
from slimbench.specs import HardwareSpec
from slimbench.task import TaskContext
from slimbench.zoo.datasets.shakespeare import cloze_items, lastword_items, speeches

CTX = TaskContext(hardware=HardwareSpec(threads=2))
TEST_TEXT = {w: t for w, t in CORPORA.get("shakespeare").documents("test")}


def test_cloze_items_are_deterministic_and_faithful_to_the_text():
    items = cloze_items(30, seed=3)
    assert items == cloze_items(30, seed=3)
    assert [i.id for i in items] != [i.id for i in cloze_items(30, seed=4)]
    by_id = {(s.work, s.index): s for s in speeches()}
    for it in items:
        work, block, j = it.id.split(":")
        sp = by_id[(work, int(block))]
        assert it.choices[it.gold] == sp.lines[int(j)]  # gold is the true next line
        assert it.context == sp.speaker + "\n" + "".join(x + "\n" for x in sp.lines[int(j) - 3 : int(j)])
        assert len(set(it.choices)) == 4
        for c in it.choices:  # distractors come from the same play
            assert c in TEST_TEXT[work]


def test_lastword_items_end_where_the_speech_ends():
    items = lastword_items(30, seed=1)
    assert items == lastword_items(30, seed=1)
    for it in items:
        work = it.id.split(":")[0]
        body = it.context.split("\n", 1)[1]
        assert (body + " " + it.word) in TEST_TEXT[work]
        assert it.word.replace("'", "").isalpha() and len(it.word) >= 3


def test_cloze_task_scores_match_the_plain_loop(tiny_llama):
    from slimbench.tasks import multiple_choice as mc
    from slimbench.tasks import shakespeare_cloze as sc

    task = TASKS.get("shakespeare-cloze")
    cfg = task.config(n_examples=6, batch_size=5)
    res = task.evaluate(tiny_llama, cfg, CTX)
    plain = mc.score_plain(tiny_llama, sc.build(cfg))
    pe = res.details["per_example"]
    assert pe["acc"] == plain.acc and pe["acc_norm"] == plain.acc_norm
    assert res.metrics["acc"].value == pytest.approx(sum(plain.acc) / 6)
    assert res.metrics["acc"].spread["ci_low"] <= res.metrics["acc"].value <= res.metrics["acc"].spread["ci_high"]


def test_lastword_task_is_lambada_scoring(tiny_llama):
    lm = tiny_llama
    task = TASKS.get("shakespeare-lastword")
    res = task.evaluate(lm, task.config(n_examples=5), CTX)
    items = lastword_items(5)
    lls = res.details["per_example"]["loglikelihood"]
    for it, ll, acc in zip(items, lls, res.details["per_example"]["acc"], strict=True):
        ctx, cont = lm.encode_pair(it.context, " " + it.word)
        full = torch.tensor([ctx + cont])
        assert ll == pytest.approx(-lm.token_nll(full)[0, -len(cont):].double().sum().item(), abs=1e-4)
        greedy = lm.greedy(torch.tensor([ctx]), len(cont))[0].tolist()
        assert acc == float(greedy == cont)
    assert res.metrics["perplexity"].value == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-9)


FID = dict(n_prompts=2, prompt_len=16, gen_prompt_len=8, gen_tokens=5, batch_size=2)


def no_reload(*_):
    raise AssertionError("the baseline model must not be loaded here")


def test_fidelity_of_the_baseline_is_perfect_and_cached(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(fidelity, "load_baseline_model", no_reload)
    cfg = fidelity.FidelityConfig(**FID)
    ctx = TaskContext(hardware=HardwareSpec(threads=2), method_report={"steps": [{"name": "baseline"}]})
    first = fidelity.evaluate(tiny_llama, cfg, ctx)
    assert first.details["baseline"]["cache_hit"] is False
    assert first.metrics["kl"].value < 1e-5  # only float16 rounding of the cached log-probs
    assert first.metrics["top1_agreement"].value == 1.0
    assert first.metrics["gen_prefix_agreement"].value == 1.0
    # a compressed cell (not "baseline") finds the cache and never reloads the model
    second = fidelity.evaluate(tiny_llama, cfg, TaskContext(hardware=HardwareSpec(threads=2),
                                                           method_report={"steps": [{"name": "rtn"}]}))
    assert second.details["baseline"]["cache_hit"] is True
    other = fidelity.cache_key(tiny_llama, fidelity.FidelityConfig(**{**FID, "n_prompts": 3}),
                               fidelity.prompts(tiny_llama, cfg), ctx.hardware)
    assert other != first.details["baseline"]["cache_key"]


def test_fidelity_kl_and_agreement_match_an_independent_computation(tmp_path, monkeypatch):
    from tests.conftest import load_tiny

    monkeypatch.setenv("SLIMBENCH_CACHE", str(tmp_path))
    lm = load_tiny("llama")
    base = load_tiny("llama")
    with torch.no_grad():
        torch.manual_seed(1)
        for p in lm.model.model.layers[0].mlp.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loads = []
    monkeypatch.setattr(fidelity, "load_baseline_model", lambda *_: loads.append(1) or base)
    cfg = fidelity.FidelityConfig(**FID)
    ctx = TaskContext(hardware=HardwareSpec(threads=2), method_report={"steps": [{"name": "x"}]})
    res = fidelity.evaluate(lm, cfg, ctx)
    assert loads == [1]
    ids = fidelity.prompts(lm, cfg)
    p = F.log_softmax(base.logits(ids).double(), -1)
    q = F.log_softmax(lm.logits(ids).double(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kl > 1e-4
    assert res.metrics["kl"].value == pytest.approx(kl, rel=1e-3)
    top1 = (p.argmax(-1) == q.argmax(-1)).double().mean().item()
    assert res.metrics["top1_agreement"].value == pytest.approx(top1)
    g_base = base.greedy(ids[:, :8], 5)
    g_mine = lm.greedy(ids[:, :8], 5)
    pairs = zip(g_base.tolist(), g_mine.tolist(), strict=True)
    prefix = [next((k for k in range(5) if a[k] != b[k]), 5) / 5 for a, b in pairs]
    assert res.details["per_example"]["gen_prefix_agreement"] == pytest.approx(prefix)
