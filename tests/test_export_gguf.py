"""GGUF export: read back by the gguf library and by transformers' GGUF loader (independent
readers, their own inverse layout transforms), the weights and logits are SlimBench's; a method's
grid is written as its own block type where it fits, and re-quantization is said."""

from __future__ import annotations

import pytest
import torch
from export_helpers import shakespeare_ids, tiny_bpe_llama
from slimbench.methods.quantization.export_grids import linear_grids

from slimbench.config import build_config
from slimbench.engines.export import gguf_export
from slimbench.engines.export import manifest as mf
from slimbench.engines.export.gguf_meta import ExportRefused
from slimbench.method import MethodContext
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec

pytest.importorskip("gguf", reason="the gguf package is not installed")


def quantized(params: dict):
    lm = tiny_bpe_llama()
    method = METHODS.get(params.pop("name", "rtn"))
    cfg = build_config(method.config, params, source="test", field=method.name)
    rep = method.run(lm, cfg, MethodContext(hardware=HardwareSpec(threads=1)))
    return lm, linear_grids(lm.model, rep.storage)


def read_back(path, model) -> dict[str, torch.Tensor]:
    """The state dict transformers' GGUF loader builds from the file (its own dequantizer and transforms)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    plain = AutoModelForCausalLM.from_config(model.config)  # plain linears, whatever the model holds
    return {k: torch.as_tensor(v) for k, v in load_gguf_checkpoint(str(path), return_tensors=True,
                                                                 model_to_load=plain)["tensors"].items()}


def linear_rows(manifest):
    return [r for r in manifest["tensors"] if len(r["shape"]) == 2 and r["tensor"] != "token_embd.weight"]


def test_f32_export_round_trips_bit_exactly(tmp_path, one_torch_thread):
    lm = tiny_bpe_llama()
    path = tmp_path / "m.gguf"
    manifest = gguf_export.export(lm, path, weights="F32", embeddings="F32")
    assert manifest["summary"]["exact"] == manifest["summary"]["tensors"] == 20
    assert mf.read(path)["files"][0]["bytes"] == path.stat().st_size
    state = read_back(path, lm.model)
    for name, t in lm.model.state_dict().items():
        if name != "lm_head.weight":  # tied: GGUF holds the embedding once
            assert torch.equal(state[name], t), name


def test_pruned_weights_are_written_dense_with_their_measured_pattern(tmp_path, one_torch_thread):
    lm, _ = quantized({"name": "magnitude", "pattern": "2:4"})
    manifest = gguf_export.export(lm, tmp_path / "m.gguf", weights="F32", embeddings="F32")
    pruned = [r for r in manifest["tensors"] if "sparsity" in r]
    assert len(pruned) == 14 and all(r["exact"] and r["pattern"] == "2:4" for r in pruned)
    assert manifest["summary"]["sparse"]["patterns"] == ["2:4"]


def test_transformers_loads_the_gguf_with_the_same_logits(tmp_path, one_torch_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm, grids = quantized({"bits": 4, "group_size": 32, "symmetric": True})
    gguf_export.export(lm, tmp_path / "q.gguf", grids=grids, embeddings="F32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="q.gguf")
    ids = shakespeare_ids(lm, 48)
    assert tok.decode(ids[0]) == lm.tokenizer.decode(ids[0])
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - lm.model(input_ids=ids).logits).abs().max()
    assert float(diff) < 1e-5  # same weights; eps stored as float32 in GGUF


@pytest.mark.parametrize(("params", "qtype"), [
    ({"bits": 4, "group_size": 32, "symmetric": True}, "Q4_0"),   # w = d (q - 8): exact
    ({"bits": 3, "group_size": 64}, "Q4_0"),                      # 3-bit asym codes - zero fit q - 8
    ({"bits": 4, "group_size": 32}, "Q8_0"),                      # asym 4-bit: Q8_0 exact (Q4_1 rounds its min)
    ({"bits": 8, "symmetric": True}, "Q8_0"),                     # per channel: every block shares the row scale
    ({"bits": 4, "group_size": 32, "symmetric": True, "format": "packed"}, "Q4_0"),  # from the packed layer
])
def test_method_grid_is_written_exactly(tmp_path, params, qtype, one_torch_thread):
    lm, grids = quantized(dict(params))
    assert len(grids) == 14
    manifest = gguf_export.export(lm, tmp_path / "q.gguf", grids=grids)
    rows = linear_rows(manifest)
    assert {r["type"] for r in rows} == {qtype} and all(r["exact"] and r["from"] == "grid" for r in rows)
    state = read_back(tmp_path / "q.gguf", lm.model)
    for name, mod in lm.model.named_modules():
        if name.endswith("up_proj"):
            from slimbench.modeling import get_weight

            assert torch.equal(state[f"{name}.weight"], get_weight(mod).float())


def test_grid_that_does_not_fit_is_requantized_and_said(tmp_path, one_torch_thread):
    lm, grids = quantized({"bits": 4, "group_size": 16})  # groups narrower than GGUF's blocks of 32
    manifest = gguf_export.export(lm, tmp_path / "q.gguf", grids=grids)
    rows = linear_rows(manifest)
    assert all(r["requantized"] and not r["exact"] and r["from"] == "dense" for r in rows)
    assert len(manifest["summary"]["requantized"]) == len(rows) and manifest["summary"]["max_abs_change"] > 0
    lm32, grids32 = quantized({"bits": 4, "group_size": 32})
    forced = gguf_export.export(lm32, tmp_path / "q1.gguf", grids=grids32, weights="Q4_1")
    assert all(r["type"] == "Q4_1" and r["from"] == "grid" for r in linear_rows(forced))
    assert 0 < max(r["rel_rms_change"] for r in linear_rows(forced)) < 1e-3  # the fp16 rounding of its min


def test_dense_weights_on_a_block_grid_go_back_to_it(tmp_path, one_torch_thread):
    """SmolLM2's case: weights dequantized from a Q4_1 file are found on that grid and written back exactly."""
    lm = tiny_bpe_llama()
    gguf_export.export(lm, tmp_path / "q41.gguf", weights="Q4_1")  # the reference quantizer, from dense
    state = read_back(tmp_path / "q41.gguf", lm.model)
    lm.model.load_state_dict({k: v for k, v in state.items() if "norm" in k or "proj" in k}, strict=False)
    manifest = gguf_export.export(lm, tmp_path / "again.gguf")  # no grid given: found from the values
    assert all(r["type"] == "Q4_1" and r["exact"] for r in linear_rows(manifest))


def test_refusals_name_the_reason(tmp_path, tiny_lm):
    if tiny_lm.model.config.model_type == "llama":
        with pytest.raises(ExportRefused, match="type 'Q5_0'"):
            gguf_export.export(tiny_lm, tmp_path / "x.gguf", weights="Q5_0")
    else:
        with pytest.raises(ExportRefused, match="supports"):
            gguf_export.export(tiny_lm, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())
