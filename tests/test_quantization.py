"""The quantization family: GPTQ, AWQ, SmoothQuant, W8A8, dynamic int8 and the packed format."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ARCHS, load_tiny
from slimbench.methods.quantization import awq, dynamic_int8, gptq, packed, rtn, smoothquant, w8a8
from slimbench.methods.quantization.grid import GridConfig, pack_bits, quantize_matrix, unpack_bits

from slimbench.config import build_config
from slimbench.errors import SuiteError
from slimbench.layerwise import drop_layers
from slimbench.method import MethodContext, size_report
from slimbench.modeling import get_weight, iter_linears
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec

_TOKENIZER = {}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are thousands of tiny ops: on a shared 2-core CPU, OpenMP barriers between two
    threads cost more than the ops (measured ~10x), so these tests run single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(arch: str):
    """A fresh tiny model sharing one tokenizer (the calibration split is tokenized once per tokenizer)."""
    lm = load_tiny(arch)
    torch.set_num_threads(1)  # the loader sets the hardware's thread count
    lm.tokenizer = _TOKENIZER.setdefault("gpt2", lm.tokenizer)
    return lm


SMALL_CALIB = {"calib_samples": 4, "calib_seqlen": 32}
def quantization_methods() -> list[str]:
    """Every registered method of the family: the test grows with the registry."""
    return sorted(m.name for m in METHODS if m.family == "quantization")


def small_params(method) -> dict:
    """Tiny-model-sized settings for a method: small calibration, groups that divide 64."""
    fields = method.config.model_fields
    params = {k: v for k, v in SMALL_CALIB.items() if k in fields}
    if "group_size" in fields:
        params["group_size"] = 32
    if "grid" in fields:  # AWQ: a coarser search grid keeps the test fast; the search is tested below
        params["grid"] = 5
    if "check_windows" in fields:  # methods run by an engine: one short in-process vs engine agreement window
        params.update(check_windows=1, check_seqlen=32)
    return params


# Each nncf-weights case is an ONNX export and OpenVINO conversion (~12 s of CPU). On tiny-llama it
# is left to tests/test_engines_openvino.py (NNCF int4 of a tiny Llama run in OpenVINO, its bits,
# constant types and logits checked) and to the contract (tests/test_contract.py, tiny-llama):
# GPT-2 (Conv1D weights: MatMuls whose weight is not transposed) and OPT (its own exported graph)
# are the layouts only this test gives NNCF and OpenVINO.
COVERED_ELSEWHERE = {("nncf-weights", "llama")}
# Methods that trace and export the whole graph run on the tiny model cut to its first decoder
# layer: one layer holds every op type of the architecture, and tracing costs per layer (~3 s).
ONE_LAYER = {"nncf-weights"}


def method_arch_cases() -> list:
    return [pytest.param(name, arch, id=f"{name}-{arch}") for name in quantization_methods() for arch in TINY_ARCHS
            if (name, arch) not in COVERED_ELSEWHERE]


def ids(n: int = 24) -> torch.Tensor:
    return torch.randint(0, 1000, (2, n), generator=torch.Generator().manual_seed(0))


# -- every method on every tiny architecture -----------------------------------------------
@pytest.mark.parametrize(("name", "arch"), method_arch_cases())
def test_every_quantization_method_runs(name, arch):
    method = METHODS.get(name)
    why = method.unavailable() if method.unavailable is not None else None
    if why:  # an optional engine not installed here (llama.cpp): its install command
        pytest.skip(f"{name} cannot run here: {why}")
    lm = tiny(arch)
    if name in ONE_LAYER:
        drop_layers(lm.model, [0])
    cfg = method.config(**small_params(method))
    x = ids()
    before = lm.model(x).logits
    weights = sum(get_weight(mod).numel() for _, mod in iter_linears(lm.model))
    if method.check is not None:
        try:
            method.check(lm, cfg)
        except ValueError as err:  # a refusal must say why (the contract checks every method's refusals)
            assert str(err)
            pytest.skip(f"{name} refuses tiny-{arch}: {err}")
    rep = method.apply(lm, cfg, MethodContext(hardware=HardwareSpec(threads=1)))
    after = lm.model(x).logits
    assert rep.execution in ("native", "simulated")
    assert torch.isfinite(after).all()
    assert not torch.equal(before, after), "quantization changed nothing"
    # close to the original (tiny random models: logits are O(0.1); quantization error is small)
    assert (after - before).abs().max() < 0.5 * before.abs().max() + 0.1
    size = size_report(lm.model, rep.storage)  # storage names real parameters; bits are counted
    # a format's shared table (QuIP#'s E8P codebook, 1 MiB) is counted once: on a tiny model it
    # outweighs the weights, so the per-weight bits are read without it
    table_bits = 8 * rep.details.get("codebook_bytes", 0) / weights
    if rep.details.get("a_bits") is not None and not rep.storage:
        return  # activations (and KV) quantized on dense weights: there are no weight bits to count
    assert size["effective_bits"] - table_bits < 32


# -- GPTQ --------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_identity_hessian_is_rtn(group_size, symmetric, act_order):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    cfg = gptq.GPTQConfig(bits=3, group_size=group_size, symmetric=symmetric, act_order=act_order, block_size=40)
    res = gptq.gptq_quantize(w, torch.eye(128), cfg)
    codes, deq, _ = quantize_matrix(w, cfg)
    assert torch.equal(res.weight, deq)
    assert torch.equal(res.codes, codes)
    assert res.g_idx is None  # equal diagonal: ties keep natural order


def correlated_inputs(n_in: int, tokens: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) * 0.5 + torch.eye(n_in)
    scale = torch.rand(n_in, generator=g) * 3 + 0.1  # uneven channel magnitudes, like real activations
    return (torch.randn(tokens, n_in, generator=g) @ mix) * scale


@pytest.mark.parametrize("group_size,act_order", [(None, False), (None, True), (32, False), (32, True)])
def test_gptq_beats_rtn_on_every_layer(group_size, act_order):
    lm = tiny("llama")
    cfg = gptq.GPTQConfig(bits=3, group_size=group_size, act_order=act_order)
    for i, (name, mod) in enumerate(iter_linears(lm.model)):
        w = get_weight(mod).float()
        x = correlated_inputs(w.shape[1], seed=i)
        h = 2 * x.t() @ x / x.shape[0]
        err_gptq = ((w - gptq.gptq_quantize(w, h, cfg).weight) @ x.t()).norm()
        err_rtn = ((w - quantize_matrix(w, cfg)[1]) @ x.t()).norm()
        assert err_gptq < err_rtn, name


def test_gptq_act_order_groups_store_g_idx_that_decodes():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    x = correlated_inputs(128)
    cfg = gptq.GPTQConfig(bits=4, group_size=32, act_order=True)
    res = gptq.gptq_quantize(w, 2 * x.t() @ x / 512, cfg)
    assert res.g_idx is not None and torch.bincount(res.g_idx).tolist() == [32] * 4
    cols = res.g_idx
    assert torch.equal(res.params.scale[:, cols] * (res.codes - res.params.zero[:, cols]), res.weight)
    # static groups: natural-order groups, no index, same grid layout as RTN
    static = gptq.gptq_quantize(w, 2 * x.t() @ x / 512, cfg.model_copy(update={"static_groups": True}))
    assert static.g_idx is None


def test_gptq_hessian_streaming_matches_batch():
    x = torch.randn(300, 16)
    layer = gptq.GPTQLayer(None, "l", torch.nn.Linear(16, 8), gptq.GPTQConfig())
    for chunk in x.split(70):
        layer.add_batch(chunk, None)
    torch.testing.assert_close(layer.h, 2 * x.t() @ x / 300, rtol=1e-5, atol=1e-5)


# -- packing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_bits_round_trip(bits):
    codes = torch.randint(0, 2**bits, (37, 11), dtype=torch.uint8)
    packed_codes = pack_bits(codes, bits)
    assert packed_codes.numel() == (codes.numel() * bits + 7) // 8
    assert torch.equal(unpack_bits(packed_codes, bits, codes.numel()).view_as(codes), codes)


@pytest.mark.parametrize(
    "bits,group_size,symmetric,kernel",
    [(8, None, True, "int8pack"), (4, 32, False, "int4pack"), (4, 64, True, "int4pack"), (3, 32, False, "dequant"),
     (4, None, False, "dequant")],
)
def test_packed_linear_round_trip_and_kernel(bits, group_size, symmetric, kernel):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    cfg = GridConfig(bits=bits, group_size=group_size, symmetric=symmetric)
    codes, deq, params = quantize_matrix(w, cfg)
    layer = packed.PackedLinear.from_codes(codes, params, group_size, bias=torch.arange(64.0))
    assert layer.kernel == kernel
    assert torch.equal(layer.codes(), codes.to(torch.uint8))
    assert torch.equal(layer.dequantized_weight(), deq)
    x = torch.randn(5, 128)
    ref = x @ deq.t() + torch.arange(64.0)
    tol = 0.05 * ref.abs().max() if kernel != "dequant" else 1e-4  # kernels take bf16 activations
    assert (layer(x) - ref).abs().max() < tol


def test_saved_int4_model_reloads_with_same_logits(tmp_path):
    lm = tiny("llama")
    dense_path = tmp_path / "dense.safetensors"
    packed.save_packed(lm.model, str(dense_path))
    rtn.apply(lm, rtn.RTNConfig(bits=4, group_size=32, format="packed"), None)
    assert packed.kernel_counts(lm.model) == {"int4pack": len(list(iter_linears(lm.model)))}
    x = ids()
    logits = lm.model(x).logits
    path = tmp_path / "int4.safetensors"
    packed.save_packed(lm.model, str(path))
    fresh = load_tiny("llama").model
    packed.load_packed(fresh, str(path))
    assert torch.equal(fresh(x).logits, logits)
    # genuinely smaller: the linear weights are 4-bit plus fp16 scales and packed zeros
    linear_bytes = sum(get_weight(m).numel() * 4 for _, m in iter_linears(load_tiny("llama").model))
    saved = dense_path.stat().st_size - path.stat().st_size
    assert saved > 0.8 * linear_bytes


def test_packed_rtn_matches_fake_rtn_weights():
    fake, real = tiny("opt"), tiny("opt")
    rtn.apply(fake, rtn.RTNConfig(bits=3, group_size=32), None)
    rep = rtn.apply(real, rtn.RTNConfig(bits=3, group_size=32, format="packed"), None)
    assert rep.execution == "native" and rep.details["kernels"] == {"dequant": 12}
    for (n, a), (_, b) in zip(iter_linears(fake.model), iter_linears(real.model), strict=True):
        assert torch.equal(get_weight(a), get_weight(b)), n


# -- SmoothQuant and W8A8 --------------------------------------------------------------------
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_smoothing_alone_preserves_outputs(arch):
    lm = tiny(arch)
    x = ids()
    before = lm.model(x).logits
    rep = smoothquant.apply(lm, smoothquant.SmoothQuantConfig(quantize=False, alpha=0.8, **SMALL_CALIB), None)
    assert rep.details["smoothed_pairs"] > 0
    # the weights really moved (the scales are not all 1) yet the function did not
    torch.testing.assert_close(lm.model(x).logits, before, rtol=1e-4, atol=1e-5)


def test_smoothing_scales_flatten_an_outlier_channel():
    act = torch.ones(64)
    act[5] = 100.0  # one outlier channel, as in real LLM activations
    s = smoothquant.smoothing_scales(act, [torch.ones(32, 64)], alpha=0.5)
    assert smoothquant.outlier_ratio(act) == pytest.approx(100.0)
    assert smoothquant.outlier_ratio(act / s) == pytest.approx(10.0, rel=1e-4)  # sqrt(100): alpha 0.5


def test_per_token_activation_scales_survive_outliers_per_tensor_do_not():
    torch.manual_seed(0)
    x = torch.randn(16, 64)
    x[3] *= 200  # one outlier token
    w = torch.nn.Linear(64, 32, bias=False)
    ref = w(x)
    errs = {}
    for gran in ("per_tensor", "per_token"):
        layer = w8a8.W8A8Linear.from_linear(w, gran)
        errs[gran] = float((layer(x) - ref)[torch.arange(16) != 3].abs().max())
    assert errs["per_token"] * 10 < errs["per_tensor"]


def test_w8a8_int_mm_is_the_integer_product():
    w = torch.nn.Linear(64, 32)
    layer = w8a8.W8A8Linear.from_linear(w, "per_token")
    x = torch.randn(7, 64)
    xq, xs = w8a8.quantize_activation(x, "per_token")
    ref = (xq.double() @ layer.qweight.double().t()) * xs.double() * layer.wscale.double() + w.bias.double()
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_dynamic_int8_state_dict_is_the_checkpoint():
    lin = torch.nn.Linear(64, 48)
    layer = dynamic_int8.DynamicInt8Linear.from_linear(lin)
    x = torch.randn(9, 64)
    ref = x @ layer.dequantized_weight().t() + lin.bias
    y = layer(x)
    assert (y - ref).abs().max() < 0.05 * ref.abs().max()  # 7-bit per-tensor activations
    assert all(isinstance(t, torch.Tensor) for t in layer.state_dict().values())
    fresh = dynamic_int8.DynamicInt8Linear(64, 48, bias=True)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), y)


# -- AWQ ----------------------------------------------------------------------------------------
def test_awq_search_never_worse_than_rtn_and_folds_into_norms():
    lm = tiny("llama")
    x = ids()
    rep = awq.apply(lm, awq.AWQConfig(bits=3, group_size=32, clip=False, grid=10, **SMALL_CALIB), None)
    d = rep.details
    assert d["search_loss_awq_sum"] <= d["search_loss_rtn_sum"]  # alpha = 0 (RTN) is on the grid
    assert d["scales_folded_into_norm"] == 5 * 2  # q/k/v and gate/up of both layers
    assert all("input_scale" in rep.storage[f"{n}.weight"] for n in d["layers_with_input_scale"])
    assert torch.isfinite(lm.model(x).logits).all()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_folding_scales_into_a_norm_divides_its_output(arch):
    # Gemma's RMSNorm multiplies by (1 + w), Llama's by w: folding 1/s must give norm(x) / s for both.
    lm = load_tiny(arch)
    norm = lm.model.model.layers[0].input_layernorm
    with torch.no_grad():
        norm.weight.normal_(0, 0.5)
        x = torch.randn(3, 5, norm.weight.shape[0])
        before = norm(x)
        s = torch.rand(norm.weight.shape[0]) + 0.5
        awq.fold_into_norm(norm, s)
        torch.testing.assert_close(norm(x), before / s, rtol=1e-5, atol=1e-5)


def test_awq_scale_search_on_a_salient_channel():
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    x[:, 7] *= 50  # salient input channel
    w = torch.randn(32, 64)
    cfg = awq.AWQConfig(bits=3, group_size=32)
    s, alpha, losses = awq.search_scale(x.t() @ x, x.abs().mean(0), [w], cfg)
    assert losses[0] == pytest.approx(float(((x @ (w - quantize_matrix(w, cfg)[1]).t()) ** 2).sum()), rel=1e-3)
    assert alpha > 0 and min(losses) < losses[0]
    assert s[7] == s.max()


# -- bad input ------------------------------------------------------------------------------------
def test_gptq_rejects_one_bit():
    with pytest.raises(SuiteError, match="bits"):
        build_config(gptq.GPTQConfig, {"bits": 1}, source="test", field="gptq")


@pytest.mark.parametrize("name", ["rtn", "gptq", "awq"])
def test_group_size_must_divide_input_dim(name):
    lm = tiny("gpt2")
    method = METHODS.get(name)
    with pytest.raises(ValueError, match=r"does not divide the input dimension 64 of layer transformer\.h\.0"):
        method.check(lm, method.config(group_size=128))


def test_smoothquant_needs_an_adapter():
    lm = tiny("llama")
    lm.model.config.model_type = "bert"
    with pytest.raises(ValueError, match="no layer-wise adapter for model_type 'bert'"):
        smoothquant.check(lm, smoothquant.SmoothQuantConfig())


def test_gguf_tensor_table_reads_as_the_gguf_package_reads_it(tmp_path):
    """llamacpp-quant lists a GGUF's tensors by stepping over its metadata; the gguf package's
    reader (which decodes every value) must find the same names, types, shapes and bytes."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from slimbench.methods.quantization.llamacpp_quant import tensor_types

    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(300)])  # a vocabulary: strings
    w.add_array("tokenizer.ggml.token_type", list(range(300)))
    w.add_array("nested", [[1, 2], [3]])
    w.add_float32("f", 0.5), w.add_bool("b", True), w.add_string("s", "text"), w.add_uint64("u", 7)
    w.add_tensor("a.weight", np.ones((3, 64), np.float32))
    w.add_tensor("b.weight", np.ones((5, 32), np.float16))
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("c.weight", np.zeros((4, 2 * 34), np.uint8), raw_dtype=q8)  # 2 blocks of 32 a row
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    want = [{"tensor": t.name, "type": t.tensor_type.name, "shape": [int(x) for x in reversed(t.shape)],
             "bytes": int(t.n_bytes)} for t in gguf.GGUFReader(path).tensors]
    assert tensor_types(path) == want and [t["type"] for t in want] == ["F32", "F16", "Q8_0"]
