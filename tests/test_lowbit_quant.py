"""HQQ, SpQR and the E8P vector quantizer (QuIP#): each against its defining property or reference."""

from __future__ import annotations

import math

import pytest
import torch
from slimbench.methods.quantization import e8p
from slimbench.methods.quantization import hadamard as hd
from slimbench.methods.quantization.grid import decode_stored_form
from slimbench.methods.quantization.hqq import HQQConfig, hqq_groups, shrink_lp
from slimbench.methods.quantization.hqq import quantize_weight as hqq_weight
from slimbench.methods.quantization.quip_sharp import (
    E8Linear,
    QuipSharpConfig,
    block_ldlq,
    choose_scale,
    dense_rotation,
)
from slimbench.methods.quantization.spqr import (
    SpQRConfig,
    decode,
    fake_q,
    leave_one_out_gain,
    spqr_quantize,
    stored_form,
    weight_grid,
)

from slimbench.devtools.contract import load_tiny
from slimbench.method import apply_method
from slimbench.specs import HardwareSpec, MethodSpec, StepSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _weights(out=64, n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * 0.05
    w[5, 9], w[20, 100] = 1.0, -0.8  # two outliers
    x = torch.randn(2000, n, generator=g) @ (torch.randn(n, n, generator=g) * 0.3 + torch.eye(n))
    return w, 2 * x.t() @ x / x.shape[0]


def _proxy(w, q, h):
    d = w - q
    return float(torch.einsum("ij,jk,ik->", d, h, d))


# -- HQQ -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, 64), (4, 128)])
def test_hqq_equals_the_hqq_package(bits, group):
    quantize = pytest.importorskip("hqq.core.quantize", reason="hqq not installed (pip install hqq==0.2.8.post1)")
    w, _ = _weights(96, 256, seed=bits)
    ref_q, meta = quantize.Quantizer.quantize(w, nbits=bits, channel_wise=True, group_size=group, optimize=True,
                                              axis=1, device="cpu", bitpack=False)
    codes, scale, zero, _ = hqq_groups(w, HQQConfig(bits=bits, group_size=group))
    assert torch.equal(codes, ref_q.reshape(codes.shape).float())
    assert torch.equal(scale, meta["scale"]) and torch.equal(zero, meta["zero"])


def test_hqq_closed_form_steps():
    x = torch.linspace(-2, 2, 41)
    assert torch.allclose(shrink_lp(x, 2.0, 1.0), torch.sign(x) * torch.relu(x.abs() - 0.5))  # soft threshold
    # the p < 1 shrinkage keeps large errors (outliers) nearly whole and zeroes small ones
    out = shrink_lp(torch.tensor([0.01, 5.0]), 10.0, 0.7)
    assert out[0] == 0 and 4.9 < out[1] < 5.0
    # the solver lowers the mean |W - W_r| against the min-max grid it starts from
    w, _ = _weights()
    cfg = HQQConfig(bits=3, group_size=32)
    base, _, _ = hqq_weight(w, HQQConfig(bits=3, group_size=32, optimize=False))
    opt, _, steps = hqq_weight(w, cfg)
    assert steps >= 2 and (w - opt).abs().mean() < (w - base).abs().mean()


def test_hqq_stored_form_decodes_to_the_model_weight():
    w, _ = _weights()
    dense, form, _ = hqq_weight(w, HQQConfig(bits=4, group_size=32))
    assert form["zeros"].dtype == torch.float16 and not torch.equal(form["zeros"], form["zeros"].round())
    assert torch.equal(decode_stored_form(form, *w.shape), dense)
    bits = 8 * sum(t.numel() * t.element_size() for t in form.values()) / w.numel()
    assert bits == pytest.approx(4 + 32 / 32)  # codes + fp16 scale and zero per group of 32


# -- SpQR ------------------------------------------------------------------------------------------
def test_spqr_leave_one_out_gain_against_refitting():
    g = torch.Generator().manual_seed(3)
    group = torch.randn(5, 16, generator=g)
    group[2, 4] = 9.0
    d = torch.rand(16, generator=g) + 0.5
    gain = leave_one_out_gain(group, d, 3)

    def err(x, dd):
        s, z = weight_grid(x, 3)
        return ((fake_q(x, s, z, 3) - x) / dd).square().sum(1)

    for j in range(16):  # refit without weight j, by hand
        keep = [k for k in range(16) if k != j]
        assert torch.allclose(gain[:, j], err(group, d) - err(group[:, keep], d[keep]), atol=1e-4)
    assert int(gain[2].argmax()) == 4  # the outlier is the one worth leaving out


def test_spqr_stored_form_decodes_and_counts_outliers():
    w, h = _weights()
    cfg = SpQRConfig(bits=3, calib_samples=4, calib_seqlen=32)
    res = spqr_quantize(w, h, cfg)
    form = stored_form(res, cfg)
    dense = decode(form, *w.shape, cfg)
    assert torch.equal(dense, res["dense"])
    n_out = int(res["outlier"].sum())
    assert res["outlier"][5, 9] and res["outlier"][20, 100]
    assert form["outlier_values"].numel() == form["outlier_cols"].numel() == n_out
    # every other weight is on its group's 3-bit grid (the form without its outliers); outliers are fp16 values
    grid = decode({**form, "outlier_values": form["outlier_values"][:0], "outlier_cols": form["outlier_cols"][:0],
                   "outlier_row_ptr": torch.zeros_like(form["outlier_row_ptr"])}, *w.shape, cfg)
    mask = res["outlier"]
    assert torch.equal(dense[~mask], grid[~mask]) and (dense[mask] != grid[mask]).all()
    assert torch.equal(dense[mask], dense[mask].half().float())
    # stored bytes re-measured: codes + statistics + 16-bit value and 16-bit column per outlier + row pointers
    groups = w.shape[1] // cfg.group_size
    expect = (math.ceil(w.numel() * 3 / 8) + 2 * math.ceil(w.shape[0] * groups * 3 / 8)
              + 2 * groups * (w.shape[0] // cfg.stats_group) * 2 * 2 + n_out * 4 + (w.shape[0] + 1) * 4)
    assert sum(t.numel() * t.element_size() for t in form.values()) == expect


def test_spqr_outliers_lower_the_objective_and_beat_gptq_groups_of_16():
    from slimbench.methods.quantization.gptq import GPTQConfig, gptq_quantize

    w, h = _weights()
    with_out = spqr_quantize(w, h, SpQRConfig(bits=3))
    without = spqr_quantize(w, h, SpQRConfig(bits=3, outlier_threshold=float("inf")))
    assert not without["outlier"].any()
    gptq = gptq_quantize(w, h, GPTQConfig(bits=3, group_size=16))
    assert _proxy(w, with_out["dense"], h) < _proxy(w, without["dense"], h)
    assert _proxy(w, with_out["dense"], h) < _proxy(w, gptq.weight, h)


# -- E8P and QuIP# ---------------------------------------------------------------------------------
def test_e8p_codebook_is_2_to_the_16_points_of_e8_plus_a_quarter():
    pats = e8p.abs_patterns()
    assert pats.shape == (256, 8) and (pats.square().sum(1) <= 10).sum() == 227
    cb = e8p.codebook()
    assert cb.shape == (65536, 8) and torch.unique(cb, dim=0).shape[0] == 65536
    y = cb - 0.25  # E8 = D8 ∪ (D8 + 1/2): integer or half-integer coordinates with an even sum
    integer = (y == y.round()).all(1)
    half = (y - 0.5 == (y - 0.5).round()).all(1)
    assert ((integer | half) & (y.sum(1).round() % 2 == 0)).all()


def test_e8p_nearest_equals_brute_force_and_codewords_map_to_themselves():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1500, 8, generator=g) * 1.3
    cb = e8p.codebook()
    fast = (x - cb[e8p.nearest(x)]).square().sum(1)
    brute = torch.cdist(x, cb).square().min(1).values
    assert torch.allclose(fast, brute, atol=1e-4)
    sample = torch.arange(0, 65536, 211)
    assert torch.equal(e8p.nearest(cb[sample]), sample)


def test_block_ldlq_feedback_energy_is_the_proxy_loss_and_beats_plain_rounding():
    w, h = _weights(96, 192)
    s_in, s_out = torch.ones(192), torch.ones(96)
    s_in[::3], s_out[::2] = -1, -1
    r_in, r_out = dense_rotation(192, s_in), dense_rotation(96, s_out)  # 192 = 12 * 16
    assert torch.allclose(r_in.t() @ r_in, torch.eye(192), atol=1e-5)
    wt, ht = r_out.t() @ w @ r_in, r_in.t() @ h @ r_in
    sigma = choose_scale(wt)
    res = block_ldlq(wt, ht, sigma, QuipSharpConfig())
    q = sigma * e8p.codebook()[res["codes"]].reshape(wt.shape)
    assert _proxy(wt, q, res["damped_h"]) == pytest.approx(res["feedback_energy"], rel=1e-4)
    plain = sigma * e8p.codebook()[e8p.nearest(wt.reshape(-1, 8) / sigma)].reshape(wt.shape)
    assert _proxy(w, r_out @ q @ r_in.t(), h) < 0.8 * _proxy(w, r_out @ plain @ r_in.t(), h)
    # with an identity Hessian nothing is fed back: every code is the nearest codeword of its 8 weights
    ident = block_ldlq(wt, torch.eye(192), sigma, QuipSharpConfig(percdamp=1e-6))
    assert torch.equal(ident["codes"].reshape(-1), e8p.nearest(wt.reshape(-1, 8) / sigma))


def test_quip_sharp_layers_decode_consistently_and_weigh_two_bits():
    lm = load_tiny("llama")
    ids = torch.randint(0, 1000, (1, 24))
    params = {"calib_samples": 4, "calib_seqlen": 32}
    rep = apply_method(lm, MethodSpec(steps=(StepSpec(name="quip-sharp", params=params),)), HardwareSpec(threads=1))
    layers = [m for m in lm.model.modules() if isinstance(m, E8Linear)]
    assert len(layers) == 14 and sum(m.holds_codebook for m in layers) == 1
    m = layers[3]
    x = torch.randn(5, m.in_features)
    assert torch.allclose(m(x), x @ m.dequantized_weight().t(), atol=1e-5)
    numel = sum(m.in_features * m.out_features for m in layers)
    codebook_bits = 65536 * 8 * 16
    assert rep["effective_bits"] == pytest.approx(2 + (codebook_bits + 32 * 14 + sum(
        8 * (math.ceil(m.in_features / 8) + math.ceil(m.out_features / 8)) for m in layers)) / numel)
    assert torch.isfinite(lm.model(input_ids=ids).logits).all()
    # defining property: every stored code decodes to a point of E8 + 1/4, and the layer's weight is
    # R_out (σ · those points) R_inᵀ, R = diag(s) H / √n built as dense matrices (not the fast transform)
    stored_cb = next(m for m in layers if m.holds_codebook).codebook
    assert torch.equal(stored_cb.float(), e8p.codebook())  # E8P values are multiples of 1/4 up to 13/4: exact in fp16
    for m in layers:
        points = stored_cb.float()[m.codes.long() & 0xFFFF].reshape(-1, 8) - 0.25
        integer, half = (points == points.round()).all(1), (points - 0.5 == (points - 0.5).round()).all(1)
        assert ((integer | half) & (points.sum(1).round() % 2 == 0)).all()
        r_in = torch.diag(m.s_in) @ hd.hadamard_plan(m.in_features).matrix() / m.in_features ** 0.5
        r_out = torch.diag(m.s_out) @ hd.hadamard_plan(m.out_features).matrix() / m.out_features ** 0.5
        wt = m.scale * (points + 0.25).reshape(m.out_features, m.in_features)
        assert torch.allclose(m.dequantized_weight(), r_out @ wt @ r_in.t(), atol=1e-5)
