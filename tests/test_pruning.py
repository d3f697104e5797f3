"""The pruning family: masks, magnitude, Wanda, SparseGPT, structured pruning, the sparse format, recovery.

Every property is checked against an independent computation in the test (sorting, explicit
group counts, reconstruction errors, a model with the removed structures zeroed instead).
"""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from slimbench.methods.pruning import sparse_format
from slimbench.methods.pruning.masks import build_mask, global_masks, mask_nm
from slimbench.methods.pruning.sparsegpt import SparseGPTConfig, SparseGPTLayer, fasterprune
from slimbench.methods.pruning.wanda import WandaConfig, WandaLayer
from slimbench.methods.quantization.grid import find_params
from transformers import AutoModelForCausalLM

from slimbench.calibration import sample_calibration
from slimbench.method import MethodContext, apply_method
from slimbench.modeling import count_parameters, get_weight, iter_linears
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec, MethodSpec, StepSpec
from tests.conftest import load_tiny

CTX = MethodContext(hardware=HardwareSpec(threads=2))
CALIB = {"calib_samples": 4, "calib_seqlen": 32}
_TOKENIZER = []


def shared_tokenizer(lm):
    """One tokenizer object for every tiny model, so the calibration split is tokenized once."""
    if not _TOKENIZER:
        _TOKENIZER.append(lm.tokenizer)
    lm.tokenizer = _TOKENIZER[0]
    return lm


def tiny(arch: str):
    return shared_tokenizer(load_tiny(arch))


def run(lm, name: str, **params):
    method = METHODS.get(name)
    cfg = method.config(**params)
    if method.check:
        method.check(lm, cfg)
    return method.apply(lm, cfg, CTX)


def ids(n: int = 24) -> torch.Tensor:
    return torch.randint(0, 5000, (1, n), generator=torch.Generator().manual_seed(1))


def weights(lm) -> dict[str, torch.Tensor]:
    return {n: get_weight(m).clone() for n, m in iter_linears(lm.model)}


# -- masks -----------------------------------------------------------------------------------
def test_row_and_layer_masks_prune_exactly_the_lowest():
    s = torch.randn(16, 40)
    keep = build_mask(s, 0.3, None, "row")
    k = round(0.3 * 40)
    assert ((~keep).sum(dim=1) == k).all()
    kth = torch.sort(s, dim=1).values[:, k - 1 : k]  # the k-th smallest of each row, by sorting
    assert (s[~keep].view(16, k) <= kth).all() and (s[keep].view(16, -1) > kth).all()
    keep = build_mask(s, 0.3, None, "layer")
    assert int((~keep).sum()) == round(0.3 * s.numel())
    assert s[~keep].max() < s[keep].min()


def test_nm_mask_keeps_the_n_largest_of_every_group():
    s = torch.randn(8, 32)
    for n, m in ((2, 4), (4, 8), (1, 4)):
        keep = mask_nm(s, n, m)
        groups, kept = s.view(8, -1, m), keep.view(8, -1, m)
        assert (kept.sum(dim=2) == n).all()
        nth = torch.sort(groups, dim=2, descending=True).values[..., n - 1 : n]
        assert (groups[kept].view(8, -1, n) >= nth).all()


def test_global_mask_total_is_exact_and_one_threshold():
    scores = {"a": torch.rand(10, 10), "b": torch.rand(20, 5) * 2}
    keep = global_masks(scores, 0.4)
    assert sum(int((~k).sum()) for k in keep.values()) == round(0.4 * 200)
    pruned = torch.cat([scores[n][~keep[n]] for n in scores])
    kept = torch.cat([scores[n][keep[n]] for n in scores])
    assert pruned.max() < kept.min()


# -- magnitude ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_sparsity_equals_target_in_every_layer(tiny_llama, sparsity):
    before = weights(tiny_llama)
    run(tiny_llama, "magnitude", sparsity=sparsity)
    for name, w in weights(tiny_llama).items():
        assert int((w == 0).sum()) == round(sparsity * w.numel()), name
        kept, pruned = before[name][w != 0].abs(), before[name][w == 0].abs()
        if pruned.numel():
            assert pruned.max() <= kept.min()
        assert torch.equal(w[w != 0], before[name][w != 0])  # no weight update


def test_magnitude_global_ranks_across_layers(tiny_llama):
    before = weights(tiny_llama)
    run(tiny_llama, "magnitude", sparsity=0.5, scope="global")
    after = weights(tiny_llama)
    total = sum(w.numel() for w in after.values())
    assert sum(int((w == 0).sum()) for w in after.values()) == round(0.5 * total)
    pruned = torch.cat([before[n][after[n] == 0].abs() for n in after])
    kept = torch.cat([before[n][after[n] != 0].abs() for n in after])
    assert pruned.max() <= kept.min()
    assert len({round(float((w == 0).float().mean()), 3) for w in after.values()}) > 1  # layers differ


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_every_group_holds_at_most_n_nonzeros(tiny_llama, name, pattern):
    shared_tokenizer(tiny_llama)
    params = {} if name == "magnitude" else CALIB
    rep = run(tiny_llama, name, pattern=pattern, **params)
    n, m = (int(x) for x in pattern.split(":"))
    for layer, w in weights(tiny_llama).items():
        nonzero = (w.view(w.shape[0], -1, m) != 0).sum(dim=2)
        assert int(nonzero.max()) <= n, layer
        assert int((w == 0).sum()) == w.numel() * (m - n) // m, layer  # random weights: exactly N kept
    assert rep.details["achieved_sparsity"] == pytest.approx(1 - n / m)
    assert rep.execution == "simulated"


# -- Wanda ----------------------------------------------------------------------------------
def test_wanda_with_equal_input_norms_is_per_row_magnitude():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 12, bias=False)
    w0 = lin.weight.data.clone()
    layer = WandaLayer(lin, WandaConfig(sparsity=0.5))
    x = torch.randint(0, 2, (64, 32)).float() * 2 - 1  # ±1: every input column has norm 8
    layer.add_batch(x, lin(x))
    layer.compress()
    k = 16
    thresh = torch.sort(w0.abs(), dim=1).values[:, k - 1 : k]
    expected = w0 * (w0.abs() > thresh)
    assert torch.equal(lin.weight.data, expected)


def test_wanda_scores_by_activation_norm():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4, bias=False)
    w0 = lin.weight.data.clone()
    layer = WandaLayer(lin, WandaConfig(sparsity=0.5))
    x = torch.randn(100, 8) * torch.tensor([10.0, 1, 1, 1, 0.1, 0.1, 5, 5])
    layer.add_batch(x[:50], lin(x[:50]))
    layer.add_batch(x[50:], lin(x[50:]))  # streamed in two batches
    layer.compress()
    score = w0.abs() * x.norm(dim=0)
    expected_keep = score >= torch.sort(score, dim=1).values[:, 4:5]
    assert torch.equal(lin.weight.data != 0, expected_keep)


# -- SparseGPT --------------------------------------------------------------------------------
def correlated_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(64, 64, generator=g) / 8 + torch.eye(64)
    # Correlated channels of uneven scale, the scales in random order: SparseGPT picks its mask
    # per block of columns, so scales sorted by column would force 50% into the loudest block.
    scales = torch.linspace(0.2, 3, 64)[torch.randperm(64, generator=g)]
    x = torch.randn(1024, 64, generator=g) @ mix * scales
    w = torch.randn(48, 64, generator=g)
    return w, x


def recon_error(w, w_new, x) -> float:
    return float(((x @ w.t() - x @ w_new.t()) ** 2).sum())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(pattern):
    w, x = correlated_problem()
    nm = None if pattern == "unstructured" else (2, 4)
    errors = {}
    for name in ("magnitude", "wanda"):
        score = w.abs() * (x.norm(dim=0) if name == "wanda" else 1)
        errors[name] = recon_error(w, w * build_mask(score, 0.5, nm, "row"), x)
    lin = torch.nn.Linear(64, 48, bias=False)
    lin.weight.data.copy_(w)
    layer = SparseGPTLayer(lin, SparseGPTConfig(sparsity=0.5, pattern=pattern, blocksize=16))
    layer.add_batch(x[:512], lin(x[:512]))
    layer.add_batch(x[512:], lin(x[512:]))
    stats = layer.compress()
    w_sgpt = lin.weight.data
    assert int((w_sgpt == 0).sum()) == w.numel() // 2 and stats["sparsity"] == 0.5
    errors["sparsegpt"] = recon_error(w, w_sgpt, x)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_sparsegpt_joint_quantization_keeps_values_on_the_grid():
    w, x = correlated_problem(1)
    h = 2 * x.t() @ x / x.shape[0]
    quant = find_params(w, 4, False)
    w_new, keep, _ = fasterprune(w, h, 0.5, None, 32, 0.01, quant)
    assert (w_new[~keep] == 0).all() and int((~keep).sum()) == w.numel() // 2
    codes = w_new / quant.scale + quant.zero
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # every weight is a grid point
    assert int(codes.round().max()) <= 15 and int(codes.round().min()) >= 0


# -- sparse storage format ----------------------------------------------------------------------------
@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_sparse_format_round_trip_is_exact_and_counts_real_bytes(nm):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g)
    w = w * (build_mask(w.abs(), 0.5, nm, "row"))
    parts = sparse_format.encode_nm(w, *nm) if nm else sparse_format.encode_unstructured(w)
    assert torch.equal(sparse_format.decode(parts), w)
    if nm:
        assert parts["values"].numel() == w.numel() * nm[0] // nm[1]
        assert parts["indices"].numel() == -(-parts["values"].numel() * sparse_format.index_bits(nm[1]) // 8)
    else:
        assert parts["bitmask"].numel() == w.numel() // 8 and parts["values"].numel() == int((w != 0).sum())


def test_sparse_format_quantized_round_trip():
    w, x = correlated_problem(2)
    quant = find_params(w, 3, False)
    w_new, _, _ = fasterprune(w, 2 * x.t() @ x / len(x), 0.5, (2, 4), 16, 0.01, quant)
    for parts in (
        sparse_format.encode_unstructured(w_new, quant=quant),
        sparse_format.encode_nm(w_new, 2, 4, quant=quant),
    ):
        assert torch.equal(sparse_format.decode(parts), w_new)


def test_reloading_the_stored_form_gives_the_same_outputs(tiny_lm):
    rep = run(tiny_lm, "magnitude", pattern="2:4")
    fresh = load_tiny(tiny_lm.model.config.model_type)
    assert not torch.equal(fresh.logits(ids()), tiny_lm.logits(ids()))
    sparse_format.load_storage(fresh.model, rep.storage)
    assert torch.equal(fresh.logits(ids()), tiny_lm.logits(ids()))


# -- every method on every tiny architecture, through the harness ------------------------------
PRUNERS = [
    ("magnitude", {"sparsity": 0.5}),
    ("magnitude", {"pattern": "2:4", "scope": "row"}),
    ("wanda", {"sparsity": 0.5, **CALIB}),
    ("sparsegpt", {"pattern": "4:8", "bits": 4, **CALIB}),
    ("structured", {"mlp_ratio": 0.25, "drop_layers": 1, **CALIB}),
]


@pytest.mark.parametrize(("name", "params"), PRUNERS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(PRUNERS)])
def test_every_pruner_runs_on_every_tiny_architecture(tiny_lm, name, params):
    shared_tokenizer(tiny_lm)
    params_before = count_parameters(tiny_lm.model)
    report = apply_method(tiny_lm, MethodSpec(steps=(StepSpec(name=name, params=params),)), CTX.hardware)
    assert torch.isfinite(tiny_lm.logits(ids())).all()
    if name == "structured":
        assert report["execution"] == "native" and report["parameters"] < params_before
    else:
        assert report["execution"] == "simulated"
        assert report["sparsity_layer_min"] >= 0.5 - 1e-9 and report["sparsity"] < 0.6
        dense_bits = 32
        assert report["effective_bits"] < dense_bits * 0.6  # the sparse format's real bytes


# -- structured --------------------------------------------------------------------------------
def test_structured_at_zero_leaves_outputs_identical(tiny_lm):
    ref = tiny_lm.logits(ids())
    rep = run(tiny_lm, "structured")
    assert torch.equal(tiny_lm.logits(ids()), ref)
    assert rep.details["parameters_after"] == rep.details["parameters_before"]


def matching_rows(small: torch.Tensor, big: torch.Tensor) -> list[int]:
    """Index in ``big`` of each row of ``small`` (rows are unique in random weights)."""
    return [int(torch.nonzero((big == row).all(dim=1))[0]) for row in small]


def test_structured_mlp_and_heads_equal_zeroing_them(tiny_llama):
    """Removing channels/KV groups computes what the full model computes with them zeroed."""
    ref_model = copy.deepcopy(tiny_llama.model)
    run(tiny_llama, "structured", mlp_ratio=0.5, attn_ratio=0.5, importance="magnitude")
    cfg = tiny_llama.model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (2, 1, 16, 64)
    for small, big in zip(tiny_llama.model.model.layers, ref_model.model.layers, strict=True):
        ch = matching_rows(small.mlp.up_proj.weight, big.mlp.up_proj.weight)
        gone = sorted(set(range(128)) - set(ch))
        big.mlp.down_proj.weight.data[:, gone] = 0
        q_rows = matching_rows(small.self_attn.q_proj.weight, big.self_attn.q_proj.weight)
        gone_q = sorted(set(range(64)) - set(q_rows))
        assert len(gone_q) == 32 and gone_q in (list(range(32)), list(range(32, 64)))  # one whole KV group
        big.self_attn.o_proj.weight.data[:, gone_q] = 0
    with torch.no_grad():
        expected = ref_model(input_ids=ids()).logits
    assert torch.allclose(tiny_llama.logits(ids()), expected, atol=1e-5)


def test_structured_smaller_model_saves_reloads_and_generates(tiny_llama, tmp_path):
    shared_tokenizer(tiny_llama)
    before = count_parameters(tiny_llama.model)
    rep = run(tiny_llama, "structured", mlp_ratio=0.25, attn_ratio=0.5, drop_layers=1, **CALIB)
    assert count_parameters(tiny_llama.model) == rep.details["parameters_after"] < before
    assert tiny_llama.model.config.num_hidden_layers == 1 and len(tiny_llama.model.model.layers) == 1
    tiny_llama.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert sum(p.numel() for p in reloaded.parameters()) == count_parameters(tiny_llama.model)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids()).logits, tiny_llama.logits(ids()), atol=1e-5)
    assert tiny_llama.greedy(ids(8), 4).shape == (1, 4)  # the KV cache works with renumbered layers


def test_block_influence_matches_hidden_states(tiny_llama):
    shared_tokenizer(tiny_llama)
    cfg = METHODS.get("structured").config(drop_layers=1, **CALIB)
    calib, _ = sample_calibration(tiny_llama, cfg)
    cos = []
    with torch.no_grad():
        for x in calib:
            hs = tiny_llama.model(input_ids=x.unsqueeze(0), output_hidden_states=True).hidden_states
            cos.append(torch.nn.functional.cosine_similarity(hs[0][0].double(), hs[1][0].double(), dim=-1))
    expected_bi0 = 1 - float(torch.cat(cos).mean())
    rep = METHODS.get("structured").apply(tiny_llama, cfg, CTX)
    assert rep.details["block_influence"]["0"] == pytest.approx(expected_bi0, abs=1e-5)
    bi = rep.details["block_influence"]
    assert rep.details["dropped_layers"] == [int(min(bi, key=bi.get))]


# -- recovery fine-tuning ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_pruned_weights_stay_zero_after_finetuning(tiny_llama, mode):
    shared_tokenizer(tiny_llama)
    run(tiny_llama, "magnitude", pattern="2:4")
    before = weights(tiny_llama)
    rep = run(
        tiny_llama,
        "finetune",
        mode=mode,
        steps=3,
        batch_size=2,
        lr=1e-2,
        calib_samples=8,
        calib_seqlen=32,
        eval_samples=2,
    )
    after = weights(tiny_llama)
    for name, w in after.items():
        assert torch.equal(w == 0, before[name] == 0), name  # same zeros, no more, no less
    changed = sum(not torch.equal(after[n], before[n]) for n in after)
    assert changed == len(after)  # training did move the kept weights
    d = rep.details
    assert (d["steps"], d["tokens"]) == (3, 3 * 2 * 32)
    assert d["masked_layers"] == len(after) and d["pruned_weights_revived"] == 0
    # storage was re-encoded from the trained weights, in the 2:4 format
    key = next(iter(rep.storage))
    assert "nm" in rep.storage[key]
    name = key.removesuffix(".weight")
    assert torch.equal(sparse_format.decode(rep.storage[key]), after[name])


def test_finetune_respects_the_token_budget_and_composes(tiny_llama):
    shared_tokenizer(tiny_llama)
    spec = MethodSpec(
        steps=(
            StepSpec(name="wanda", params={"sparsity": 0.5, **CALIB}),
            StepSpec(
                name="finetune",
                params={
                    "steps": 50,
                    "max_tokens": 100,
                    "batch_size": 1,
                    "calib_samples": 6,
                    "calib_seqlen": 32,
                    "eval_samples": 2,
                },
            ),
        )
    )
    report = apply_method(tiny_llama, spec, CTX.hardware)
    ft = report["steps"][1]["details"]
    assert ft["tokens"] == 128 and ft["steps"] == 4  # stops at the first step past 100 tokens
    assert report["sparsity_layer_min"] == pytest.approx(0.5)
    assert report["execution"] == "simulated"


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("magnitude", {"sparsity": 1.0}, "less than 1"),
        ("wanda", {"sparsity": -0.1}, "greater than or equal to 0"),
        ("sparsegpt", {"pattern": "4:2"}, "must not exceed M"),
        ("magnitude", {"pattern": "2-4"}, "'N:M'"),
        ("magnitude", {"pattern": "2:4", "sparsity": 0.3}, "fixes sparsity at 0.5"),
        ("magnitude", {"pattern": "2:4", "scope": "global"}, "scope 'global'"),
        ("structured", {"mlp_ratio": 1.0}, "less than 1"),
    ],
)
def test_bad_config_fails_at_validation(name, params, message):
    with pytest.raises(ValidationError, match=message):
        METHODS.get(name).config(**params)


@pytest.mark.parametrize(
    ("arch", "params", "message"),
    [
        ("llama", {"mlp_ratio": 0.999}, "would remove all 128 MLP channels"),
        ("llama", {"attn_ratio": 0.9}, "would remove all 2 KV groups"),
        ("llama", {"drop_layers": 2}, "every one of the 2 decoder layers"),
        ("gpt2", {"attn_ratio": 0.5}, "Llama-shaped models only"),
    ],
)
def test_structured_settings_that_remove_everything_fail_at_check(arch, params, message):
    lm = load_tiny(arch)
    method = METHODS.get("structured")
    with pytest.raises(ValueError, match=message):
        method.check(lm, method.config(**params))


def test_nm_needs_input_dims_divisible_by_m(tiny_llama):
    method = METHODS.get("magnitude")
    with pytest.raises(ValueError, match="not a multiple of 3"):
        method.check(tiny_llama, method.config(pattern="1:3"))


def test_finetune_stores_a_layer_with_stray_zeros_dense(tiny_llama):
    """A dequantized checkpoint's few exact zeros stay zero, but the layer is cheaper stored dense."""
    shared_tokenizer(tiny_llama)
    layer = tiny_llama.model.model.layers[0].mlp.up_proj
    layer.weight.data[0, :3] = 0
    rep = run(tiny_llama, "finetune", steps=1, batch_size=1, calib_samples=3, calib_seqlen=32, eval_samples=1)
    assert set(rep.storage["model.layers.0.mlp.up_proj.weight"]) == {"dense"}
    assert (layer.weight.data[0, :3] == 0).all() and rep.details["masked_layers"] == 1
