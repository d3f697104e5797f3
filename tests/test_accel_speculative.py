"""Speculative decoding: identical output to greedy for every draft kind, stats, refusals."""

from __future__ import annotations

import pytest
import torch
from slimbench.methods.acceleration.speculative import SpeculativeConfig, vocabulary_difference

from slimbench.engines.speculative import (
    PromptLookupDrafter,
    SpeculativeGenerator,
    SpeculativeMismatch,
    check_identical,
)
from slimbench.method import MethodContext
from slimbench.registry import METHODS, TASKS
from slimbench.specs import HardwareSpec, ModelSpec
from tests.conftest import load_tiny

HW = HardwareSpec(threads=1)
SMALL = {"check_prompt_len": 24, "check_new_tokens": 12, "check_repeats": 1}


# one intra-op thread (conftest.one_torch_thread): the 2 shared cores are faster that way
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def full_recompute_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding without any KV cache: an independent reference."""
    seq = ids.clone()
    with torch.inference_mode():
        for _ in range(n):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[:, ids.shape[1] :]


def speculative_lm(draft, **params):
    lm = load_tiny("llama")
    lm.spec = ModelSpec(name="tiny-llama")
    method = METHODS.get("speculative")
    cfg = method.config(draft=draft, **{**SMALL, **params})
    method.check(lm, cfg)
    report = method.apply(lm, cfg, MethodContext(hardware=HW))
    return lm, report


DRAFTS = [
    pytest.param("prompt-lookup", id="prompt-lookup"),
    pytest.param({"model": "tiny-llama"}, id="same-model"),
    pytest.param({"model": "tiny-gpt2"}, id="other-arch-same-tokenizer"),
    pytest.param({"steps": [{"name": "layer-drop", "keep_every": 2}]}, id="layer-drop-copy"),
    pytest.param({"steps": [{"name": "dynamic-int8"}]}, id="int8-copy"),
]


@pytest.mark.parametrize("draft", DRAFTS)
def test_output_equals_greedy_for_every_draft(draft):
    lm, report = speculative_lm(draft)
    check = report.details["self_check"]
    assert check["identical_to_greedy"] and 0.0 <= check["acceptance_rate"] <= 1.0
    # batch of 3 different rows, with a repeated pattern so prompt lookup finds matches
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7], [100, 200, 300, 100, 200, 300, 100], [9, 9, 9, 9, 9, 9, 9]])
    reference = full_recompute_greedy(lm.model, ids, 15)
    bursts = []
    out = lm.generate(ids, 15, on_tokens=bursts.append)
    assert torch.equal(out, reference)
    assert sum(bursts) == 15 and all(b >= 1 for b in bursts)


def test_identical_draft_accepts_everything():
    lm, _ = speculative_lm({"model": "tiny-llama"}, num_draft_tokens=3)
    stats = lm.generator.stats
    lm.generate(torch.tensor([[1, 2, 3, 4]]), 13)  # 1 from the prefill + 3 steps of k+1 = 4
    s = stats.summary()
    assert s["acceptance_rate"] == 1.0 and s["steps"] == 3 and s["mean_tokens_per_step"] == 4.0
    assert s["draft_seconds"] > 0 and s["verify_seconds"] > 0


class WrongDrafter:
    """Always proposes a token the target never picks next (its argmin): nothing is accepted."""

    def __init__(self, lm):
        self.lm = lm

    def start(self, ids):
        pass

    def propose(self, seqs, k):
        worst = self.lm.model(input_ids=seqs, use_cache=False).logits[:, -1].argmin(-1, keepdim=True)
        return worst.repeat(1, k)

    def accepted(self, n):
        pass


def test_rejected_drafts_still_give_greedy_output():
    lm = load_tiny("llama")
    gen = SpeculativeGenerator(WrongDrafter(lm), k=3)
    lm.generator = gen
    ids = torch.tensor([[11, 12, 13, 14, 15]])
    out = lm.generate(ids, 6)
    assert torch.equal(out, full_recompute_greedy(lm.model, ids, 6))
    assert gen.stats.accepted == 0 and gen.stats.steps == 5


def test_a_wrong_generator_is_caught():
    lm = load_tiny("llama")

    class Broken:
        def generate(self, lm, ids, n, on_tokens=None):
            return torch.zeros(ids.shape[0], n, dtype=torch.long)

    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(SpeculativeMismatch, match="differs from the target's greedy decoding at row 0"):
        check_identical(lm, ids, Broken().generate(lm, ids, 5) + 7)


def test_prompt_lookup_proposes_the_continuation_of_the_latest_match():
    d = PromptLookupDrafter(ngram_max=2, ngram_min=1)
    assert d.lookup([1, 2, 3, 9, 1, 2, 4, 5, 1, 2], 3) == [4, 5, 1]  # latest "1 2" is followed by 4 5 1
    assert d.lookup([1, 2, 3], 2) == []
    batch = d.propose(torch.tensor([[1, 2, 1, 2], [7, 8, 9, 10]]), 2)
    assert batch.tolist() == [[1, 2], [10, 10]]  # the row without a match is padded


def test_different_tokenizer_is_refused_in_check():
    lm = load_tiny("llama")
    method = METHODS.get("speculative")
    with pytest.raises(ValueError, match="different tokenizer"):
        method.check(lm, method.config(draft={"model": "all-minilm-l6-v2"}))
    assert vocabulary_difference(lm.tokenizer, lm.tokenizer) is None


def test_cache_without_crop_is_refused_in_check():
    from transformers import DynamicCache

    class NoCrop(DynamicCache):
        @property
        def crop(self):
            raise AttributeError("crop")

    lm = load_tiny("llama")
    lm.cache_factory = lambda lm, b, cap: NoCrop(config=lm.model.config)
    method = METHODS.get("speculative")
    with pytest.raises(ValueError, match="cannot be cropped"):
        method.check(lm, method.config())


@pytest.mark.parametrize(
    ("draft", "message"),
    [
        ({}, "a draft needs a model"),
        ({"steps": [{"name": "no-such-method"}]}, "unknown method"),
        ({"steps": [{"name": "speculative"}]}, "cannot be part of a draft"),
        ({"steps": [{"name": "layer-drop", "bogus": 1}]}, "unknown parameter"),
        ("n-gram", "prompt-lookup"),
    ],
)
def test_bad_draft_configs_fail_validation(draft, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig(draft=draft)


def test_runs_as_a_suite_cell(tmp_path):
    from slimbench.specs import CellSpec, MethodSpec, StepSpec, TaskSpec
    from slimbench.sweep.driver import run_cells
    from slimbench.sweep.store import ResultStore

    cfg = SpeculativeConfig(draft={"steps": [{"name": "layer-drop", "keep_every": 2}]}, **SMALL)
    cell = CellSpec(
        model=ModelSpec(name="tiny-llama"),
        method=MethodSpec(steps=(StepSpec(name="speculative", params=cfg.to_dict()),)),
        task=TaskSpec(
            name="efficiency",
            version=TASKS.get("efficiency").version,
            params={"prompt_len": 8, "new_tokens": 4, "repeats": 1, "warmup": 0},
        ),
        hardware=HW,
    )
    store = ResultStore(tmp_path)
    summary = run_cells([cell], store, show_progress=False, log=lambda s: None)
    assert summary.ok == [cell.run_id]
    (record,) = store.records()
    details = record["method_report"]["steps"][0]["details"]
    assert details["self_check"]["identical_to_greedy"] and details["draft"]["kind"] == "compressed copy"
