"""Validation that needs a model's shapes but not its weights; every error of a suite at once;
did-you-mean for parameters; the calibration budget guard; the advice about smollm2's groups."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import benchmark
from slimbench.calibration import NEEDS, budget_problems
from slimbench.config import Config
from slimbench.errors import SuiteError
from slimbench.method import Method, MethodContext, MethodReport
from slimbench.registry import METHODS
from slimbench.specs import HardwareSpec, ModelSpec
from slimbench.sweep.driver import run_cells
from slimbench.sweep.store import ResultStore
from slimbench.sweep.suite import load_suite
from slimbench.zoo.shapes import skeleton

ROOT = Path(benchmark.__file__).resolve().parent
torch.set_num_threads(1)


def write(tmp_path, text, name="suite.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load weights fails the test: validation must read configs only."""
    from transformers import AutoModelForCausalLM

    import slimbench.zoo.models as models

    def refuse(*a, **k):
        raise AssertionError("validation loaded weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(models, "load_pretrained", refuse)
    monkeypatch.setattr(models, "converted_smollm2", refuse)


def test_group_size_that_does_not_divide_smollm2_is_caught_by_validate(tmp_path, no_weights):
    path = write(tmp_path, "models: [smollm2-135m]\nmethods: [{name: rtn, bits: 4, group_size: 128}]\n"
                           "tasks: [perplexity]\n")
    with pytest.raises(SuiteError) as e:
        load_suite(path)
    msg = str(e.value)
    assert "group_size 128 does not divide the input dimension 576" in msg and "smollm2-135m" in msg
    assert "group sizes that divide every layer: 8, 16, 32, 64" in msg
    load_suite(write(tmp_path, "models: [smollm2-135m]\nmethods: [{name: rtn, group_size: 64}]\ntasks: [perplexity]\n",
                     "ok.yaml"))


def test_head_counts_are_checked_at_validation(tmp_path, no_weights):
    path = write(tmp_path, "models: [smollm2-135m]\nmethods: [{name: structured, attn_ratio: 0.9, "
                           "importance: magnitude}]\ntasks: [perplexity]\n")
    with pytest.raises(SuiteError, match="would remove all 3 KV groups"):
        load_suite(path)


def test_tensor_parallel_head_split_is_checked_at_validation(tmp_path, no_weights):
    """SmolLM2's 9 query / 3 KV heads cannot be split over 2 processes: said before any cell."""
    path = write(tmp_path, "models: [smollm2-135m]\nmethods: [{name: parallel, mode: tensor, world_size: 2}]\n"
                           "tasks: [perplexity]\n")
    with pytest.raises(SuiteError, match="9 query and 3 key/value heads"):
        load_suite(path)
    ok = write(tmp_path, "models: [smollm2-135m]\nmethods: [{name: parallel, mode: tensor, world_size: 3}]\n"
                         "tasks: [perplexity]\n", name="ok.yaml")
    assert not [w for w in load_suite(ok).warnings if "parallel" in w]


def test_cli_validate_reports_the_shape_error(tmp_path, capsys, no_weights):
    path = write(tmp_path, "models: [smollm2-135m]\nmethods: [{name: gptq, group_size: 128}]\ntasks: [perplexity]\n")
    assert benchmark.main(["validate", str(path)]) == 2
    assert "group_size 128" in capsys.readouterr().err


def test_parameter_typo_gets_did_you_mean(tmp_path):
    path = write(tmp_path, "models: [tiny-llama]\nmethods: [{name: magnitude, sparsty: 0.5}]\ntasks: [perplexity]\n")
    with pytest.raises(SuiteError, match=r"sparsty: unknown parameter \(did you mean 'sparsity'\?\)"):
        load_suite(path)


def test_every_error_of_a_suite_is_reported_at_once(tmp_path, capsys):
    text = (
        "models: [tiny-lama, tiny-llama]\n"
        "methods:\n"
        "  - {name: magnitude, sparsty: 0.5}\n"
        "  - {name: rtn, bits: 1}\n"
        "  - [rtn, magnitude]\n"
        "  - {name: rtn, group_size: 128}\n"
        "tasks: [perplexit, {name: perplexity, split: train}]\n"
        "hardware: {threads: 0}\n"
    )
    path = write(tmp_path, text)
    with pytest.raises(SuiteError) as e:
        load_suite(path)
    msg = str(e.value)
    for part in ("tiny-lama", "sparsty", "bits", "may not follow rtn", "group_size 128", "perplexit", "split",
                 "hardware", "threads"):
        assert part in msg, part
    assert msg.startswith(f"{path}: ") and " problems:" in msg
    assert benchmark.main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.count("error:") == 1  # one error, listing every problem


def test_a_gpu_method_on_a_cpu_suite_is_refused_at_validation(tmp_path, monkeypatch):
    gpu = Method("x-gpu", "acceleration", "needs CUDA", Config, lambda lm, c, x: MethodReport("native"),
                 requires_gpu=True)
    monkeypatch.setitem(METHODS.entries, "x-gpu", gpu)
    with pytest.raises(SuiteError, match="x-gpu needs a CUDA GPU"):
        load_suite(write(tmp_path, "models: [tiny-llama]\nmethods: [x-gpu]\ntasks: [perplexity]\n"))


# -- the calibration budget guard -----------------------------------------------------------------
def test_budget_below_the_widest_input_warns_at_validation(tmp_path, no_weights):
    # the measured case: 4 x 256 = 1,024 tokens for down_proj's 1,536 inputs (GPTQ came out worse than RTN)
    s = load_suite(write(tmp_path, "models: [smollm2-135m]\nmethods: [{name: gptq, bits: 3, calib_samples: 4, "
                                   "calib_seqlen: 256}]\ntasks: [perplexity]\n"))
    (warning,) = s.warnings
    assert "1,024 calibration tokens, fewer than the 1,536 inputs of model.layers.0.mlp.down_proj" in warning
    assert "calib_samples to at least 6" in warning
    enough = load_suite(write(tmp_path, "models: [smollm2-135m]\nmethods: [{name: gptq, bits: 3, calib_samples: 6, "
                                        "calib_seqlen: 256}]\ntasks: [perplexity]\n", "enough.yaml"))
    assert enough.warnings == []


def test_budget_below_the_floor_is_refused(tmp_path, no_weights):
    with pytest.raises(SuiteError, match="below the floor of 192"):
        load_suite(write(tmp_path, "models: [smollm2-135m]\nmethods: [{name: sparsegpt, calib_samples: 1, "
                                   "calib_seqlen: 128}]\ntasks: [perplexity]\n"))


@pytest.mark.parametrize("name", ["gptq", "sparsegpt", "svd-llm"])
def test_hessian_methods_declare_the_full_rank_need(name):
    assert METHODS.get(name).calibration_need == "hessian"
    sk = skeleton(ModelSpec(name="smollm2-135m"))
    method = METHODS.get(name)
    errors, warnings = budget_problems(sk.model, method.config(calib_samples=2, calib_seqlen=512), method)
    assert not errors and "1,536 inputs" in warnings[0]


def test_every_calibration_method_declares_a_known_need():
    for method in METHODS:
        if method.uses_calibration:
            need = method.calibration_need
            assert need is not None and (callable(need) or need in NEEDS), method.name


def test_the_warning_reaches_the_record(tmp_path):
    # tiny-llama's widest input is 128 (the MLP); 2 x 32 = 64 tokens is below it, above the floor of 16
    path = write(tmp_path, "models: [tiny-llama]\nmethods: [{name: gptq, calib_samples: 2, calib_seqlen: 32}]\n"
                           "tasks: [{name: perplexity, seqlen: 32, max_windows: 2}]\nhardware: {threads: 1}\n")
    s = load_suite(path)
    store = ResultStore(tmp_path / "results")
    assert run_cells(s.cells(), store, show_progress=False, log=lambda m: None).ok
    (rec,) = store.records()
    (w,) = rec["method_report"]["warnings"]
    assert w.startswith("gptq: calibration budget: 2 x 32 = 64 calibration tokens, fewer than the 128 inputs")
    assert rec["method_report"]["steps"][0]["warnings"] == [w.removeprefix("gptq: ")]


def test_below_the_floor_the_method_refuses_before_any_work(tiny_llama):
    method = METHODS.get("gptq")
    with pytest.raises(ValueError, match="below the floor of 16"):
        method.run(tiny_llama, method.config(calib_samples=1, calib_seqlen=8), MethodContext(HardwareSpec(threads=1)))


def test_calibration_longer_than_the_model_positions_is_refused(tmp_path):
    with pytest.raises(SuiteError, match="calib_seqlen 2048 exceeds the model's 1024 positions"):
        load_suite(write(tmp_path, "models: [tiny-gpt2]\nmethods: [{name: wanda, calib_samples: 1, "
                                   "calib_seqlen: 2048}]\ntasks: [perplexity]\n"))


def test_simulated_method_without_storage_gets_a_warning(tiny_llama):
    lazy = Method("lazy", "pruning", "zeros, no stored form", Config,
                  lambda lm, c, x: MethodReport("simulated"))
    rep = lazy.run(tiny_llama, Config(), MethodContext(HardwareSpec(threads=1)))
    assert any("no stored form" in w and "dense model" in w for w in rep.warnings)


# -- the advice about smollm2's group sizes -------------------------------------------------------
def advised_group_sizes(text: str) -> list[int]:
    """Group sizes the text advises comparing at ("compare ... at g64"), from sentences that say compare."""
    sizes = []
    for sentence in re.split(r"(?<=[.;])\s", text):
        if "compare" in sentence.lower():
            sizes += [int(g) for g in re.findall(r"\bat g(\d+)", sentence)]
    return sizes


def test_advice_names_only_group_sizes_smollm2_accepts():
    from slimbench.methods.quantization.grid import check_group_size

    from slimbench.modeling import get_weight, iter_linears
    from slimbench.zoo.models import SMOLLM2_PROVENANCE

    sk = skeleton(ModelSpec(name="smollm2-135m"))
    widths = {n: get_weight(m).shape[1] for n, m in iter_linears(sk.model)}
    texts = {"caveat": SMOLLM2_PROVENANCE["caveat"], "README": (ROOT / "README.md").read_text()}
    for where, text in texts.items():
        advised = advised_group_sizes(text)
        assert advised, where  # the advice exists and names a group size
        for g in advised:
            check_group_size(widths, g)  # raises if the advice is wrong


def test_check_config_takes_a_spec_or_a_transformers_config(no_weights):
    from slimbench.zoo.models import tiny_config

    rtn = METHODS.get("rtn")
    rtn.check_config(tiny_config("opt"), rtn.config(group_size=32))
    with pytest.raises(ValueError, match="group_size 128 does not divide the input dimension 64"):
        rtn.check_config(tiny_config("gpt2"), rtn.config(group_size=128))
    with pytest.raises(ValueError, match="input dimension 576"):
        rtn.check_config(ModelSpec(name="smollm2-135m"), rtn.config(group_size=128))
