"""The HQQ-vs-RTN damage tool: its output error against a plain recomputation, and its column swap."""

from __future__ import annotations

import torch

from slimbench.devtools import hqq_damage


def test_output_error_is_the_relative_error_of_the_layer_outputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g) * torch.linspace(0.1, 5, 16)  # uneven channel energies
    w = torch.randn(8, 16, generator=g)
    wq = w + 0.05 * torch.randn(8, 16, generator=g)
    werr, oerr = hqq_damage.errors(w, wq, x.double().t() @ x.double())
    assert abs(werr - float(((wq - w) ** 2).sum() / (w**2).sum())) < 1e-9
    plain = float(((x @ (wq - w).t()) ** 2).sum() / ((x @ w.t()) ** 2).sum())
    assert abs(oerr - plain) < 1e-6 * plain


def test_column_swap_takes_one_column_from_the_other_quantizer():
    lin = torch.nn.Linear(4, 3, bias=False)
    model = torch.nn.Sequential(lin)
    weights = {"0": {q: torch.full((3, 4), v) for q, v in (("fp", 0.0), ("rtn", 1.0), ("hqq", 2.0))}}
    hqq_damage.set_weights(model, weights, lambda n: "hqq", ({"0": 2}, lambda n: "rtn"))
    assert lin.weight[:, 2].eq(1.0).all() and lin.weight[:, [0, 1, 3]].eq(2.0).all()
    hqq_damage.set_weights(model, weights, lambda n: "rtn")
    assert lin.weight.eq(1.0).all()
    stats = hqq_damage.top_column_stats({"m.v_proj": {"fp": torch.tensor([[0.01, 1.0]]),
                                                      "rtn": torch.tensor([[0.0, 1.0]]),
                                                      "hqq": torch.tensor([[0.03, 1.0]])}}, {"m.v_proj": 0}, "v_proj")
    assert stats["rtn zero share"] == 1.0 and stats["hqq zero share"] == 0.0
    assert abs(stats["hqq mean |err|"] - 0.02) < 1e-6 and abs(stats["rtn mean |err|"] - 0.01) < 1e-6


def test_input_grams_are_the_gram_matrices_of_each_linears_inputs(one_torch_thread):
    """feed_linear_inputs (shared with llamacpp-quant's importance matrix) hands each linear its
    real input: layer 0's q_proj reads the first norm of the embeddings; no hook stays behind."""
    from slimbench.devtools.contract import load_tiny

    lm = load_tiny("llama")
    rows = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    grams = hqq_damage.input_grams(lm.model, rows)
    layer = lm.model.model.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(lm.model.model.embed_tokens(rows)).reshape(-1, layer.self_attn.q_proj.in_features)
    plain = x.double().t() @ x.double()
    assert torch.allclose(grams["model.layers.0.self_attn.q_proj"], plain, rtol=1e-6, atol=1e-9)
    assert len(grams) == 14 and not any(m._forward_pre_hooks for m in lm.model.modules())
