"""Hadamard constructions, QuaRot / SpinQuant rotations and act-quant: each against its defining property."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from slimbench.methods.quantization import hadamard as hd
from slimbench.methods.quantization.act_quant import IntActLinear, quantize_tokens_int
from slimbench.methods.quantization.gptq import GPTQConfig, gptq_quantize
from slimbench.methods.quantization.grid import GridConfig, quantize_matrix, stored_form
from slimbench.methods.quantization.hqq import HQQConfig
from slimbench.methods.quantization.hqq import quantize_weight as hqq_weight
from slimbench.methods.quantization.rotation import ATTENTION, Rotation, fake_quantize_tokens, rotate_model
from slimbench.methods.quantization.spinquant import cayley_step
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from slimbench.devtools.contract import load_tiny
from slimbench.method import apply_method
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec, MethodSpec, StepSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- Hadamard matrices ---------------------------------------------------------------------------
@pytest.mark.parametrize("order", [2, 4, 8, *sorted(hd.base_orders())[:12]])
def test_every_construction_is_hadamard(order):
    h = hd.hadamard_plan(order).matrix()
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.t(), order * torch.eye(order))


@pytest.mark.parametrize("n,m", [(576, 36), (1536, 12), (192, 12), (640, 20), (2048, 1), (64, 1), (144 * 4, 36)])
def test_model_widths_and_their_fast_transform(n, m):
    plan = hd.hadamard_plan(n)
    assert (plan.m, plan.n) == (m, n) and plan.m * plan.p == n
    h = plan.matrix()
    assert torch.equal(h @ h.t(), n * torch.eye(n))
    x = torch.randn(3, n, dtype=torch.float64)
    hh = h.double() / n**0.5
    assert torch.allclose(hd.hadamard_matmul(x, plan), x @ hh, atol=1e-10)
    assert torch.allclose(hd.hadamard_matmul(x, plan, transpose=True), x @ hh.t(), atol=1e-10)


def test_a_product_of_two_known_orders():
    plan = hd.hadamard_plan(1200)  # 1200 = 16 * 75: no Paley order <= 260 with a power-of-two rest; 20 * 60 is
    assert plan.recipe == "paley1:19*paley2:29" and plan.m == 1200
    h = plan.matrix()
    assert torch.equal(h @ h.t(), 1200 * torch.eye(1200))


@pytest.mark.parametrize("n,why", [(100, "no known order"), (90, "multiples of 4"), (6, "multiples of 4"),
                                   (7, "multiples of 4")])
def test_widths_no_construction_covers_are_refused(n, why):
    with pytest.raises(ValueError, match=why):
        hd.hadamard_plan(n)


def test_fwht_is_sylvester():
    x = torch.randn(5, 32, dtype=torch.float64)
    assert torch.allclose(hd.fwht(x), x @ hd.sylvester(32).double(), atol=1e-10)


def test_rotation_modules_are_orthogonal_and_invert():
    for rot in (Rotation.hadamard(576, 3), Rotation(24, matrix=torch.linalg.qr(torch.randn(24, 24))[0])):
        r = rot.dense().double()
        assert torch.allclose(r.t() @ r, torch.eye(rot.n, dtype=torch.float64), atol=1e-5)
        x = torch.randn(4, rot.n)
        assert torch.allclose(rot.inverse(rot(x)), x, atol=1e-5)


# -- QuaRot keeps the function -------------------------------------------------------------------
def _scramble_norms(model):
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.copy_(torch.rand(p.shape, generator=g) + 0.5)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_quarot_keeps_tiny_llama_logits():
    lm = load_tiny("llama")
    _scramble_norms(lm.model)
    ids = torch.randint(0, 1000, (2, 48))
    ref = _logits(lm.model, ids)
    rep = apply_method(lm, MethodSpec(steps=(StepSpec(name="quarot", params={}),)), HardwareSpec(threads=1))
    assert rep["steps"][0]["execution"] == "native"
    assert torch.allclose(_logits(lm.model, ids), ref, atol=1e-5)
    # the rotation really happened: a reading weight changed, and the KV cache path still works
    assert lm.model.model.layers[0].self_attn.o_rotation is not None
    assert lm.greedy(ids[:1, :8], 4).shape == (1, 4)


def test_quarot_keeps_gemma3_logits_with_sandwich_norms():
    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=80, intermediate_size=192, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if "norm" in name:  # Gemma's (1 + w): include w = -1, a zero scale that cannot be divided out
            p.data.copy_(torch.rand(p.shape, generator=g) - 0.5)
            p.data.view(-1)[0] = -1.0
    ids = torch.randint(0, 300, (2, 24))
    ref = _logits(model, ids)
    online = copy.deepcopy(model)
    rotate_model(model, Rotation.hadamard(80, 0), seed=0)  # 80 = 20 * 4: a Paley I factor
    out = _logits(model, ids)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, ref, atol=1e-5)
    # online residual mode (quarot's default on Gemma): norm scales kept, pre-norm outputs rotated
    rotate_model(online, Rotation.hadamard(80, 0), seed=0, residual="online")
    assert online.model.layers[0].input_layernorm.inner.weight.abs().max() > 0  # scales kept
    assert torch.allclose(_logits(online, ids), ref, atol=1e-5)


@pytest.mark.parametrize("residual,wrapped", [("online", "input_layernorm"), ("fused", "post_feedforward_layernorm")])
def test_rotated_gemma3_is_rebuilt_exactly_by_the_artifact_format(tmp_path, residual, wrapped):
    """Gemma 3's rotations wrap norms (the pre-norms online, the post-norms fused) and route attention
    through the rotations and a 4-bit KV cache; the artifact format rebuilds all of it, rotations
    shared as before."""
    from types import SimpleNamespace

    from slimbench.methods.quantization.act_quant import quantize_kv

    from slimbench.sweep.artifacts import serialize

    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=80, intermediate_size=192, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    rotate_model(model, Rotation.hadamard(80, 0), seed=0, residual=residual)
    quantize_kv(model, 4, 0.95)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    layout = serialize.save(SimpleNamespace(model=model, cache_factory=None, generator=None), {}, tmp_path)
    rebuilt = serialize.load(tmp_path, json.loads(json.dumps(layout)))
    layers = rebuilt.model.layers
    assert layers[0].self_attn.route.kv_bits == 4 and layers[1].self_attn.config._attn_implementation == ATTENTION
    assert layers[0].mlp.down_rotation is layers[1].mlp.down_rotation  # one rotation, as QuaRot made it
    assert type(getattr(layers[0], wrapped)).__name__ == "RotateOutput"
    assert torch.equal(_logits(rebuilt, ids), _logits(model, ids))


def test_auto_int_kernel_only_for_8bit_activations():
    steps = (StepSpec(name="rtn", params={"bits": 4, "symmetric": True}),)
    for a_bits, kernels in ((8, {"int_mm": 14, "fake": 0}), (4, {"int_mm": 0, "fake": 14})):
        lm = load_tiny("llama")
        act = StepSpec(name="act-quant", params={"a_bits": a_bits})
        rep = apply_method(lm, MethodSpec(steps=(*steps, act)), HardwareSpec(threads=1))
        assert rep["steps"][-1]["details"]["kernels"] == kernels


def test_quarot_refuses_layernorm_models_and_uncovered_widths():
    for arch in ("opt", "gpt2"):
        lm = load_tiny(arch)
        with pytest.raises(ValueError, match="RMSNorm"):
            METHODS.get("quarot").check(lm, METHODS.get("quarot").config())
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=100, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="intermediate size: width 100"):
        METHODS.get("quarot").check_config(cfg, METHODS.get("quarot").config())


def test_rotation_spreads_an_outlier_for_4bit_activations():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 576, generator=g)
    x[:, 7] *= 60  # one outlier channel, as SmolLM2's down_proj inputs have
    rot = Rotation.hadamard(576, 0)
    plain = (fake_quantize_tokens(x, 4, 1.0, True) - x).square().sum()
    rotated = (rot.inverse(fake_quantize_tokens(rot(x), 4, 1.0, True)) - x).square().sum()
    assert rotated < 0.25 * plain


# -- composition rules ---------------------------------------------------------------------------
def test_composition_rules_for_rotation():
    quarot, rtn, act = METHODS.get("quarot"), METHODS.get("rtn"), METHODS.get("act-quant")
    assert rtn.chain_problem([quarot]) is None
    assert act.chain_problem([quarot, METHODS.get("gptq")]) is None
    assert "may not follow rtn" in quarot.chain_problem([rtn])
    assert "may not follow magnitude" in quarot.chain_problem([METHODS.get("magnitude")])
    assert METHODS.get("spinquant").family == "rotation"


# -- act-quant: the integer kernel computes what fake quantization says ---------------------------
def _reference(x, w, bits):
    xq, xs = quantize_tokens_int(x, bits, 1.0)
    return (xq.float() * xs) @ w.t()


@pytest.mark.parametrize("kind", ["per_channel_sym", "g32_asym", "act_order_g_idx", "hqq_float_zero"])
@pytest.mark.parametrize("a_bits", [8, 4])
def test_int_kernel_matches_fake_quantization(kind, a_bits):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=g) * 0.1
    if kind == "per_channel_sym":
        codes, dense, p = quantize_matrix(w, GridConfig(bits=4, symmetric=True))
        parts = stored_form(codes, p)
    elif kind == "g32_asym":
        codes, dense, p = quantize_matrix(w, GridConfig(bits=4, group_size=32))
        parts = stored_form(codes, p)
    elif kind == "act_order_g_idx":
        x = torch.randn(400, 128, generator=g) * torch.linspace(0.1, 3, 128)
        res = gptq_quantize(w, 2 * x.t() @ x / 400, GPTQConfig(bits=4, group_size=32, act_order=True))
        assert res.g_idx is not None
        dense, parts = res.weight, {**stored_form(res.codes, res.params), "g_idx": res.g_idx.to(torch.int16)}
    else:
        dense, parts, _ = hqq_weight(w, HQQConfig(bits=4, group_size=32))
    lin = torch.nn.Linear(128, 48, bias=True)
    lin.weight.data.copy_(dense)
    mod = IntActLinear.from_form(lin, parts, a_bits, 1.0)
    assert torch.allclose(mod.dequantized_weight(), dense, atol=1e-6)
    x = torch.randn(7, 128, generator=g)
    assert torch.allclose(mod(x), _reference(x, dense, a_bits) + lin.bias.data, atol=1e-4, rtol=1e-4)


def test_w4a8_chain_runs_the_int_kernel_and_w4a4_is_labelled_simulated():
    steps = [StepSpec(name="quarot", params={}), StepSpec(name="rtn", params={"bits": 4, "symmetric": True})]
    for a_bits, kv in ((8, 16), (4, 4)):
        lm = load_tiny("llama")
        act = StepSpec(name="act-quant", params={"a_bits": a_bits, "kv_bits": kv, "int_kernel": "always"})
        rep = apply_method(lm, MethodSpec(steps=(*steps, act)), HardwareSpec(threads=1))
        last = rep["steps"][-1]
        assert last["details"]["kernels"] == {"int_mm": 14, "fake": 0}
        assert last["execution"] == ("native" if a_bits == 8 else "simulated")
        assert sum(isinstance(m, IntActLinear) for m in lm.model.modules()) == 14
        assert rep["effective_bits"] < 4.3  # the stored 4-bit form, not an int8 copy
        assert torch.isfinite(_logits(lm.model, torch.randint(0, 1000, (1, 16)))).all()


def test_kv_quantization_changes_attention_only_slightly():
    lm = load_tiny("llama")
    ids = torch.randint(0, 1000, (1, 32))
    ref = _logits(lm.model, ids)
    apply_method(lm, MethodSpec(steps=(StepSpec(name="act-quant", params={"a_bits": 16, "kv_bits": 8}),)),
                 HardwareSpec(threads=1))
    out = _logits(lm.model, ids)
    assert 0 < (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_fake_quantized_tokens_hold_at_most_2_to_the_bits_levels():
    x = torch.randn(6, 256)
    for sym in (True, False):
        q = fake_quantize_tokens(x, 4, 0.9, sym)
        assert max(len(row.unique()) for row in q) <= 16


# -- SpinQuant -------------------------------------------------------------------------------------
def test_cayley_steps_stay_orthogonal_and_descend():
    torch.manual_seed(0)
    target = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    r = torch.eye(16, dtype=torch.float64)
    loss = [float((r - target).square().sum())]
    for _ in range(30):
        r = cayley_step(r, 2 * (r - target), 0.2)
        loss.append(float((r - target).square().sum()))
    assert torch.allclose(r.t() @ r, torch.eye(16, dtype=torch.float64), atol=1e-10)
    assert loss[-1] < 0.5 * loss[0]


def test_spinquant_learns_a_rotation_and_keeps_logits():
    lm = load_tiny("llama")
    _scramble_norms(lm.model)
    ids = torch.randint(0, 1000, (2, 40))
    ref = _logits(lm.model, ids)
    params = {"steps": 3, "calib_samples": 3, "calib_seqlen": 48}
    rep = apply_method(lm, MethodSpec(steps=(StepSpec(name="spinquant", params=params),)), HardwareSpec(threads=1))
    d = rep["steps"][0]["details"]
    assert len(d["losses"]) == 3 and d["orthogonality_error"] < 1e-6
    learned = lm.model.model.embed_tokens.rotation.matrix
    assert not torch.allclose(learned, Rotation.hadamard(64, 0).dense(), atol=1e-4)  # it moved
    assert torch.allclose(_logits(lm.model, ids), ref, atol=1e-4)
