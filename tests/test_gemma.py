"""gemma3-270m, the second real model: conversion, provenance, and every family's main method on it.

Real-model tests are slow (the 262k-word output layer dominates a forward: ~6 s per 512 tokens
on 2 cores), so budgets are tiny: they check that each method runs (or refuses in check() with
a reason) and leaves a model with finite perplexity, not how good it is. The methods run on the
real model cut to its first 6 decoder layers: one whole period of its layer pattern (5 sliding-
window layers, then a global one with its own rotary base), with its real weights, tokenizer,
262k-word tied embedding and head shapes; the 12 further layers repeat that period and would
only triple each layer-wise method's time. Loading and provenance are checked on all 18.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_gemma3

from slimbench.layerwise import capture_layer_inputs, decoder_layers, run_layer
from slimbench.method import apply_method
from slimbench.registry import MODELS
from slimbench.specs import HardwareSpec, MethodSpec, ModelSpec, StepSpec

HW = HardwareSpec(threads=1)
CAL = {"calib_samples": 2, "calib_seqlen": 32}
# Each family's main method at a tiny budget.
MAIN = {
    "baseline": {},
    "cast": {"dtype": "bfloat16"},
    "rtn": {"bits": 4, "group_size": 64},
    "gptq": {"bits": 3, **CAL},
    "magnitude": {"sparsity": 0.5},
    "wanda": {"sparsity": 0.5, **CAL},
    "svd-llm": {"ratio": 0.2, **CAL},
    "layer-drop": {"keep_every": 2},
    "distill": {"keep_every": 2, "train_steps": 1, "batch_size": 1, "teacher_batch": 1, "teacher_topk": 8,
                "warmup_steps": 0, "checkpoint_every": 1, **CAL},
    "finetune": {"steps": 1, "batch_size": 1, "eval_samples": 1, "calib_samples": 3, "calib_seqlen": 32},
    "auto": {"budget_like": "rtn:3:pc", "bits": [3, 4], "group_sizes": [None], "unit": "layer",
             "probe_windows": 1, "probe_seqlen": 16, "val_windows": 1, "verify_windows": 1, "verify_seqlen": 16,
             "objectives": ["kl"]},
}


# One worker loads (and, on an empty cache, converts) the model for all of this module's tests.
pytestmark = pytest.mark.xdist_group("gemma3-270m")
PERIOD = 6  # Gemma 3's layer pattern: 5 sliding-window layers, then a global one


@pytest.fixture(scope="module")
def gemma():
    """Gemma 3 270M (converted once into the user cache), loaded once for the module."""
    torch.set_num_threads(HW.threads)
    return MODELS.get("gemma3-270m").load(ModelSpec(name="gemma3-270m"), HW)


def shared_tokenizer(lm) -> dict:
    """A deepcopy memo that shares the tokenizer (no method changes it; copying Gemma's 262k-word
    tokenizer is most of a deepcopy's time)."""
    return {id(lm.tokenizer): lm.tokenizer}


@pytest.fixture(scope="module")
def gemma_period(gemma):
    """The real model cut to its first PERIOD decoder layers (the layers past it are not copied)."""
    memo = shared_tokenizer(gemma)
    memo.update({id(layer): layer for layer in gemma.model.model.layers[PERIOD:]})
    lm = copy.deepcopy(gemma, memo)
    lm.model.model.layers = torch.nn.ModuleList(lm.model.model.layers[:PERIOD])
    lm.model.config.num_hidden_layers = PERIOD
    lm.model.config.layer_types = lm.model.config.layer_types[:PERIOD]
    assert lm.model.config.layer_types == ["sliding_attention"] * (PERIOD - 1) + ["full_attention"]
    return lm


def short_ppl(lm, n_tokens: int = 64) -> float:
    from slimbench.zoo.corpora import encode_split

    ids = torch.tensor([encode_split(lm, "shakespeare", "test")[:n_tokens]])
    return math.exp(float(lm.token_nll(ids).double().mean()))


@pytest.mark.slow
def test_gemma_loads_with_provenance(gemma):
    assert gemma.name == "gemma3-270m"
    assert gemma.model.config.model_type == "gemma3_text"
    assert gemma.model.config.vocab_size == 262144 and gemma.model.config.num_hidden_layers == 18
    assert "Q4_K_M" in gemma.provenance["weights"] and "caveat" in gemma.provenance
    assert {"sliding_attention", "full_attention"} <= set(gemma.model.config.layer_types)
    assert gemma.encode("Paris")  # the GGUF tokenizer works offline
    assert 1 < short_ppl(gemma) < 1e4


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MAIN))
def test_gemma_main_method_runs_or_refuses(gemma_period, name, tmp_path, monkeypatch):
    # Distillation checkpoints and sensitivity profiles land in a throw-away cache (the model is
    # already loaded from the real one).
    monkeypatch.setenv("SLIMBENCH_CACHE", str(tmp_path))
    lm = copy.deepcopy(gemma_period, shared_tokenizer(gemma_period))
    spec = MethodSpec(steps=[StepSpec(name=name, params=MAIN[name])])
    try:
        report = apply_method(lm, spec, HW)
    except ValueError as err:  # a refusal from check() must say why
        assert str(err), f"{name} refused gemma3-270m without a reason"
        pytest.skip(f"{name} refuses gemma3-270m: {err}")
    assert report["stored_bytes"] > 0
    assert math.isfinite(short_ppl(lm))


def test_layerwise_inputs_match_the_full_forward_on_gemma3():
    model = tiny_gemma3()
    layers = decoder_layers(model)
    ids = torch.randint(0, 512, (1, 24))  # longer than the sliding window
    true_in = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, a, k, i=i: true_in.__setitem__(i, a[0] if a else k["hidden_states"]), with_kwargs=True)
        for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=ids)
        for h in hooks:
            h.remove()
        captured = capture_layer_inputs(model, layers, ids, "cpu")
        assert captured.kwargs[0][1] is not captured.kwargs[0][0]  # the global layer has its own
        assert captured.kwargs[0][2] is captured.kwargs[0][0]  # equal ones are shared
        x = captured.hidden[0]
        for i in range(len(layers) - 1):
            x = run_layer(layers[i], x, captured.kwargs[0][i])
            torch.testing.assert_close(x, true_in[i + 1])
