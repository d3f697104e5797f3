"""Low-rank factorization: exactness of the factorized layer, rank rules, whitening, the methods."""

from __future__ import annotations

import functools

import pytest
import torch
from pydantic import ValidationError
from slimbench.methods.lowrank.asvd import ASVDConfig, ChannelScale
from slimbench.methods.lowrank.factorize import (
    FactorizedLinear,
    build_factorized,
    load_factorized,
    rank_for_ratio,
    save_factorized,
    sensitivity_ranks,
    truncate_transformed,
)
from slimbench.methods.lowrank.svd import SVDConfig
from slimbench.methods.lowrank.svd_llm import CholeskyWhitening, SVDLLMConfig, cholesky_damped
from torch import nn

from slimbench.method import MethodContext
from slimbench.modeling import count_parameters, get_weight, iter_linears
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec, MethodSpec, StepSpec
from slimbench.zoo.models import gpt2_tokenizer

# one intra-op thread (conftest.one_torch_thread): the 2 shared cores are faster that way
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def linear_with(w: torch.Tensor, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(torch.arange(w.shape[0], dtype=torch.float64))
    return lin


def factorize_plain(lin: nn.Module, k: int) -> FactorizedLinear:
    _, left, right = truncate_transformed(get_weight(lin), None, None, k)
    return build_factorized(lin, left, right)


# -- the factorized layer ------------------------------------------------------------------
def test_full_rank_reproduces_layer_exactly():
    torch.manual_seed(0)
    lin = linear_with(torch.randn(7, 5))
    fac = factorize_plain(lin, 5)
    x = torch.randn(11, 5, dtype=torch.float64)
    torch.testing.assert_close(fac(x), lin(x), rtol=1e-12, atol=1e-12)


def test_rank_one_matrix_is_reproduced_at_rank_one():
    a = torch.tensor([[1, 2, 3, 4], [2, 4, 6, 8], [3, 6, 9, 12], [4, 8, 12, 16]], dtype=torch.float64)
    fac = factorize_plain(linear_with(a, bias=False), 1)
    assert fac.rank == 1
    torch.testing.assert_close(fac.effective_weight(), a, rtol=0, atol=1e-12)
    # the [k, n] and [m, k] factors are really rank-1 sized
    assert fac.down.weight.shape == (1, 4) and fac.up.weight.shape == (4, 1)


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_is_k_times_m_plus_n(bias):
    m, n, k = 12, 20, 3
    fac = factorize_plain(linear_with(torch.randn(m, n, dtype=torch.float64), bias=bias), k)
    assert sum(p.numel() for p in fac.parameters()) == k * (m + n) + (m if bias else 0)


def test_truncation_error_is_the_discarded_singular_values():
    """Eckart-Young: the rank-k error's squared Frobenius norm is the sum of the tail s_i^2."""
    torch.manual_seed(1)
    w = torch.randn(9, 14, dtype=torch.float64)
    s_ref = torch.linalg.svdvals(w)
    s, left, right = truncate_transformed(w, None, None, 4)
    torch.testing.assert_close(s, s_ref)
    assert torch.isclose(((w - left @ right) ** 2).sum(), (s_ref[4:] ** 2).sum())


@pytest.mark.parametrize("m,n,ratio", [(576, 576, 0.2), (1536, 576, 0.4), (64, 128, 0.5), (10, 10, 0.9)])
def test_rank_for_ratio_removes_at_least_ratio(m, n, ratio):
    k = rank_for_ratio(m, n, ratio)
    assert k * (m + n) <= (1 - ratio) * m * n or k == 1
    assert (k + 1) * (m + n) > (1 - ratio) * m * n  # and no larger rank would


# -- activation-aware variants ---------------------------------------------------------------
def correlated_inputs(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """Inputs living near a low-dimensional subspace, with a few large-magnitude channels."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(6, n, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, 6, generator=g, dtype=torch.float64) @ basis
    x += 0.05 * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    scale = torch.ones(n, dtype=torch.float64)
    scale[:4] = 20.0  # outlier channels, as in LLM activations
    return x * scale


def whitened_error(w: torch.Tensor, x: torch.Tensor, whitening, k: int) -> float:
    if whitening is None:
        _, left, right = truncate_transformed(w, None, None, k)
    else:
        state = whitening.new_state(w.shape[1])
        whitening.accumulate(state, x)
        t, undo, _ = whitening.transform(state)
        _, left, right = truncate_transformed(w, t, undo, k)
    return float(((x @ w.T - x @ (left @ right).T) ** 2).sum())


def test_activation_aware_variants_beat_plain_svd_on_correlated_inputs():
    torch.manual_seed(2)
    w = torch.randn(24, 32, dtype=torch.float64)
    x = correlated_inputs(32, 400)
    plain = whitened_error(w, x, None, 4)
    asvd = whitened_error(w, x, ChannelScale(0.5), 4)
    svdllm = whitened_error(w, x, CholeskyWhitening(1e-6), 4)
    assert asvd < plain
    assert svdllm < asvd  # whitening is optimal for the calibration output loss
    assert svdllm < 0.01 * plain


def test_svd_llm_output_error_equals_discarded_energy():
    """The defining property of truncation-aware whitening: loss = sum of discarded s_i^2."""
    torch.manual_seed(3)
    w = torch.randn(10, 16, dtype=torch.float64)
    x = correlated_inputs(16, 200, seed=3) + torch.randn(200, 16, dtype=torch.float64)
    wh = CholeskyWhitening(1e-6)
    state = wh.new_state(16)
    wh.accumulate(state, x)
    t, undo, info = wh.transform(state)
    assert info["damping"] == 0.0
    s, left, right = truncate_transformed(w, t, undo, 5)
    err = ((x @ w.T - x @ (left @ right).T) ** 2).sum()
    torch.testing.assert_close(err, (s[5:] ** 2).sum(), rtol=1e-8, atol=1e-8)


def test_cholesky_damping_only_when_not_positive_definite():
    x = torch.randn(3, 6, dtype=torch.float64)  # 3 tokens, 6 channels: X^T X has rank 3
    chol, lam = cholesky_damped(x.T @ x, 1e-6)
    assert lam > 0
    damped = x.T @ x + lam * float((x.T @ x).diagonal().mean()) * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(chol @ chol.T, damped)
    _, lam_pd = cholesky_damped(torch.eye(4, dtype=torch.float64), 1e-6)
    assert lam_pd == 0.0


# -- rank allocation ---------------------------------------------------------------------------
def test_sensitivity_allocation_spends_the_budget_where_energy_is():
    shapes = {"flat": (64, 64), "peaked": (64, 64)}
    spectra = {"flat": torch.ones(64), "peaked": torch.tensor([100.0, 80.0, 60.0] + [0.01] * 61)}
    ranks = sensitivity_ranks(spectra, shapes, ratio=0.6)
    budget = 0.4 * 2 * 64 * 64
    used = sum(r * 128 for r in ranks.values())
    assert used <= budget < used + 128  # within one rank unit of the budget
    assert ranks["peaked"] < ranks["flat"]
    assert ranks["peaked"] == 3  # exactly its three dominant directions: the rest buys nothing
    assert all(r <= 32 for r in ranks.values())  # never past break-even (64*64/128)


# -- the methods on tiny models ----------------------------------------------------------------
CALIB = {"calib_samples": 2, "calib_seqlen": 16}
METHOD_PARAMS = [
    ("svd", {"ratio": 0.3}),
    ("asvd", {"ratio": 0.3, "allocation": "uniform", **CALIB}),
    ("svd-llm", {"ratio": 0.3, **CALIB}),
    ("svd-llm", {"ratio": 0.3, "allocation": "sensitivity", **CALIB}),
]


@functools.cache
def shared_tokenizer():
    """One tokenizer object for every test model: calibration tokens are cached per tokenizer
    object, and tokenizing the calibration split anew takes ~20 s on the shared CI cores."""
    return gpt2_tokenizer()


def run_method(lm, name: str, params: dict):
    lm.tokenizer = shared_tokenizer()  # the same GPT-2 BPE (see shared_tokenizer)
    method = METHODS.get(name)
    cfg = method.config(**params)
    method.check(lm, cfg)
    return method.apply(lm, cfg, MethodContext(hardware=HardwareSpec(threads=1)))


@pytest.mark.parametrize("name,params", METHOD_PARAMS, ids=lambda v: v if isinstance(v, str) else "")
def test_method_really_shrinks_every_decoder_linear(tiny_lm, name, params):
    dense_linears = {n: tuple(get_weight(m).shape) for n, m in iter_linears(tiny_lm.model)}
    before = count_parameters(tiny_lm.model)
    ids = torch.tensor([tiny_lm.encode("To be, or not to be, that is the question")])
    rep = run_method(tiny_lm, name, params)
    assert rep.execution == "native"
    removed = 0
    for lname, (m, n) in dense_linears.items():
        mod = tiny_lm.model.get_submodule(lname)
        assert isinstance(mod, FactorizedLinear), lname
        assert mod.rank == rep.details["ranks"][lname]
        removed += m * n - mod.rank * (m + n)
    assert count_parameters(tiny_lm.model) == before - removed
    assert rep.details["weight_params_removed"] >= 0.3 - 1e-9 or params.get("allocation") == "sensitivity"
    assert torch.isfinite(tiny_lm.logits(ids)).all()


def test_calibrated_methods_fit_outputs_better_than_plain_svd(tiny_llama):
    """On a model, the whitened factorization keeps layer-0 outputs closer than plain SVD."""
    from tests.conftest import load_tiny

    ids = torch.tensor([tiny_llama.encode("Now is the winter of our discontent made glorious summer")])
    ref = tiny_llama.logits(ids)
    errs = {}
    for name in ("svd", "svd-llm"):
        lm = load_tiny("llama")
        params = {"ratio": 0.5} if name == "svd" else {"ratio": 0.5, "calib_samples": 4, "calib_seqlen": 32}
        run_method(lm, name, params)
        errs[name] = float(((lm.logits(ids) - ref) ** 2).mean())
    assert errs["svd-llm"] < errs["svd"]


def test_save_and_reload_gives_identical_logits(tiny_lm, tmp_path):
    run_method(tiny_lm, "svd", {"ratio": 0.4})
    ids = torch.tensor([tiny_lm.encode("Friends, Romans, countrymen, lend me your ears")])
    save_factorized(tiny_lm.model, tmp_path / "m", tiny_lm.tokenizer)
    again = load_factorized(tmp_path / "m")
    assert count_parameters(again) == count_parameters(tiny_lm.model)
    assert torch.equal(again(input_ids=ids).logits, tiny_lm.logits(ids))


def test_explicit_rank_and_targets(tiny_llama):
    mlp = {n for n, _ in iter_linears(tiny_llama.model) if ".mlp." in n}
    rep = run_method(tiny_llama, "svd", {"rank": 4, "targets": ["*.mlp.*"]})
    assert set(rep.details["ranks"]) == mlp and len(mlp) == 6
    assert isinstance(tiny_llama.model.model.layers[0].self_attn.q_proj, nn.Linear)  # not targeted: untouched
    assert set(rep.details["ranks"].values()) == {4}


def test_composes_with_quantization(tiny_llama):
    from slimbench.method import apply_method

    spec = MethodSpec(steps=(StepSpec(name="svd", params={"ratio": 0.3}), StepSpec(name="rtn", params={"bits": 8})))
    tiny_llama.tokenizer = shared_tokenizer()
    rec = apply_method(tiny_llama, spec, HardwareSpec(threads=1))
    assert [s["name"] for s in rec["steps"]] == ["svd", "rtn"]
    assert rec["execution"] == "simulated"  # the factors are fake-quantized
    assert rec["effective_bits"] < 16


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.1])
@pytest.mark.parametrize("cfg_cls", [SVDConfig, ASVDConfig, SVDLLMConfig])
def test_ratio_outside_open_unit_interval_is_rejected(cfg_cls, ratio):
    with pytest.raises(ValidationError, match="ratio"):
        cfg_cls(ratio=ratio)


def test_rank_and_ratio_together_or_with_sensitivity_are_rejected():
    with pytest.raises(ValidationError, match="either ratio or rank"):
        SVDConfig(ratio=0.3, rank=4)
    with pytest.raises(ValidationError, match="sensitivity"):
        SVDConfig(rank=4, allocation="sensitivity")
    with pytest.raises(ValidationError, match="give a ratio"):
        SVDConfig(ratio=None)


@pytest.mark.parametrize("name", ["svd", "asvd", "svd-llm"])
def test_rank_larger_than_layer_fails_check_naming_the_layer(tiny_llama, name):
    method = METHODS.get(name)
    msg = r"rank 40 exceeds min\(out, in\) = 32 of layer model\.layers\.0\.self_attn\.k_proj"
    with pytest.raises(ValueError, match=msg):
        method.check(tiny_llama, method.config(rank=40))


def test_targets_matching_nothing_fail_check(tiny_llama):
    with pytest.raises(ValueError, match="no linear layer matches"):
        METHODS.get("svd").check(tiny_llama, SVDConfig(targets=["*.nothing"]))
