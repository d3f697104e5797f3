"""OpenVINO as an engine: the exported IR gives SlimBench's logits, decodes like eager, and NNCF's
weight compression runs in it with its sizes measured. Skipped where openvino is not installed."""

from __future__ import annotations

import pytest
import torch
from export_helpers import shakespeare_ids, tiny_bpe_llama

from slimbench.config import build_config
from slimbench.method import MethodContext
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec

ov = pytest.importorskip("openvino", reason="openvino not installed (pip install -r requirements-extras.txt)")
CTX = MethodContext(hardware=HardwareSpec(threads=1))


def artifact_cache_refusal(lm, root, monkeypatch) -> str:
    """Save ``lm`` as an nncf-weights cell's artifact; the refusal's reason (nothing may be kept)."""
    from slimbench.specs import CellSpec, MethodSpec, ModelSpec, StepSpec, TaskSpec
    from slimbench.sweep.artifacts import cache as artifacts

    monkeypatch.setenv(artifacts.ENV, str(root))
    monkeypatch.setenv(artifacts.MIN_FREE_ENV, "0")
    step = StepSpec(name="nncf-weights", params=METHODS.get("nncf-weights").config(mode="int8_asym").to_dict())
    cell = CellSpec(model=ModelSpec(name="tiny-llama"), method=MethodSpec(steps=(step,)),
                    task=TaskSpec(name="perplexity", version="1", params={}), hardware=HardwareSpec(threads=1))
    report: dict = {}
    artifacts.lookup(cell, log=lambda s: None).save(lm, report, {})
    art = report["artifact"]
    assert not art["saved"], art
    assert not (root / "entries").exists() or not any((root / "entries").iterdir())
    return art["reason"]


def run(name: str, lm, **params):
    method = METHODS.get(name)
    cfg = build_config(method.config, {**method.test_params, **params}, source="test", field=name)
    return method.run(lm, cfg, CTX)


def test_openvino_ir_matches_eager_logits_and_greedy(one_torch_thread):
    lm = tiny_bpe_llama()
    ids = shakespeare_ids(lm, 48)
    ref_logits, ref_tokens = lm.logits(ids).float(), lm.generate(ids, 6)
    rep = run("openvino", lm)
    try:
        assert lm.model.engine == "openvino"
        assert (lm.logits(ids) - ref_logits).abs().max() < 1e-4 * max(1.0, float(ref_logits.abs().max()))
        assert torch.equal(lm.generate(ids, 6), ref_tokens)  # through OpenVINO's KV cache
        agree = rep.details["agreement"]
        assert abs(agree["delta_nll"]) < 1e-5 and len(agree["nll_engine"]) == 1
        size = lm.model.slimbench_size()
        assert size["effective_bits"] == pytest.approx(32.0) and size["stored_bytes"] > 0
        assert rep.details["openvino"] and rep.details["threads"] == 1
    finally:
        lm.model.close()


@pytest.mark.parametrize(("params", "kind", "bits"), [
    ({"bits": 4, "group_size": 32}, "u4", lambda n: 4 + 20 / 32),  # u4 codes; u4 zero-point, fp16 scale per 32
    ({"bits": 8, "symmetric": True}, "u8", lambda n: 8 + 24 / n),  # per channel: u8 zero-point, fp16 scale per row
])
def test_a_methods_grid_runs_in_openvinos_compressed_kernels(one_torch_thread, params, kind, bits):
    """RTN's own codes go into the IR bit-exact and OpenVINO's CPU plugin runs them in its
    compressed FullyConnected kernel: the chain is native, and scores and decodes as the in-process
    fake-quantized model."""
    from slimbench.method import apply_method
    from slimbench.modeling import iter_linears
    from slimbench.specs import MethodSpec, StepSpec

    ref = tiny_bpe_llama()
    ids = shakespeare_ids(ref, 48)
    steps = (StepSpec(name="rtn", params=params),)
    apply_method(ref, MethodSpec(steps=steps), HardwareSpec(threads=1))
    ref_logits, ref_tokens = ref.logits(ids).float(), ref.generate(ids, 6)
    lm = tiny_bpe_llama()
    # weight-only: OpenVINO's CPU default also quantizes these layers' activations (int8, groups of 32)
    step = StepSpec(name="openvino", params={**METHODS.get("openvino").test_params, "dynamic_quantization": 0})
    report = apply_method(lm, MethodSpec(steps=(*steps, step)), HardwareSpec(threads=1))
    try:
        details = report["steps"][-1]["details"]
        assert report["execution"] == "native" and details["executes_stored_forms"]
        assert details["grids_written"] == 14 and lm.model.stored_format.endswith(f"{kind} method grids")
        assert details["dynamic_quantization_group_size"] == 0
        assert (lm.logits(ids) - ref_logits).abs().max() < 1e-4 * max(1.0, float(ref_logits.abs().max()))
        assert torch.equal(lm.generate(ids, 6), ref_tokens)
        shapes = [m.weight.shape for _, m in iter_linears(ref.model)]  # the grids; the output projection fp32
        head = ref.model.get_output_embeddings().weight.numel()
        grid_bits = sum(o * i * bits(i) for o, i in shapes)
        want = (grid_bits + 32 * head) / (sum(o * i for o, i in shapes) + head)
        assert lm.model.slimbench_size()["effective_bits"] == pytest.approx(want, rel=1e-4)  # + rope's inv_freq
        fused = [n for n in lm.model.compiled.get_runtime_model().get_ordered_ops()
                 if n.get_rt_info()["layerType"].astype(str) == "FullyConnected"
                 and n.get_rt_info()["runtimePrecision"].astype(str) == kind]
        assert len(fused) == 14  # every grid in the compressed-weight kernel, the output projection dense
    finally:
        lm.model.close()


# int4 groups of 32 (4.5 bits with fp16 scales); NNCF keeps the output projection at int8 (its default)
@pytest.mark.parametrize(("mode", "group", "bits"), [("int4_sym", 32, (4.4, 6.0))])
def test_nncf_weights_compresses_and_runs(one_torch_thread, mode, group, bits, tmp_path, monkeypatch):
    pytest.importorskip("nncf", reason="nncf not installed")
    lm = tiny_bpe_llama()
    ref_logits = lm.logits(shakespeare_ids(lm, 32)).float()
    rep = run("nncf-weights", lm, mode=mode, group_size=group)
    try:
        # The artifact cache refuses the engine model, saying why, and keeps nothing (checked
        # here rather than by a second NNCF run in tests/test_artifacts.py).
        refusal = artifact_cache_refusal(lm, tmp_path / "artifacts", monkeypatch)
        assert "not a transformers model class" in refusal
        size = lm.model.slimbench_size()
        assert bits[0] <= size["effective_bits"] <= bits[1], size
        logits = lm.logits(shakespeare_ids(lm, 32)).float()
        diff = float((logits - ref_logits).abs().max())
        assert 0 < diff < 0.5 * float(ref_logits.abs().max())  # lossy but the same model
        types = rep.details["ir"]["constant_types"]
        assert rep.details["nncf"] and ("u4" in types or "i4" in types), types
    finally:
        lm.model.close()


def test_cli_export_keeps_the_methods_grid_in_the_ir(tmp_path, one_torch_thread):
    import json

    from slimbench.cli import main

    out = tmp_path / "ir"
    assert main(["export", "--model", "tiny-llama", "--method", "{name: rtn, bits: 4, group_size: 32}",
                 "--format", "openvino", "--out", str(out), "--no-artifact-cache"]) == 0
    manifest = json.loads((tmp_path / "ir.manifest.json").read_text())
    grids = manifest["tensors"]
    assert len(grids) == 14 and all(r["exact"] and r["type"] == "u4 g32" for r in grids)
    assert manifest["ir"]["constant_types"].get("u4", 0) == 28  # codes and zero-points of every grid
