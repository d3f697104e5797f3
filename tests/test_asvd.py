"""ASVD's rank search (STRS): the allocation rule, the probe shortcut, and the method on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from slimbench.methods.lowrank.asvd import ASVDConfig, Prober, search_allocation
from slimbench.methods.lowrank.factorize import FactorizedLinear

from slimbench.method import MethodContext
from slimbench.modeling import count_parameters, get_weight, iter_linears, set_weight
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec
from tests.test_lowrank import shared_tokenizer


def test_allocation_cuts_insensitive_layers_deeply_and_leaves_sensitive_ones_dense():
    shapes = {"q": (10, 10), "v": (10, 10), "mlp": (10, 30)}
    sens = {
        "q": {0.9: 1.0, 0.5: 1.01, 0.2: 1.02},  # barely matters, even cut deep
        "v": {0.9: 5.0, 0.5: 50.0},  # matters a lot
        "mlp": {0.9: 1.1, 0.5: 1.5, 0.2: 3.0},
    }
    kept, threshold = search_allocation(sens, shapes, ratio=0.2)
    total = 100 + 100 + 300
    params = sum(kept[n] * shapes[n][0] * shapes[n][1] for n in shapes)
    assert params <= 0.8 * total
    assert kept["v"] == 1.0  # the sensitive layer stays dense
    assert kept["q"] == 0.2  # all of q's candidates are below the threshold: its deepest one wins
    assert kept["mlp"] == 0.9
    assert threshold == 1.1  # the entry that made the budget fit: q at 0.2 alone was not enough


def test_allocation_reports_an_unreachable_budget():
    with pytest.raises(ValueError, match="cannot remove 90%"):
        search_allocation({"a": {0.5: 1.0}}, {"a": (4, 4)}, ratio=0.9)


def test_search_config_checks():
    with pytest.raises(ValidationError, match="explicit rank"):
        ASVDConfig(rank=4, allocation="search")
    assert ASVDConfig(rank=4).allocation == "uniform"  # a rank alone means one rank everywhere
    with pytest.raises(ValidationError, match="search_ratios"):
        ASVDConfig(search_ratios=[0.5, 1.0])
    with pytest.raises(ValidationError, match="probe_samples"):
        ASVDConfig(calib_samples=1, probe_samples=2)
    assert ASVDConfig(rank=4, allocation="uniform").rank == 4


def test_probe_shortcut_equals_a_full_forward(tiny_lm):
    """Replaying the dense outputs of the layers before the changed one gives exactly the
    perplexity of the whole model with that change (Llama, GPT-2 and OPT layouts)."""
    torch.manual_seed(0)
    probe = torch.randint(0, 1000, (2, 12))
    prober = Prober(tiny_lm, probe)
    full = math.exp(float(tiny_lm.token_nll(probe).double().mean()))
    assert prober.base == pytest.approx(full, rel=1e-6)
    name, mod = [(n, m) for n, m in iter_linears(tiny_lm.model) if n.split(".")[-1] not in ("lm_head",)][-1]
    w = get_weight(mod).clone()
    set_weight(mod, w * 0.3)  # a change inside the last decoder layer
    start = prober.layer_index(name)
    assert start == 1
    changed = math.exp(float(tiny_lm.token_nll(probe).double().mean()))
    assert prober.perplexity(start) == pytest.approx(changed, rel=1e-6)
    assert changed != pytest.approx(full, rel=1e-6)  # the change is visible, so the test can fail
    set_weight(mod, w)
    assert prober.perplexity(0) == pytest.approx(full, rel=1e-6)  # layers restored


def run_asvd(lm, **params):
    lm.tokenizer = shared_tokenizer()
    method = METHODS.get("asvd")
    cfg = method.config(**params)
    method.check(lm, cfg)
    return method.apply(lm, cfg, MethodContext(hardware=HardwareSpec(threads=1)))


def test_search_meets_the_budget_and_keeps_sensitive_layers_dense(tiny_llama):
    before = count_parameters(tiny_llama.model)
    shapes = {n: tuple(get_weight(m).shape) for n, m in iter_linears(tiny_llama.model)}
    rep = run_asvd(tiny_llama, ratio=0.3, calib_samples=2, calib_seqlen=16, probe_samples=1, probe_stop=None)
    d = rep.details
    assert d["allocation"] == "search" and d["weight_params_removed"] >= 0.3 - 1e-9
    factorized = {n for n, m in tiny_llama.model.named_modules() if isinstance(m, FactorizedLinear)}
    assert factorized == set(d["ranks"]) and set(d["dense_layers"]) == set(shapes) - factorized
    removed = sum(shapes[n][0] * shapes[n][1] - d["ranks"][n] * sum(shapes[n]) for n in factorized)
    assert count_parameters(tiny_llama.model) == before - removed
    # Every probe (all 9 candidates, no early stop) is in the record, and the chosen kept
    # fractions are those of the allocation rule applied to them.
    sens = {n: {float(r): p for r, p in v.items()} for n, v in d["search"]["sensitivity"].items()}
    assert all(len(v) == 9 for v in sens.values())
    kept, _ = search_allocation(sens, shapes, 0.3)
    assert kept == d["kept_fraction"]
    ids = torch.tensor([tiny_llama.encode("To be, or not to be, that is the question")])
    assert torch.isfinite(tiny_llama.logits(ids)).all()


def test_uniform_allocation_is_version_one(tiny_llama):
    """allocation: uniform factorizes every linear at the same ratio, as asvd version 1 did."""
    rep = run_asvd(tiny_llama, ratio=0.3, calib_samples=2, calib_seqlen=16, allocation="uniform")
    assert all(isinstance(tiny_llama.model.get_submodule(n), FactorizedLinear) for n in rep.details["ranks"])
    assert len(rep.details["ranks"]) == 14
