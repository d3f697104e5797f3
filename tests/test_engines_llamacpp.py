"""llama.cpp as an engine: the GGUF export, loaded by llama.cpp itself, gives SlimBench's logits
(within llama.cpp's float arithmetic), decodes greedily like eager through its own KV cache, and
llama.cpp's own quantization types run through the same tasks. Skipped (with the build command)
where llama-cpp-python or its library is missing: it compiles llama.cpp (docs/deployment.md)."""

from __future__ import annotations

import os

import pytest
import torch
from export_helpers import shakespeare_ids, tiny_bpe_llama

from slimbench.config import build_config
from slimbench.engines import llamacpp, llamacpp_build
from slimbench.engines.engine_process import EngineError
from slimbench.method import MethodContext, apply_method
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec, MethodSpec, StepSpec

REASON = llamacpp.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"llama.cpp engine unavailable: {REASON}")
HW = HardwareSpec(threads=1)
CTX = MethodContext(hardware=HW)


def run(name: str, lm, **params):
    method = METHODS.get(name)
    cfg = build_config(method.config, {**method.test_params, **params}, source="test", field=name)
    return method.run(lm, cfg, CTX)


def test_llamacpp_gives_the_models_logits_and_greedy_tokens(one_torch_thread):
    lm = tiny_bpe_llama()
    ids = shakespeare_ids(lm, 40)
    ref_logits, ref_tokens = lm.logits(ids).float(), lm.generate(ids, 8)
    rep = run("llama-cpp", lm, weights="F32", embeddings="F32", kv_type="f32")
    model = lm.model
    try:
        assert model.engine == "llama.cpp" and rep.execution == "native"
        scale = float(ref_logits.abs().max())
        assert float((lm.logits(ids) - ref_logits).abs().max()) < 1e-3 * scale
        assert torch.equal(lm.generate(ids, 8), ref_tokens)  # the engine-side greedy loop
        logits, cache = lm.prefill(ids)  # last position only, then decode on llama.cpp's KV cache
        assert logits.shape == (1, ref_logits.shape[-1])
        assert int(logits.argmax()) == int(ref_tokens[0, 0])
        nxt, cache = lm.decode(logits.argmax(-1, keepdim=True), cache)
        assert int(nxt.argmax()) == int(ref_tokens[0, 1]) and cache.get_seq_length() == ids.shape[1] + 1
        agree = rep.details["agreement"]
        assert abs(agree["delta_nll"]) < 1e-3 and agree["windows"] == 1
        assert rep.details["export"]["summary"]["exact"] == rep.details["export"]["summary"]["tensors"]
        assert rep.details["llama_cpp_python"] == "0.3.36" and "AVX" in rep.details["system_info"]
        size = model.slimbench_size()
        assert size["stored_bytes"] == model.gguf.stat().st_size and size["effective_bits"] == 32
    finally:
        model.close()
    assert not os.path.exists(model.gguf)  # the export folder went with the engine


def test_method_grid_runs_in_llamacpp_as_itself(one_torch_thread):
    """RTN 4-bit g32 symmetric is written as Q4_0 exactly; llama.cpp's logits follow the RTN model's."""
    lm = tiny_bpe_llama()
    spec = MethodSpec(steps=(StepSpec(name="rtn", params={"bits": 4, "group_size": 32, "symmetric": True}),
                             StepSpec(name="llama-cpp", params={"check_windows": 1, "check_seqlen": 32,
                                                                "n_ctx": 256, "kv_type": "f32",
                                                                "embeddings": "F32"})))
    ids = shakespeare_ids(lm, 32)
    report = apply_method(lm, spec, HW)
    try:
        details = report["steps"][1]["details"]
        assert details["export"]["file_type"] == "Q4_0" and details["grids_from_method"] == 14
        assert details["export"]["summary"]["requantized"] == []
        assert abs(details["agreement"]["delta_nll"]) < 1e-3  # vs the in-process RTN model
        assert report["execution"] == "native"
        assert lm.logits(ids).shape[-1] == len(lm.tokenizer)
    finally:
        lm.model.close()


def test_a_dead_engine_fails_the_request_not_the_process(one_torch_thread):
    lm = tiny_bpe_llama()
    run("llama-cpp", lm)
    model = lm.model
    os.kill(model.proc.pid, 9)
    with pytest.raises(EngineError, match="died"):
        lm.logits(shakespeare_ids(lm, 8))
    model.close()


@pytest.mark.parametrize(("qtype", "imatrix", "bits"), [
    ("Q8_0", "none", 8.5),
    ("Q4_K_M", "activations", None),
    pytest.param("IQ4_XS", "llama-imatrix", None, marks=pytest.mark.skipif(
        llamacpp_build.tool_unavailable("llama-imatrix") is not None, reason="llama-imatrix is not built")),
])
def test_llamacpp_quant_types(qtype, imatrix, bits, one_torch_thread):
    lm = tiny_bpe_llama()
    rep = run("llamacpp-quant", lm, type=qtype, imatrix=imatrix, calib_samples=2, calib_seqlen=64)
    try:
        d = rep.details
        if bits is not None:
            assert d["linear_effective_bits"] == pytest.approx(bits)
        else:
            assert 4.0 < d["linear_effective_bits"] < 6.0 and d["imatrix"]["calibration"]["samples"] == 2
            assert d["imatrix"]["source"] == imatrix and d["imatrix"]["tensors"] > 0
        assert abs(d["agreement"]["delta_nll"]) < 0.5  # lossy, but the same model
        assert lm.model.slimbench_size()["stored_bytes"] == lm.model.gguf.stat().st_size
    finally:
        lm.model.close()


def test_a_grid_written_as_f16_stays_simulated(one_torch_thread):
    """The engine runs F16 copies of RTN's fake-quant values: the compression is not executed."""
    lm = tiny_bpe_llama()
    spec = MethodSpec(steps=(StepSpec(name="rtn", params={"bits": 4, "group_size": 32, "symmetric": True}),
                             StepSpec(name="llama-cpp", params={"check_windows": 1, "check_seqlen": 32,
                                                                "n_ctx": 256, "weights": "F16"})))
    report = apply_method(lm, spec, HW)
    try:
        assert report["steps"][1]["execution"] == "native"
        assert report["steps"][1]["details"]["executes_stored_forms"] is False
        assert report["execution"] == "simulated"
    finally:
        lm.model.close()
