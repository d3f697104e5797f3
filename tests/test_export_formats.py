"""compressed-tensors export: transformers (with the compressed-tensors library decompressing on
load) gives SlimBench's logits; a method's codes are packed as themselves; the CLI writes a
manifest. Skipped where compressed-tensors is not installed."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from export_helpers import shakespeare_ids, tiny_bpe_llama
from slimbench.methods.quantization.export_grids import linear_grids

from slimbench.config import build_config
from slimbench.engines.export.gguf_meta import ExportRefused
from slimbench.method import MethodContext
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec

pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed (requirements-extras.txt)")
from slimbench.engines.export import compressed_tensors as cte


def load(folder, quantized: bool = True, run_compressed: bool = False):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    if not quantized or run_compressed:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # transformers 5.24's default (run_compressed) path leaves pack-quantized weights unloaded on
    # CPU; dequantize=True has the compressed-tensors library decode them at load.
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(dequantize=True))


@pytest.mark.parametrize("params", [
    {"bits": 4, "group_size": 32},                                # asymmetric groups: zero-points packed
    {"bits": 8, "symmetric": True},                               # per channel
    {"bits": 3, "group_size": 16, "symmetric": True, "format": "packed"},  # from the packed layer
])
def test_pack_quantized_round_trip(tmp_path, params, one_torch_thread):
    lm = tiny_bpe_llama()
    method = METHODS.get("rtn")
    rep = method.run(lm, build_config(method.config, params, source="t", field="rtn"),
                     MethodContext(hardware=HardwareSpec(threads=1)))
    manifest = cte.export(lm, tmp_path / "ct", grids=linear_grids(lm.model, rep.storage))
    assert manifest["quantization_format"] == "pack-quantized"
    assert manifest["summary"]["exact"] == manifest["summary"]["tensors"]
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["weights"]["num_bits"] == params["bits"] and len(group["targets"]) == 14
    ids = shakespeare_ids(lm, 32)
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "ct")(input_ids=ids).logits, lm.model(input_ids=ids).logits)


def run_method(lm, name: str, params: dict):
    method = METHODS.get(name)
    return method.run(lm, build_config(method.config, params, source="t", field=name),
                      MethodContext(hardware=HardwareSpec(threads=1)))


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_w8a8_written_int_quantized_with_its_activation_scheme(tmp_path, granularity, one_torch_thread):
    """SmoothQuant's int8 layers are written as their own int8 codes and scales with a dynamic 8-bit
    activation scheme; transformers (the compressed-tensors library quantizing activations as the
    scheme says) gives the logits of SlimBench's real int8 GEMM."""
    from slimbench.methods.quantization.export_grids import int8_layers

    lm = tiny_bpe_llama()
    run_method(lm, "smoothquant", {"act_granularity": granularity, "calib_samples": 4, "calib_seqlen": 32})
    int8 = int8_layers(lm.model)
    assert len(int8) == 14
    manifest = cte.export(lm, tmp_path / "ct", int8=int8)
    assert manifest["quantization_format"] == "int-quantized"
    linears = [r for r in manifest["tensors"] if r["from"] == "int8"]
    assert len(linears) == 14 and all(r["exact"] for r in linears)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    act = group["input_activations"]
    assert (act["num_bits"], act["dynamic"], act["strategy"]) == (8, True, granularity.removeprefix("per_"))
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "ct" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    assert state[f"{name}.weight"].dtype == torch.int8
    assert torch.equal(state[f"{name}.weight"], lm.model.get_submodule(name).qweight)
    # transformers runs the scheme through the compressed-tensors library's reference quantizer, whose
    # dynamic symmetric scale is amax / 127.5 (vLLM's kernel and SlimBench's use amax / 127): checked
    # against that definition, computed here from the exported codes
    loaded = load(tmp_path / "ct", run_compressed=True)
    x = torch.randn(1, 6, state[f"{name}.weight"].shape[1]) * 3
    amax = x.abs().amax(dim=-1 if granularity == "per_token" else None, keepdim=granularity == "per_token")
    xs = amax / 127.5
    weight = state[f"{name}.weight"].float() * state[f"{name}.weight_scale"]
    want = (torch.round(x / xs).clamp(-128, 127) * xs) @ weight.T
    with torch.no_grad():
        ids = shakespeare_ids(lm, 32)  # the first forward decompresses the loaded model's weights
        assert float((loaded(input_ids=ids).logits - lm.model(input_ids=ids).logits).abs().max()) < 2e-2
        assert float((loaded.get_submodule(name)(x) - want).abs().max()) < 1e-4


def test_pruned_weights_are_written_dense_with_their_measured_pattern(tmp_path, one_torch_thread):
    lm = tiny_bpe_llama()
    run_method(lm, "magnitude", {"pattern": "2:4"})
    manifest = cte.export(lm, tmp_path / "ct")
    pruned = [r for r in manifest["tensors"] if "sparsity" in r]
    assert len(pruned) == 14 and {r["pattern"] for r in pruned} == {"2:4"}
    assert all(r["sparsity"] == pytest.approx(0.5) for r in pruned)
    assert manifest["summary"]["sparse"] == {"tensors": 14, "patterns": ["2:4"], "mean_sparsity": pytest.approx(0.5)}
    ids = shakespeare_ids(lm, 16)
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "ct", quantized=False)(input_ids=ids).logits,
                           lm.model(input_ids=ids).logits)


def test_dense_export_and_refusals(tmp_path, one_torch_thread):
    lm = tiny_bpe_llama()
    manifest = cte.export(lm, tmp_path / "fp16", dtype="float16")
    assert manifest["quantization_format"] == "dense" and manifest["summary"]["approximated"] > 0
    ids = shakespeare_ids(lm, 16)
    with torch.no_grad():
        reloaded = load(tmp_path / "fp16", quantized=False)(input_ids=ids).logits
        assert (reloaded - lm.model(input_ids=ids).logits).abs().max() < 0.05
    with pytest.raises(ExportRefused, match="exists"):
        cte.export(lm, tmp_path / "fp16")
    with pytest.raises(ExportRefused, match="dtype"):
        cte.export(lm, tmp_path / "x", dtype="int8")


def test_cli_export_writes_file_and_manifest(tmp_path, one_torch_thread):
    from slimbench.cli import main

    out = tmp_path / "m.gguf"
    rc = main(["export", "--model", "tiny-llama", "--method", "{name: rtn, bits: 8, symmetric: true}",
               "--format", "gguf", "--out", str(out), "--weights", "Q8_0"])
    assert rc == 0 and out.exists()
    manifest = json.loads((tmp_path / "m.gguf.manifest.json").read_text())
    assert manifest["provenance"]["method"]["name"] == "rtn"
    assert all(r["exact"] for r in manifest["tensors"] if r["type"] == "Q8_0" and "blk" in r["tensor"])


def test_export_reads_a_cached_model_with_its_stored_forms(tmp_path, monkeypatch, one_torch_thread):
    """The second export of the same cell comes from the compressed-model cache, and the method's
    grid, read back from the entry's stored forms, is written exactly again."""
    from slimbench.cli import main

    monkeypatch.setenv("SLIMBENCH_ARTIFACTS", "off")  # restored afterwards: --artifacts sets it
    argv = ["export", "--model", "tiny-llama", "--method", "{name: rtn, bits: 4, group_size: 32, symmetric: true}",
            "--format", "gguf", "--weights", "Q4_0", "--artifacts", str(tmp_path / "cache")]
    manifests = []
    for name in ("a", "b"):
        assert main([*argv, "--out", str(tmp_path / f"{name}.gguf")]) == 0
        manifests.append(json.loads((tmp_path / f"{name}.gguf.manifest.json").read_text()))
    first, second = manifests
    assert first["provenance"]["artifact"] is None and len(second["provenance"]["artifact"]) > 8
    grid = [r for r in second["tensors"] if r["type"] == "Q4_0"]
    assert len(grid) == 14 and all(r["exact"] and r["from"] == "grid" for r in grid)
    assert [(r["tensor"], r["type"], r["exact"]) for r in first["tensors"]] == \
        [(r["tensor"], r["type"], r["exact"]) for r in second["tensors"]]


def test_cli_export_refuses_bad_input_before_any_work(tmp_path, capsys):
    from slimbench.cli import main

    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit, match="exists; choose a new path"):
        main(["export", "--model", "tiny-llama", "--format", "gguf", "--out", str(tmp_path / "taken")])
    rc = main(["export", "--model", "tiny-llama", "--method", "{name: rtn, bits: 99}", "--format", "gguf",
               "--out", str(tmp_path / "m.gguf")])
    assert rc == 2 and "the command line (--model / --method): methods[0] (rtn): bits" in capsys.readouterr().err
    rc = main(["export", "--model", "tiny-llama", "--method", "{name: rtn, bits: [", "--format", "gguf",
               "--out", str(tmp_path / "m.gguf")])
    assert rc == 2 and "--method: malformed YAML" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_cli_export_refuses_an_execution_step_before_compressing(tmp_path, monkeypatch):
    """A chain with an engine step is refused from the chain alone: the compression before it
    never runs, and the error gives the chain to export instead, which the CLI accepts."""
    import slimbench.sweep.cellrun as cellrun
    from slimbench.cli import export as export_cli
    from slimbench.cli import main

    def never(*a, **k):
        raise AssertionError("the model was loaded or compressed before the refusal")

    monkeypatch.setattr(cellrun, "load_and_compress", never)
    method = "[{name: rtn, bits: 4, group_size: 32}, {name: llama-cpp}]"
    with pytest.raises(SystemExit, match=r"execution steps \(llama-cpp\)") as exc:
        main(["export", "--model", "tiny-llama", "--method", method, "--format", "gguf",
              "--out", str(tmp_path / "m.gguf")])
    assert list(tmp_path.iterdir()) == []
    alone = str(exc.value).split("--method '")[1].rstrip("'")
    args = argparse.Namespace(record=None, suite=None, model="tiny-llama", method=alone, threads=1)
    cell = export_cli.cell_from_args(args)
    assert [(s.name, s.params["bits"], s.params["group_size"]) for s in cell.method.steps] == [("rtn", 4, 32)]
    export_cli.refuse_execution_steps(cell)  # nothing left to refuse
