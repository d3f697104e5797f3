"""vLLM as an engine: its own environment and process; quality, greedy tokens and sizes against the
in-process model. The engine tests skip where vLLM's environment is not built (as in CI, whose
time cannot hold its multi-GB build): `benchmark.py engines build vllm`."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from export_helpers import shakespeare_ids, tiny_bpe_llama

from slimbench.engines import vllm, vllm_env
from slimbench.engines.engine_process import EngineProcess, code_only_path
from slimbench.method import apply_method
from slimbench.specs import HardwareSpec, MethodSpec, StepSpec

REASON = vllm.unavailable()
needs_vllm = pytest.mark.skipif(REASON is not None, reason=f"vLLM engine unavailable: {REASON}")
HW = HardwareSpec(threads=1)
STEP = {"check_windows": 1, "check_seqlen": 32, "max_model_len": 256, "sequences": 2, "top_logprobs": 5}


def test_prefill_distribution_keeps_the_engines_top_tokens():
    top = [([7, 3, 11], [-0.1, -2.5, -3.0]), ([0, 5, 2], [-0.5, -1.0, -4.0])]
    out = vllm.dense_top(top, 12)
    assert out.shape == (2, 1, 12)
    assert out.argmax(-1).flatten().tolist() == [7, 0]
    assert torch.isfinite(out).sum() == 6 and float(out[0, 0, 3]) == pytest.approx(-2.5)


def test_effective_bits_read_from_the_header_equal_the_stored_tensors(tmp_path, one_torch_thread):
    """Packed int4 codes with their scales and zero-points, counted from the safetensors header,
    equal the bytes of the tensors the file holds (loaded)."""
    from safetensors.torch import load_file
    from slimbench.methods.quantization.export_grids import linear_grids

    from slimbench.engines.export import compressed_tensors

    lm, storage = tiny_bpe_llama(), {}
    spec = MethodSpec(steps=(StepSpec(name="rtn", params={"bits": 4, "group_size": 32}),))
    assert apply_method(lm, spec, HW, storage=storage)["execution"] == "simulated"
    manifest = compressed_tensors.export(lm, tmp_path / "m", grids=linear_grids(lm.model, storage))
    assert manifest["quantization_format"] == "pack-quantized"
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    layers = [n.removesuffix(".weight_packed") for n in state if n.endswith(".weight_packed")]
    numel = sum(int(state[f"{m}.weight_shape"].prod()) for m in layers)
    stored = sum(t.numel() * t.element_size() for n, t in state.items() if n.rpartition(".")[0] in layers)
    assert len(layers) == 14
    assert vllm.effective_bits(tmp_path / "m", manifest) == pytest.approx(8 * stored / numel)
    assert 4 < 8 * stored / numel < 6


@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="no system python to stand for another environment")
def test_engine_side_runs_in_another_environment_seeing_only_slimbench():
    """The engine process of another environment's interpreter gets SlimBench's code and none of its
    packages (vLLM pins its own transformers and torch)."""
    assert os.listdir(code_only_path()) == ["slimbench"]
    proc = EngineProcess("slimbench.engines.engine_process:EchoEngine", {"x": 1}, name="echo", timeout_s=60,
                         python="/usr/bin/python3")
    try:
        assert proc.request({"op": "echo", "value": sys.version}) == sys.version
        assert proc.info["payload"] == {"x": 1}
    finally:
        proc.close()


def test_missing_environment_names_the_build_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMBENCH_CACHE", str(tmp_path))
    assert vllm_env.env_dir().is_relative_to(tmp_path)
    assert "engines build vllm" in (vllm_env.unavailable() or "")


@pytest.fixture(scope="module")
def served():
    """A tiny Llama vLLM can run (head size 64), its in-process references, then the engine."""
    torch.set_num_threads(1)
    lm = tiny_bpe_llama(hidden=128, heads=2, kv_heads=1)
    ids = shakespeare_ids(lm, 40)
    ref = {"nll": lm.token_nll(ids), "tokens": lm.generate(ids, 8)}
    report = apply_method(lm, MethodSpec(steps=(StepSpec(name="vllm", params=STEP),)), HW)
    yield lm, ids, ref, report
    lm.model.close()


@needs_vllm
def test_vllm_scores_and_decodes_as_the_model(served):
    lm, ids, ref, report = served
    details = report["steps"][0]["details"]
    assert report["execution"] == "native" and lm.model.engine == "vLLM"
    assert details["vllm"] == vllm_env.VLLM_VERSION and abs(details["agreement"]["delta_nll"]) < 1e-4
    assert float((lm.token_nll(ids) - ref["nll"]).abs().max()) < 1e-3  # every token, through prompt_logprobs
    assert torch.equal(lm.generate(ids, 8), ref["tokens"])  # vLLM's scheduler loop, greedy
    logits, _ = lm.prefill(ids)
    assert int(logits.argmax()) == int(ref["tokens"][0, 0]) and int(torch.isfinite(logits).sum()) == 5
    with pytest.raises(NotImplementedError, match="log-probabilities"):
        lm.logits(ids)
    size = lm.model.slimbench_size()
    assert size["stored_bytes"] == (lm.model.folder / "model.safetensors").stat().st_size
    assert size["effective_bits"] == 32


@needs_vllm
def test_closing_the_engine_removes_its_process_and_export(served):
    lm, _, _, _ = served
    model = lm.model
    pid, folder = model.proc.pid, model.folder
    model.close()
    assert not os.path.exists(folder) and not os.path.exists(f"/proc/{pid}")  # reaped, not a zombie


def test_packed_weights_are_refused_before_vllm_starts_on_a_cpu_without_its_kernels(monkeypatch):
    int4 = {"quantization_format": "pack-quantized", "dtype": "bfloat16",
            "tensors": [{"from": "grid", "type": "int4 group"}, {"from": "dense", "type": "bfloat16"}]}
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert "AVX-512" in vllm.unsupported_format(int4)
    assert vllm.unsupported_format({"quantization_format": "dense"}) is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert vllm.unsupported_format(int4) is None
    assert "dtype: bfloat16" in vllm.unsupported_format({**int4, "dtype": "float32"})
    int8 = {**int4, "tensors": [{"from": "grid", "type": "int8 channel"}]}
    assert "4-bit codes only" in vllm.unsupported_format(int8)
    w8a8 = {"quantization_format": "int-quantized", "dtype": "float32",
            "tensors": [{"from": "int8", "type": "int8 channel", "activations": "token", "shape": [96, 64]}]}
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert vllm.unsupported_format(w8a8) is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # vLLM's AMX kernel: bf16/fp16 only
    assert "dtype: bfloat16" in vllm.unsupported_format(w8a8)
    assert vllm.unsupported_format({**w8a8, "dtype": "bfloat16"}) is None
    odd = {**w8a8, "tensors": [{**w8a8["tensors"][0], "shape": [96, 48]}]}  # oneDNN's path takes fp32
    assert vllm.unsupported_format(odd) is None
    w8a8["tensors"][0]["activations"] = "tensor"
    assert "per token" in vllm.unsupported_format(w8a8)


@needs_vllm
@pytest.mark.skipif("AVX512" not in torch.backends.cpu.get_cpu_capability(),
                    reason="vLLM's W4A16 CPU kernel needs AVX-512")
def test_packed_int4_weights_run_in_vllm_as_the_simulated_model(one_torch_thread):
    """RTN 4-bit groups of 32 written as compressed-tensors W4A16 and run by vLLM's own kernel (bf16
    activations) score and decode as the in-process fake-quantized fp32 model."""
    def spec(*extra):
        return MethodSpec(steps=(StepSpec(name="rtn", params={"bits": 4, "group_size": 32}), *extra))

    ref = tiny_bpe_llama(hidden=128, heads=2, kv_heads=1)
    ids = shakespeare_ids(ref, 40)
    apply_method(ref, spec(), HW)
    lm = tiny_bpe_llama(hidden=128, heads=2, kv_heads=1)
    report = apply_method(lm, spec(StepSpec(name="vllm", params={**STEP, "dtype": "bfloat16"})), HW)
    try:
        details = report["steps"][-1]["details"]
        assert report["execution"] == "native" and details["export"]["quantization_format"] == "pack-quantized"
        assert details["executes_stored_forms"] and abs(details["agreement"]["delta_nll"]) < 5e-3
        assert float((lm.token_nll(ids) - ref.token_nll(ids)).abs().max()) < 3e-2  # bf16 activations
        assert torch.equal(lm.generate(ids, 8), ref.generate(ids, 8))
        assert 4 < lm.model.slimbench_size()["effective_bits"] < 5  # codes with their bf16 scales and zero-points
    finally:
        lm.model.close()


@needs_vllm
def test_smoothquant_w8a8_runs_in_vllm_int8_kernels_as_the_model(one_torch_thread):
    """SmoothQuant's int8 weights with per-token dynamic int8 activations, written int-quantized,
    run through vLLM's own int8 GEMM and score and decode as SlimBench's torch._int_mm model: in fp32
    through oneDNN, or in bf16 through the AMX kernel vLLM takes on a CPU that has AMX."""
    def spec(*extra):
        calib = {"calib_samples": 4, "calib_seqlen": 32}
        return MethodSpec(steps=(StepSpec(name="smoothquant", params=calib), *extra))

    ref = tiny_bpe_llama(hidden=128, heads=2, kv_heads=1)
    ids = shakespeare_ids(ref, 40)
    apply_method(ref, spec(), HW)
    lm = tiny_bpe_llama(hidden=128, heads=2, kv_heads=1)
    dtype = "bfloat16" if torch.cpu._is_amx_tile_supported() else "float32"
    report = apply_method(lm, spec(StepSpec(name="vllm", params={**STEP, "dtype": dtype})), HW)
    try:
        details = report["steps"][-1]["details"]
        assert details["export"]["quantization_format"] == "int-quantized"
        assert abs(details["agreement"]["delta_nll"]) < 5e-3
        assert float((lm.token_nll(ids) - ref.token_nll(ids)).abs().max()) < 3e-2
        assert torch.equal(lm.generate(ids, 8), ref.generate(ids, 8))
        assert 8 < lm.model.slimbench_size()["effective_bits"] < 9  # int8 codes and their per-row scales
    finally:
        lm.model.close()
