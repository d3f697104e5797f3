"""baseline, cast, magnitude, rtn: each reports what it achieved, checked against the weights."""

import pytest
import torch
from slimbench.methods.pruning.magnitude import MagnitudeConfig
from slimbench.methods.quantization.grid import GridConfig, pack_bits, quantize_matrix, unpack_bits
from slimbench.methods.quantization.rtn import RTNConfig

from slimbench.method import apply_method
from slimbench.modeling import get_weight, iter_linears
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec, MethodSpec, StepSpec


def run(lm, name, **params):
    cfg = METHODS.get(name).config(**params)
    spec = MethodSpec(steps=(StepSpec(name=name, params=cfg.to_dict()),))
    return apply_method(lm, spec, HardwareSpec())


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_hits_target_in_every_layer(tiny_lm, sparsity):
    before = {n: get_weight(m).clone() for n, m in iter_linears(tiny_lm.model)}
    rep = run(tiny_lm, "magnitude", sparsity=sparsity)
    for name, mod in iter_linears(tiny_lm.model):
        w, w0 = get_weight(mod), before[name]
        assert (w == 0).sum().item() == round(sparsity * w.numel())
        kept = w != 0
        assert torch.equal(w[kept], w0[kept])  # surviving weights untouched
        if sparsity:  # every pruned weight is no larger than every kept one
            assert w0[~kept].abs().max() <= w0[kept].abs().min()
    assert rep["sparsity"] == pytest.approx(sparsity, abs=1e-4)
    assert rep["execution"] == "simulated"


def test_magnitude_leaves_lm_head_and_embeddings_dense(tiny_llama):
    emb = tiny_llama.model.get_input_embeddings().weight.clone()
    run(tiny_llama, "magnitude", sparsity=0.5)
    assert torch.equal(tiny_llama.model.get_input_embeddings().weight, emb)


@pytest.mark.parametrize("bits,group,sym", [(4, None, False), (3, 32, False), (8, 64, True), (2, 16, False)])
def test_rtn_weights_lie_on_the_grid(tiny_lm, bits, group, sym):
    rep = run(tiny_lm, "rtn", bits=bits, group_size=group, symmetric=sym)
    for _, mod in iter_linears(tiny_lm.model):
        w = get_weight(mod)
        rows = w.reshape(-1, group) if group else w
        for r in rows[:16]:  # each group holds at most 2**bits distinct values
            assert r.unique().numel() <= 2**bits
    # effective bits: codes + fp16 scale (+ packed zero-point) per group
    in_dim = get_weight(next(m for _, m in iter_linears(tiny_lm.model))).shape[1]
    g = group or in_dim
    expected = bits + 16 / g + (0 if sym else bits / g)
    assert rep["effective_bits"] == pytest.approx(expected, rel=0.02)
    assert rep["execution"] == "simulated" and rep["stored_format"] == "packed"


def test_rtn_error_shrinks_with_bits():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    errs = [(quantize_matrix(w, GridConfig(bits=b, group_size=32))[1] - w).pow(2).mean() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-4


def test_rtn_stored_bytes_are_smaller(tiny_llama):
    base = run(tiny_llama, "baseline")
    rep = run(tiny_llama, "rtn", bits=4, group_size=32)
    saved = base["stored_bytes"] - rep["stored_bytes"]
    linear_fp32 = rep["linear_weights"] * 4
    # the linear weights shrank from 32 to ~4.6 bits each; everything else is stored as before,
    # except the safetensors header, which grows by the names of the extra tensors (< 300 B each)
    expected = linear_fp32 * (1 - rep["effective_bits"] / 32)
    n_layers = sum(1 for _ in iter_linears(tiny_llama.model))
    assert expected - 3 * 300 * n_layers < saved < expected


def test_pack_round_trip():
    for bits in range(2, 9):
        codes = torch.randint(0, 2**bits, (1000 + bits,), dtype=torch.uint8)
        packed = pack_bits(codes, bits)
        assert packed.numel() == -(-codes.numel() * bits // 8)
        assert torch.equal(unpack_bits(packed, bits, codes.numel()), codes)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cast_halves_memory(tiny_llama, dtype):
    base = run(tiny_llama, "baseline")
    rep = run(tiny_llama, "cast", dtype=dtype)
    assert next(tiny_llama.model.parameters()).dtype == getattr(torch, dtype)
    assert rep["memory_bytes"] == base["memory_bytes"] // 2
    assert rep["effective_bits"] == 16 and rep["execution"] == "native"


def test_rtn_group_size_must_divide_layers(tiny_llama):
    with pytest.raises(ValueError, match="does not divide the input dimension"):
        run(tiny_llama, "rtn", bits=4, group_size=256)  # tiny layers have 64 or 128 inputs


def test_configs_reject_bad_values():
    with pytest.raises(ValueError):
        MagnitudeConfig(sparsity=1.0)
    with pytest.raises(ValueError):
        RTNConfig(bits=1)
    with pytest.raises(ValueError, match="power of two"):
        RTNConfig(group_size=96)
