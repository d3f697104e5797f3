"""ONNX Runtime backend: equal logits to eager, KV cache decode, int8 quantization, refusals."""

from __future__ import annotations

import pytest
import torch

from slimbench.engines import onnxruntime as ortx
from slimbench.method import MethodContext
from slimbench.modeling import iter_linears
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec
from tests.conftest import load_tiny
from tests.onnx_memo import shared_onnx_exports  # noqa: F401  (a fixture)

HW = HardwareSpec(threads=1)
SMALL = {"check_prompt_len": 12, "check_new_tokens": 4}
IDS = torch.tensor([[464, 3797, 3332, 319, 262, 2603, 13, 383], [40, 1842, 345, 11, 290, 314, 588, 340]])


# one intra-op thread (conftest.one_torch_thread): the 2 shared cores are faster that way; one
# ONNX export per distinct tiny model, shared with the method contract's runs in the same worker
# (tests/onnx_memo.py; the same xdist group)
pytestmark = [pytest.mark.usefixtures("one_torch_thread", "shared_onnx_exports"),
              pytest.mark.xdist_group("onnx-exports")]


def run_step(lm, name: str, **params):
    method = METHODS.get(name)
    cfg = method.config(**params)
    if method.check is not None:
        method.check(lm, cfg)
    return method.apply(lm, cfg, MethodContext(hardware=HW))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_onnx_runtime_equals_eager_and_int8_is_smaller(arch):
    from slimbench.method import size_report

    lm = load_tiny(arch)
    eager_logits, eager_tokens = lm.logits(IDS), lm.generate(IDS, 8)
    report = run_step(lm, "onnx-runtime", **SMALL)
    assert isinstance(lm.model, ortx.OrtModel)
    assert report.details["self_check"]["greedy_identical"]
    assert torch.allclose(lm.logits(IDS), eager_logits, atol=1e-4, rtol=0)
    assert torch.equal(lm.generate(IDS, 8), eager_tokens)  # prefill + decode through ORT's KV cache
    fp32 = size_report(lm.model, {})
    files = sum(p.stat().st_size for p in ortx.model_files(lm.model.path))
    assert fp32["stored_bytes"] == files and fp32["effective_bits"] == 32.0 and fp32["stored_format"] == "onnx fp32"
    # the ORT cache crops like transformers' (what speculative decoding needs)
    cache = lm.model(input_ids=IDS, use_cache=True).cache
    cache.crop(-3)
    logits = lm.model(input_ids=IDS[:, 5:6], cache=cache, use_cache=True).logits[:, -1]
    assert cache.get_seq_length() == 5 and torch.allclose(logits, eager_logits[:, 5], atol=1e-4, rtol=0)

    report = run_step(lm, "ort-int8", **SMALL)
    int8 = size_report(lm.model, {})
    ops = report.details["graph_ops"]
    # every decoder linear and the output projection run as int8 MatMulInteger
    linears = sum(1 for _ in iter_linears(load_tiny(arch).model, include_lm_head=True))
    assert ops.get("MatMulInteger", 0) == linears
    assert 8.0 < int8["effective_bits"] < 8.1 and int8["stored_bytes"] < fp32["stored_bytes"]
    assert int8["memory_bytes"] < fp32["memory_bytes"] and "int8" in int8["stored_format"]
    diff = report.details["vs_fp32_onnx"]["logits_max_abs_diff"]
    assert 0 < diff < 0.1 * report.details["vs_fp32_onnx"]["logits_max_abs"]  # lossy, but close
    workdir = lm.model.workdir
    lm.model.close()
    assert not workdir.exists()


def test_refusals():
    lm = load_tiny("llama")
    with pytest.raises(ValueError, match="use steps \\[onnx-runtime, ort-int8\\]"):
        METHODS.get("ort-int8").check(lm, METHODS.get("ort-int8").config())
    run_step(lm, "dynamic-int8")
    with pytest.raises(ValueError, match="DynamicInt8Linear layers whose torch kernels ONNX cannot express"):
        METHODS.get("onnx-runtime").check(lm, METHODS.get("onnx-runtime").config())
    half = load_tiny("llama")
    half.model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        METHODS.get("onnx-runtime").check(half, METHODS.get("onnx-runtime").config())
